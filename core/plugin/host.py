"""The plugin host: loads the enabled plugins and builds the one exit table.

Start-up, in order: discover candidates (entry points, direct objects) without
importing them; check every plugin name the configuration mentions; block the
disabled ones in pluggy *before* anything is imported; import and register the
rest, each on its own so that one broken plugin is reported (name and error) and
skipped; hand each plugin its own settings (``sevsim_configure``); collect and stamp
its :class:`~sevsim.kvm.dispatch.ExitHandler` records; settle conflicts with
``[plugins.owners]`` or report them; build the :class:`~sevsim.kvm.dispatch.ExitTable`.

Loading never raises for a plugin's fault, so ``sevsim plugins`` can list a broken
installation; :meth:`PluginHost.start` is where fatal problems (a conflict, rejected
settings, any failure under strict) stop the run. "A plugin's fault" includes a
plugin that calls ``sys.exit()`` while it is imported or configured (SystemExit is
caught like any exception there); only KeyboardInterrupt and GeneratorExit pass.

Settings and owner rules are checked against what the active plugins really do:

- ``[plugins.settings.NAME]`` for an active plugin that has no way to read it (no
  ``sevsim_configure`` hook and no ``sevsim_exit_handlers`` taking ``config``) is
  refused like settings the plugin rejected (the plugin fails, fatally): it would
  otherwise be ignored without a word. A plugin that wants settings implements
  ``sevsim_configure`` and validates them there.
- A ``[plugins.owners]`` rule that settles nothing is a problem: naming an active
  plugin that does not claim that code is fatal (that rule is wrong whichever other
  plugins load); naming the only active claimant of a code is reported (listed by
  ``sevsim plugins check``, a warning for ``sevsim run``, fatal under strict), since
  it is right as soon as the rival plugin is enabled again. A rule naming a plugin
  that is disabled or failed is not checked: a disabled plugin is never imported, so
  what it claims is unknown, just as naming it in ``disable`` is fine. A name that
  no installed plugin has is an error, as for every name the configuration mentions.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable, Mapping
from contextlib import redirect_stdout
from typing import Any

import pluggy
from attrs import define, evolve, field, frozen

from sevsim.errors import FOREIGN_FAULTS, ConfigError, ForeignBaseException, PluginError
from sevsim.hw import SIM_EVENTS, run_foreign
from sevsim.kvm.dispatch import ExitHandler, ExitKind, ExitTable
from sevsim.kvm.extensions import LIFECYCLE, Extensions, PluginPart
from sevsim.plugin import hookspecs
from sevsim.plugin.config import PluginConfig
from sevsim.plugin.discovery import Candidate, discover, module_candidate
from sevsim.plugin.sink import HOOK_PREFIX, HookSink

ACTIVE = "active"
DISABLED = "disabled"
FAILED = "failed"


@frozen
class PluginInfo:
    """One row of ``sevsim plugins``."""

    name: str
    version: str | None
    #: "builtin", "entry point: <distribution>" or "direct".
    source: str
    #: ACTIVE, DISABLED or FAILED.
    status: str
    #: Why it has that status: "autoloaded", "-p no:ioio", "ImportError: ...".
    why: str
    #: The dispatch-table rows this plugin owns.
    owns: tuple[ExitHandler, ...] = ()
    #: Its claims in unsettled conflicts: in no table until the conflict is settled.
    contested: tuple[ExitHandler, ...] = ()
    #: The hooks it implements besides its exit handlers (state, lifecycle, observers,
    #: and the simulator's view, ``sevsim_sim_*``).
    hooks: tuple[str, ...] = ()

    @property
    def status_line(self) -> str:
        return self.status if self.status == ACTIVE else f"{self.status}: {self.why}"

    @property
    def sim_hooks(self) -> tuple[str, ...]:
        """Its hooks that get the simulator's view (``sevsim_sim_*``): what no real
        hypervisor sees and no exit handler receives, such as guest RIPs."""
        family = {HOOK_PREFIX + event for event in SIM_EVENTS}
        return tuple(hook for hook in self.hooks if hook in family)


@frozen
class Problem:
    """A plugin that failed, or a conflict. Fatal ones stop :meth:`PluginHost.start`;
    the others (a failed plugin, skipped) do too under strict."""

    message: str
    fatal: bool


class _RejectedSettings(Exception):
    """A plugin's ``sevsim_configure`` raised ConfigError, or the plugin takes no
    settings but was given some: the user's input, always fatal."""


