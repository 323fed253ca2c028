"""Test instrument (not an example): a Python plugin that misbehaves on
request, so tests can check what an author sees in the relay's log. The
event's content picks the behaviour; anything else is accepted."""

import sys
from typing import List

from wit_world import exports
from wit_world.imports.types import (
    Decision,
    Decision_Accept,
    Event,
    Filter,
    PluginInfo,
    ReqResult,
    ReqResult_Continue,
    RequestContext,
)


class Plugin(exports.Plugin):
    def info(self) -> PluginInfo:
        return PluginInfo("faults-py", "0.1.0", [], None, [], None, [])

    def on_event(self, ctx: RequestContext, event: Event) -> Decision:
        if event.content == "throw":
            raise ValueError("faults-py raises on purpose")
        if event.content == "print":
            print("faults-py says hello on stdout")
            print("faults-py says hello on stderr", file=sys.stderr)
        if event.content == "bad-variant":
            return "accept"  # type: ignore[return-value]
        return Decision_Accept()

    def process_req(self, ctx: RequestContext, filters: List[Filter]) -> ReqResult:
        return ReqResult_Continue()

    def tick(self, now: int) -> None:
        pass
