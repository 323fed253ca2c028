// Test instrument (not an example): a JavaScript plugin that misbehaves on
// request, so tests can check what an author sees in the relay's log. The
// event's content picks the behaviour; anything else is accepted.

export const plugin = {
  info() {
    return {
      name: 'faults-js',
      version: '0.1.0',
      managedKinds: [],
      eventKinds: undefined,
      reqKinds: [],
      tickIntervalSeconds: undefined,
      settings: [],
    };
  },

  onEvent(_ctx, event) {
    switch (event.content) {
      case 'throw':
        throw new Error('faults-js throws on purpose');
      case 'print':
        console.log('faults-js says hello on stdout');
        console.error('faults-js says hello on stderr');
        return { tag: 'accept' };
      case 'bad-variant':
        return { tag: 'maybe' };
      case 'bad-enum':
        return { tag: 'reject', val: { kind: 'forbidden', message: 'no' } };
      default:
        return { tag: 'accept' };
    }
  },

  processReq(_ctx, _filters) {
    return { tag: 'continue' };
  },

  tick(_now) {},
};
