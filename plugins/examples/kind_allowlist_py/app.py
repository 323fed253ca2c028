"""Example plugin in Python: a writer policy. Events whose kind is not in the
`allowed-kinds` setting are refused with `blocked:`. The same policy as the
Rust example `kind_allowlist`, under its own name.

WIT to Python: componentize-py generates the `wit_world` package from the
contract at build time. An exported interface is a class named after it
(`Plugin`), functions are snake_case methods, records are dataclasses,
`option` is a value or None, a variant case is a class of its own
(`Decision_Accept`, `Decision_Reject(refusal)`), an enum is an `Enum`, and
every integer is an `int`.
"""

from typing import List

from wit_world import exports
from wit_world.imports import host
from wit_world.imports.types import (
    Decision,
    Decision_Accept,
    Decision_Reject,
    Event,
    Filter,
    PluginInfo,
    Refusal,
    RefusalKind,
    ReqResult,
    ReqResult_Continue,
    RequestContext,
    SettingSpec,
)


def allowed_kinds() -> List[int]:
    """The kinds the operator allows; entries that are not numbers are skipped."""
    kinds = []
    for kind in (host.setting("allowed-kinds") or "").split(","):
        try:
            kinds.append(int(kind.strip()))
        except ValueError:
            pass
    return kinds


class Plugin(exports.Plugin):
    def info(self) -> PluginInfo:
        return PluginInfo(
            name="kind-allowlist-py",
            version="0.1.0",
            managed_kinds=[],
            # Every kind goes through on_event.
            event_kinds=None,
            # Never consulted on reads.
            req_kinds=[],
            tick_interval_seconds=None,
            settings=[SettingSpec("allowed-kinds", "0,1,3,5,7", "Comma-separated kinds this relay accepts")],
        )

    def on_event(self, ctx: RequestContext, event: Event) -> Decision:
        if event.kind in allowed_kinds():
            return Decision_Accept()
        return Decision_Reject(Refusal(RefusalKind.BLOCKED, f"kind {event.kind} is not accepted by this relay"))

    def process_req(self, ctx: RequestContext, filters: List[Filter]) -> ReqResult:
        return ReqResult_Continue()

    def tick(self, now: int) -> None:
        pass
