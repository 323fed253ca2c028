// Example plugin in JavaScript: a writer policy. Events whose kind is not in
// the `allowed-kinds` setting are refused with `blocked:`. The same policy as
// the Rust example `kind_allowlist`, under its own name.
//
// WIT to JavaScript: an exported interface is an object of functions named in
// camelCase; records are objects, `option` is a value or `undefined`, a
// variant is `{ tag, val }`, an enum is its case name as a string, u64 is a
// BigInt and smaller integers are numbers.

import { setting } from 'nostr-relay:plugin/host@0.1.0';

/** The kinds the operator allows; entries that are not numbers are skipped. */
function allowedKinds() {
  return (setting('allowed-kinds') ?? '')
    .split(',')
    .map((kind) => Number.parseInt(kind.trim(), 10))
    .filter((kind) => Number.isInteger(kind));
}

export const plugin = {
  info() {
    return {
      name: 'kind-allowlist-js',
      version: '0.1.0',
      managedKinds: [],
      // Every kind goes through onEvent.
      eventKinds: undefined,
      // Never consulted on reads.
      reqKinds: [],
      tickIntervalSeconds: undefined,
      settings: [
        { name: 'allowed-kinds', defaultValue: '0,1,3,5,7', description: 'Comma-separated kinds this relay accepts' },
      ],
    };
  },

  onEvent(_ctx, event) {
    if (allowedKinds().includes(event.kind)) {
      return { tag: 'accept' };
    }
    return { tag: 'reject', val: { kind: 'blocked', message: `kind ${event.kind} is not accepted by this relay` } };
  },

  processReq(_ctx, _filters) {
    return { tag: 'continue' };
  },

  tick(_now) {},
};