def _by_code(claims: list[ExitHandler]) -> dict[tuple[ExitKind, int], list[ExitHandler]]:
    """The claims grouped by the (kind, code) they claim."""
    grouped: dict[tuple[ExitKind, int], list[ExitHandler]] = {}
    for claim in claims:
        grouped.setdefault((claim.kind, claim.code), []).append(claim)
    return grouped


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _failure(error: BaseException) -> str:
    if isinstance(error, (_RejectedSettings, PluginError)):
        return _one_line(str(error))
    if isinstance(error, SystemExit):
        code = "" if error.code is None else repr(error.code)
        return f"SystemExit: the plugin called sys.exit({code})"
    if isinstance(error, ForeignBaseException):
        error = error.original
    return _one_line(f"{type(error).__name__}: {error}")


#: Hooks that receive the plugin's configuration (``config``).
_CONFIG_READERS = ("sevsim_exit_handlers", "sevsim_vm_state", "sevsim_vcpu_state")


def _call(impl: pluggy.HookImpl, **kwargs: Any) -> Any:
    """Call one plugin's implementation with the arguments it asks for."""
    return impl.function(*(kwargs[name] for name in impl.argnames))


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _names(names: Iterable[str]) -> str:
    quoted = [repr(n) for n in names]
    if len(quoted) == 2:
        return f"both {quoted[0]} and {quoted[1]}"
    return ", ".join(quoted[:-1]) + f" and {quoted[-1]}"


def _owners_key(kind: ExitKind, code: int) -> str:
    """The ``[plugins.owners]`` key for a code: bare hex for the common VMGEXIT case."""
    number = f"{code:#05x}" if kind is ExitKind.MSR_PROTOCOL else f"{code:#x}"
    return number if kind is ExitKind.VMGEXIT else f"{kind.value}:{number}"


def _as_dict(plugins: Mapping[str, object]) -> dict[str, object]:
    """The directly registered plugins, copied: the caller's mapping may change later."""
    return dict(plugins)


