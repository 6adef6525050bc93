"""kvm's events, delivered to the plugins' observer hooks.

:class:`HookSink` is the :class:`sevsim.kvm.events.EventSink` a plugin host hands to
kvm. ``wants`` is computed once, after loading: an event whose hook no plugin
implements is never built, so observers cost nothing when none is installed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pluggy
from attrs import frozen

from sevsim.errors import FOREIGN_FAULTS, PluginError
from sevsim.hw import run_foreign
from sevsim.kvm.events import EVENTS

HOOK_PREFIX = "sevsim_"


@frozen
class HookSink:
    """Forwards ``emit(name, **fields)`` to ``sevsim_<name>(**fields)``."""

    pm: pluggy.PluginManager
    wanted: frozenset[str]

    @classmethod
    def of(cls, pm: pluggy.PluginManager, events: Iterable[str] = EVENTS) -> HookSink:
        """A sink for the observers of ``events`` registered in ``pm`` now (kvm's
        events by default; :data:`sevsim.hw.SIM_EVENTS` for the simulator's view)."""
        wanted = {
            name
            for name in events
            if getattr(pm.hook, HOOK_PREFIX + name).get_hookimpls()
        }
        return cls(pm, frozenset(wanted))

    def wants(self, name: str) -> bool:
        return name in self.wanted

    def emit(self, name: str, /, **fields: Any) -> None:
        """Call every observer of ``name``; one that raises is named in a PluginError."""
        hook = getattr(self.pm.hook, HOOK_PREFIX + name)
        try:
            run_foreign(hook, **fields)
        except FOREIGN_FAULTS as e:  # sys.exit and overrunning the time limit included
            culprit = _culprit(hook, e)
            raise PluginError(
                f"plugin {culprit!r} failed in observer hook {hook.name}: "
                f"{type(e).__name__}: {e}", culprit
            ) from e


def _culprit(hook: pluggy.HookCaller, error: BaseException) -> str:
    """The plugin whose implementation is on ``error``'s traceback (pluggy does not say)."""
    owners = {
        getattr(impl.function, "__code__", None): impl.plugin_name
        for impl in hook.get_hookimpls()
    }
    tb = error.__traceback__
    culprit = "<unknown>"
    while tb is not None:
        culprit = owners.get(tb.tb_frame.f_code, culprit)
        tb = tb.tb_next
    return culprit