@define
class PluginHost:
    """Loads plugins per ``config`` (plus ``plugins``, objects registered directly by
    name) and gives kvm its exit table (:meth:`start`) and event sink (:attr:`events`).

    Loading happens once, on first use; register direct plugins before that.
    """

    config: PluginConfig = field(factory=PluginConfig)
    _direct: dict[str, object] = field(factory=dict, converter=_as_dict, alias="plugins")
    _pm: pluggy.PluginManager = field(init=False, factory=_new_manager)
    _infos: dict[str, PluginInfo] | None = field(init=False, default=None)
    _problems: list[Problem] = field(init=False, factory=list)
    _extensions: Extensions = field(init=False, factory=Extensions)
    _events: HookSink | None = field(init=False, default=None)
    _sim: HookSink | None = field(init=False, default=None)

    # --- public API --------------------------------------------------------------------

    def register(self, name: str, plugin: object) -> None:
        """Add ``plugin`` (a module or any object with ``@hookimpl`` methods) as ``name``."""
        if self._infos is not None:
            raise PluginError(f"cannot register plugin {name!r}: the host has already loaded")
        if not name or name in self._direct:
            raise PluginError(f"cannot register plugin {name!r}: name empty or already used")
        self._direct[name] = plugin

    def start(self) -> Extensions:
        """What kvm needs of the plugins (the dispatch table, each plugin's state and
        lifecycle hooks); raises PluginError if a fatal problem stops start-up."""
        self.load()
        strict = self.config.strict
        fatal = [p for p in self._problems if p.fatal or strict]
        if fatal:
            message = "; ".join(p.message for p in fatal)
            if strict and not all(p.fatal for p in fatal):
                message += f" (fatal in strict mode: {self.config.strict_source})"
            raise PluginError(message)
        return self._extensions

    @property
    def events(self) -> HookSink:
        """The EventSink for kvm: forwards events to the observer hooks."""
        self.load()
        assert self._events is not None
        return self._events

    @property
    def sim(self) -> HookSink:
        """The SimSink for the platform: the simulator's view, to the ``sevsim_sim_*``
        hooks."""
        self.load()
        assert self._sim is not None
        return self._sim

    @property
    def plugin_manager(self) -> pluggy.PluginManager:
        self.load()
        return self._pm

    def plugins(self) -> list[PluginInfo]:
        """Every known plugin (active, disabled, failed), by name."""
        self.load()
        assert self._infos is not None
        return [self._infos[name] for name in sorted(self._infos)]

    def problems(self) -> list[Problem]:
        """Failed plugins and conflicts, in the order found."""
        self.load()
        return list(self._problems)

    # --- loading -----------------------------------------------------------------------

    def load(self) -> None:
        """Discover, block, import, register, configure and collect; once."""
        if self._infos is not None:
            return
        candidates = discover(self._direct)
        for name, enabled in self.config.cli:  # -p some.module: an uninstalled plugin
            if enabled and name not in candidates:
                module = module_candidate(name)
                if module is not None:
                    candidates[name] = module
        self._check_mentions(candidates)
        infos: dict[str, PluginInfo] = {}
        claims: list[ExitHandler] = []
        parts: list[PluginPart] = []
        for name in sorted(candidates):
            candidate = candidates[name]
            enabled, why = self.config.decide(
                name, autoload_candidate=candidate.autoload_candidate
            )
            if not enabled:
                self._pm.set_blocked(name)  # before import: the module never runs
                infos[name] = self._info(candidate, DISABLED, why)
                continue
            try:
                owned, part = self._activate(candidate)
            except _RejectedSettings as e:
                infos[name] = self._info(candidate, FAILED, _failure(e))
                self._problems.append(Problem(_failure(e), fatal=True))
                continue
            except FOREIGN_FAULTS as e:
                infos[name] = self._info(candidate, FAILED, _failure(e))
                self._problems.append(
                    Problem(f"plugin {name!r} failed to load: {_failure(e)}", fatal=False)
                )
                continue
            infos[name] = evolve(self._info(candidate, ACTIVE, why), hooks=self._hooks_of(name))
            claims.extend(owned)
            parts.append(part)
        kept, contested = self._settle(claims)
        self._check_owner_rules(infos, claims)
        self._extensions = Extensions(ExitTable(kept), tuple(parts))
        for name, info in infos.items():
            owns = tuple(entry for entry in kept if entry.plugin == name)
            claimed = tuple(entry for entry in contested if entry.plugin == name)
            infos[name] = evolve(info, owns=owns, contested=claimed)
        self._infos = infos
        self._events = HookSink.of(self._pm)
        self._sim = HookSink.of(self._pm, SIM_EVENTS)

    def _check_mentions(self, candidates: Mapping[str, Candidate]) -> None:
        known = ", ".join(sorted(candidates)) or "none"
        for mention in self.config.mentions():
            if mention.name not in candidates:
                raise ConfigError(
                    f"{mention.source}: no plugin named {mention.name!r} is installed; "
                    f"known plugins: {known}"
                )

    @staticmethod
    def _info(candidate: Candidate, status: str, why: str) -> PluginInfo:
        return PluginInfo(candidate.name, candidate.version, candidate.source, status, why)

    def _activate(self, candidate: Candidate) -> tuple[list[ExitHandler], PluginPart]:
        """Import, register, configure; the plugin's records, stamped with its name,
        and its part in every VM (state factories, lifecycle hooks).

        What the plugin prints meanwhile goes to stderr: stdout belongs to the command
        (``sevsim plugins --json`` must stay one JSON document).
        """
        if candidate.problem:
            raise PluginError(candidate.problem)
        with redirect_stdout(sys.stderr):
            plugin = run_foreign(candidate.load)
            self._pm.register(plugin, name=candidate.name)
            try:
                self._check_hooks(plugin)
                config = run_foreign(self._configure, candidate.name)
                records = run_foreign(self._collect, candidate.name, config)
                return records, self._part(candidate.name, config)
            except BaseException:
                self._pm.unregister(plugin)
                raise

    def _part(self, name: str, config: Any) -> PluginPart:
        """The plugin's state factories (called with its ``config``) and lifecycle hooks."""
        factories = []
        for hook in ("sevsim_vm_state", "sevsim_vcpu_state"):
            impls = self._impls(hook, name)
            factories.append((lambda impl=impls[0]: _call(impl, config=config)) if impls else None)
        lifecycle = {}
        for hook in LIFECYCLE:
            for impl in self._impls(f"sevsim_{hook}", name):
                lifecycle[hook] = lambda impl=impl, **args: _call(impl, **args)
        return PluginPart(name, factories[0], factories[1], lifecycle)

    def _hooks_of(self, name: str) -> tuple[str, ...]:
        plugin = self._pm.get_plugin(name)
        callers = self._pm.get_hookcallers(plugin) or ()
        own = ("sevsim_configure", "sevsim_exit_handlers")
        return tuple(sorted(c.name for c in callers if c.name not in own))

    def _check_hooks(self, plugin: object) -> None:
        """Refuse hook names pluggy would silently ignore: typos and unmarked functions."""
        specs = [n for n in dir(hookspecs) if n.startswith(HOOK_PREFIX)]
        for caller in self._pm.get_hookcallers(plugin) or ():
            mine = [i for i in caller.get_hookimpls() if i.plugin is plugin]
            if not caller.has_spec() and not all(i.optionalhook for i in mine):
                close = difflib.get_close_matches(caller.name, specs, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise PluginError(f"implements unknown hook {caller.name}{hint}")
        for attr in dir(plugin):
            if (
                attr.startswith(HOOK_PREFIX)
                and callable(getattr(plugin, attr, None))
                and self._pm.parse_hookimpl_opts(plugin, attr) is None
            ):
                raise PluginError(
                    f"{attr} is not marked @hookimpl "
                    "(from sevsim.plugin.hookspecs import hookimpl), so it would never run"
                )

    def _impls(self, hook: str, name: str) -> list[pluggy.HookImpl]:
        caller = getattr(self._pm.hook, hook)
        return [i for i in caller.get_hookimpls() if i.plugin_name == name]

    def _configure(self, name: str) -> Any:
        settings = self.config.settings_for(name)
        impls = self._impls("sevsim_configure", name)
        readers = [i for hook in _CONFIG_READERS for i in self._impls(hook, name)
                   if "config" in i.argnames]  # fmt: skip
        if name in self.config.settings and not impls and not readers:
            raise _RejectedSettings(
                f"{self.config.settings_source(name)}: plugin {name!r} takes no settings "
                "(it implements neither sevsim_configure nor a hook taking config), "
                "so this table would be ignored; remove it"
            )
        for impl in impls:
            try:
                result = _call(impl, settings=settings)
            except ConfigError as e:
                raise _RejectedSettings(
                    f"{self.config.settings_source(name)}: "
                    f"plugin {name!r} rejected its settings: {e}"
                ) from e
            return settings if result is None else result
        return settings

    def _collect(self, name: str, config: Any) -> list[ExitHandler]:
        records: dict[tuple[ExitKind, int], ExitHandler] = {}
        for impl in self._impls("sevsim_exit_handlers", name):
            for record in _call(impl, config=config) or ():
                if not isinstance(record, ExitHandler):
                    raise PluginError(
                        f"sevsim_exit_handlers gave {record!r}; expected "
                        "sevsim.kvm.dispatch.ExitHandler records"
                    )
                key = (record.kind, record.code)
                if key in records:
                    raise PluginError(f"sevsim_exit_handlers claims {record.describe()} twice")
                records[key] = evolve(record, plugin=name)
        return list(records.values())

    def _settle(
        self, claims: list[ExitHandler]
    ) -> tuple[list[ExitHandler], list[ExitHandler]]:
        """(kept, contested): one record per (kind, code), a sole claim or the owner
        rule's choice; the claims in unsettled conflicts, each a fatal problem."""
        grouped = _by_code(claims)
        kept, contested = [], []
        for (kind, code), group in sorted(grouped.items(), key=lambda g: (g[0][0].value, g[0][1])):
            rule = self.config.owner_rule(kind, code) if len(group) > 1 else None
            winner = [c for c in group if rule is None or c.plugin == rule.plugin]
            if len(winner) == 1:
                kept.append(winner[0])
                continue
            names = [str(c.plugin) for c in group]
            message = (
                f"exit code conflict: {group[0].describe()} is claimed by {_names(names)}; "
                f"fix: disable one with {' or '.join(f'-p no:{n}' for n in names)}, "
                f"or settle it in sevsim.toml: [plugins.owners] "
                f'"{_owners_key(kind, code)}" = "{names[0]}"'
            )
            if rule is not None:
                message += f" ({rule.source} names a plugin that does not claim it)"
            self._problems.append(Problem(message, True))
            contested.extend(group)
        return kept, contested

    def _check_owner_rules(
        self, infos: Mapping[str, PluginInfo], claims: list[ExitHandler]
    ) -> None:
        """Report the ``[plugins.owners]`` rules that settle nothing (see the module doc).

        A rule settles something when it is the rule :meth:`PluginConfig.owner_rule`
        picks for a code two or more active plugins claim; a rule picked for such a
        code but naming a non-claimant is already part of that conflict's message.
        """
        grouped = _by_code(claims)
        for rule in self.config.owners:
            info = infos.get(rule.plugin)
            if info is None or info.status != ACTIVE:
                continue  # disabled or failed: what it would claim is unknown
            matching = {
                key: group for key, group in grouped.items()
                if key[1] == rule.code and rule.kind in (None, key[0])
            }  # fmt: skip
            contested = [key for key, group in matching.items() if len(group) > 1]
            if any(self.config.owner_rule(*key) == rule for key in contested):
                continue
            mine = [c for group in matching.values() for c in group if c.plugin == rule.plugin]
            if not mine:
                code = f"{rule.code:#x}"
                if rule.kind is not None:
                    code = f"{rule.kind.value} {code}"
                owned = [c.describe() for c in claims if c.plugin == rule.plugin]
                self._problems.append(Problem(
                    f"{rule.source}: plugin {rule.plugin!r} does not claim exit code {code} "
                    f"(it claims {', '.join(owned) or 'no exit code'}), so the rule can never "
                    "apply; fix the code or the plugin name, or remove the rule",
                    fatal=True,
                ))  # fmt: skip
                continue
            if contested:
                other = self.config.owner_rule(*contested[0])
                assert other is not None
                why = f"{other.source} decides {matching[contested[0]][0].describe()} instead"
            else:
                why = (
                    f"{rule.plugin!r} is the only active plugin claiming {mine[0].describe()}; "
                    "remove the rule unless a rival claimant is enabled again"
                )
            self._problems.append(Problem(f"{rule.source} settles nothing: {why}", fatal=False))
