"""Which plugins load, who wins a conflict, and each plugin's settings.

Four layers, each overriding the one before: defaults < ``sevsim.toml`` (or an
explicit file) < environment (``SEVSIM_PLUGINS``, ``SEVSIM_DISABLE_PLUGIN_AUTOLOAD``)
< command line (``-p NAME`` / ``-p no:NAME``, the last mention of a name wins;
``--strict``). :class:`PluginConfig` keeps every value together with where it came
from, so that an error or a listing can say "disabled by -p no:ioio" or point at the
line of ``sevsim.toml`` to fix. Names are checked against the installed plugins by
the host, which is the one that knows them.
"""

from __future__ import annotations

import os
import sys
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from attrs import evolve, field, frozen

from sevsim.errors import ConfigError
from sevsim.kvm.dispatch import ExitKind

CONFIG_FILE = "sevsim.toml"
ENV_ALLOW = "SEVSIM_PLUGINS"
ENV_NO_AUTOLOAD = "SEVSIM_DISABLE_PLUGIN_AUTOLOAD"

#: Every top-level table of ``sevsim.toml`` and the module that reads it; anything
#: else in the file is refused, so a misspelt table name is an error, not ignored.
TABLES = {
    "kvm": "sevsim.vmm.config",
    "plugins": "sevsim.plugin.config",
}
_PLUGINS_KEYS = ("autoload", "disable", "enable", "owners", "settings", "strict")
_MAX_CODE = (1 << 64) - 1
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@frozen
class OwnerRule:
    """``[plugins.owners]``: on a conflict over ``code`` (of ``kind``, or of any kind
    when ``kind`` is None), ``plugin``'s claim wins."""

    kind: ExitKind | None
    code: int
    plugin: str
    source: str


@frozen
class Mention:
    """A plugin name the configuration refers to, and where; the host checks it exists."""

    name: str
    source: str


def _readonly(value: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Mapping[str, Any]]:
    return MappingProxyType({k: MappingProxyType(dict(v)) for k, v in value.items()})


@frozen
class PluginConfig:
    """The resolved plugin configuration; build it with :func:`load_config` or
    :func:`isolated_config`."""

    autoload: bool = True
    autoload_source: str = "default"
    strict: bool = False
    strict_source: str = "default"
    enable: frozenset[str] = frozenset()
    disable: frozenset[str] = frozenset()
    #: Where ``enable``/``disable``/``owners``/``settings`` were read (a path, or a caller).
    origin: str = "defaults"
    #: ``SEVSIM_PLUGINS``: when set, only these load (below the command line).
    allow: frozenset[str] | None = None
    #: ``-p`` flags in order: (name, enabled); the last mention of a name wins.
    cli: tuple[tuple[str, bool], ...] = ()
    owners: tuple[OwnerRule, ...] = ()
    settings: Mapping[str, Mapping[str, Any]] = field(
        factory=dict, converter=_readonly, repr=False
    )

    def decide(self, name: str, *, autoload_candidate: bool) -> tuple[bool, str]:
        """Whether plugin ``name`` loads, and the reason, highest layer first.

        ``autoload_candidate`` is False for plugin objects registered directly by
        code: those load unless something disables them, whatever ``autoload`` says.
        """
        for flag_name, enabled in reversed(self.cli):
            if flag_name == name:
                return enabled, f"-p {name}" if enabled else f"-p no:{name}"
        if self.allow is not None:
            if name in self.allow:
                return True, f"listed in {ENV_ALLOW}"
            return False, f"not listed in {ENV_ALLOW}"
        if name in self.disable:
            return False, f"disabled in {self.origin}"
        if name in self.enable:
            return True, f"enabled in {self.origin}"
        if not autoload_candidate:
            return True, "registered directly"
        if self.autoload:
            return True, "autoloaded"
        return False, f"autoload off ({self.autoload_source})"

    def owner_rule(self, kind: ExitKind, code: int) -> OwnerRule | None:
        """The rule settling a conflict over ``(kind, code)``; a kind-specific one wins."""
        rules = [r for r in self.owners if r.code == code and r.kind in (kind, None)]
        rules.sort(key=lambda r: r.kind is None)
        return rules[0] if rules else None

    def settings_for(self, name: str) -> Mapping[str, Any]:
        return self.settings.get(name, MappingProxyType({}))

    def settings_source(self, name: str) -> str:
        if name in self.settings:
            return f"{self.origin}: [plugins.settings.{name}]"
        return f"no [plugins.settings.{name}] table"

    def mentions(self) -> Iterator[Mention]:
        """Every plugin name this configuration refers to, with where it did."""
        for key in ("enable", "disable"):
            for name in sorted(getattr(self, key)):
                yield Mention(name, f"{self.origin}: [plugins] {key}")
        for name in sorted(self.allow or ()):
            yield Mention(name, ENV_ALLOW)
        for name, enabled in self.cli:
            yield Mention(name, f"-p {name}" if enabled else f"-p no:{name}")
        for rule in self.owners:
            yield Mention(rule.plugin, rule.source)
        for name in self.settings:
            yield Mention(name, f"{self.origin}: [plugins.settings.{name}]")


# --- building a configuration ---------------------------------------------------------


def config_file(path: str | Path | None, cwd: str | Path | None = None) -> Path | None:
    """The file a command reads: ``--config FILE`` (must exist), else ``./sevsim.toml``
    if there is anything by that name (a directory or a dangling link there is an
    error, not a file to skip: the user meant it to be read)."""
    if path is not None:
        return _readable(Path(path), "(--config)")
    default = Path(cwd or ".") / CONFIG_FILE
    return _readable(default, "") if os.path.lexists(default) else None


def _readable(file: Path, origin: str) -> Path:
    where = f"config file {str(file)!r}" + (f" {origin}" if origin else "")
    if file.is_file():
        return file
    if file.is_dir():
        raise ConfigError(f"{where} is a directory; expected a TOML file")
    if os.path.lexists(file):
        raise ConfigError(f"{where} is a symbolic link that leads to no file (dangling, or "
                          "a loop); expected a TOML file")  # fmt: skip
    raise ConfigError(f"{where} does not exist")


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML document; errors name the file and what is wrong.

    tomllib raises more than TOMLDecodeError for hostile input: UnicodeDecodeError
    for bytes that are not UTF-8, RecursionError for arrays nested thousands deep and
    ValueError for an integer longer than Python converts (4300 digits): each is the
    file's fault and gets one line naming it.
    """
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: byte {raw[e.start]:#04x} is not valid UTF-8; "
                          "TOML files are UTF-8 text") from None  # fmt: skip
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: arrays or tables nested too deeply to read; "
                          "sevsim.toml needs a few levels at most") from None  # fmt: skip
    except ValueError:  # int(): more digits than sys.get_int_max_str_digits()
        raise ConfigError(f"{path}: not valid TOML for sevsim: an integer has more than "
                          f"{sys.get_int_max_str_digits()} digits") from None  # fmt: skip


def check_tables(document: Mapping[str, Any], where: str) -> None:
    """Refuse top-level keys of ``sevsim.toml`` that no part of sevsim reads."""
    unknown = sorted(set(document) - set(TABLES))
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        accepted = ", ".join(f"[{t}]" for t in TABLES)
        raise ConfigError(
            f"{where}: unknown top-level table(s) or key(s) {names}; "
            f"sevsim.toml has only these tables: {accepted}"
        )


def load_config(
    path: str | Path | None = None,
    *,
    cli: Sequence[str] = (),
    strict: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    over_file: Callable[[PluginConfig], PluginConfig] | None = None,
) -> PluginConfig:
    """The configuration a ``sevsim`` command runs with.

    ``path`` is ``--config FILE`` (which must exist); without it ``sevsim.toml`` in
    ``cwd`` is read if present. ``cli`` holds the ``-p`` values in command-line order,
    ``strict`` is ``--strict``. ``env`` defaults to ``os.environ``. ``over_file`` is a
    layer between the file and the environment (a guest manifest's ``[plugins]``).
    """
    config = PluginConfig()
    file = config_file(path, cwd)
    if file is not None:
        config = apply_file(config, file)
    if over_file is not None:
        config = over_file(config)
    config = apply_env(config, os.environ if env is None else env)
    config = apply_cli(config, cli)
    if strict:
        config = evolve(config, strict=True, strict_source="--strict")
    return config


def isolated_config(
    *,
    enable: Iterable[str] = (),
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    owners: Mapping[str | int, str] | None = None,
    strict: bool = True,
) -> PluginConfig:
    """A configuration that reads neither files nor the environment, autoload off.

    For tests (:func:`sevsim.testing.isolated_host`): only plugins passed in directly
    and the installed ones named in ``enable`` load. ``owners`` takes the same keys as
    ``[plugins.owners]`` (``"0x7b"``, ``"msr_protocol:0x004"`` or an int).
    """
    origin = "isolated_host()"
    return PluginConfig(
        autoload=False,
        autoload_source="isolated host",
        strict=strict,
        strict_source="isolated host",
        enable=frozenset(_names(list(enable), f"{origin}: enable")),
        origin=origin,
        owners=_owners(dict(owners or {}), f"{origin}: owners"),
        settings=_settings(dict(settings or {}), f"{origin}: settings"),
    )


def apply_file(config: PluginConfig, path: Path) -> PluginConfig:
    """The ``[plugins]`` table of ``path`` over ``config``.

    The other tables (:data:`TABLES`) are read by their own modules, but the file is
    checked here as a whole: a top-level name no module reads is an error.
    """
    document = read_toml(path)
    check_tables(document, str(path))
    return apply_table(config, document.get("plugins", {}), str(path))


def apply_table(config: PluginConfig, table: Any, where: str) -> PluginConfig:
    """A ``[plugins]`` table (sevsim.toml's or a guest manifest's) over ``config``;
    ``where`` names its origin in errors and in ``sevsim plugins``."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: 'plugins' must be a table ([plugins]), got {table!r}")
    unknown = sorted(set(table) - set(_PLUGINS_KEYS))
    if unknown:
        raise ConfigError(
            f"{where}: [plugins] has unknown key(s) {', '.join(map(repr, unknown))}; "
            f"expected: {', '.join(_PLUGINS_KEYS)}"
        )
    changes: dict[str, Any] = {"origin": where}
    for key in ("autoload", "strict"):
        if key in table:
            value = table[key]
            if not isinstance(value, bool):
                raise ConfigError(
                    f"{where}: [plugins] {key} = {value!r}: expected true or false"
                )
            changes[key] = value
            changes[f"{key}_source"] = f"{where}: [plugins] {key} = {str(value).lower()}"
    enable = frozenset(_names(table.get("enable", []), f"{where}: [plugins] enable"))
    disable = frozenset(_names(table.get("disable", []), f"{where}: [plugins] disable"))
    both = sorted(enable & disable)
    if both:
        raise ConfigError(
            f"{where}: [plugins] lists {', '.join(map(repr, both))} in both enable and "
            "disable; keep each name in one of them"
        )
    return evolve(
        config,
        enable=enable,
        disable=disable,
        owners=_owners(table.get("owners", {}), f"{where}: [plugins.owners]"),
        settings=_settings(table.get("settings", {}), f"{where}: [plugins.settings]"),
        **changes,
    )


def apply_env(config: PluginConfig, env: Mapping[str, str]) -> PluginConfig:
    """``SEVSIM_PLUGINS`` (allow-list) and ``SEVSIM_DISABLE_PLUGIN_AUTOLOAD`` over ``config``."""
    raw = env.get(ENV_NO_AUTOLOAD, "").strip()
    if raw.lower() in _TRUE:
        config = evolve(config, autoload=False, autoload_source=f"{ENV_NO_AUTOLOAD}={raw}")
    elif raw.lower() not in (*_FALSE, ""):
        raise ConfigError(
            f"environment {ENV_NO_AUTOLOAD}={raw!r}: expected 1 (no autoload) or 0"
        )
    allow = env.get(ENV_ALLOW, "")
    if allow.strip():
        names = [n.strip() for n in allow.split(",") if n.strip()]
        config = evolve(config, allow=frozenset(_names(names, f"environment {ENV_ALLOW}")))
    return config


def apply_cli(config: PluginConfig, flags: Sequence[str]) -> PluginConfig:
    """``-p NAME`` / ``-p no:NAME`` values, in order, over ``config``."""
    parsed = []
    for flag in flags:
        enabled = not flag.startswith("no:")
        name = flag if enabled else flag[3:]
        if not _is_name(name):
            raise ConfigError(
                f"-p {flag!r}: expected NAME or no:NAME, NAME a plugin such as 'msr_protocol'"
            )
        parsed.append((name, enabled))
    return evolve(config, cli=config.cli + tuple(parsed))


# --- value parsers: every failure names the value, its origin and what was expected ----


def _is_name(name: str) -> bool:
    """Entry-point names are free-form; refuse only what cannot be meant as one."""
    return bool(name) and name.strip() == name and not any(c in name for c in ":, ")


def _names(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} = {value!r}: expected a list of plugin names (strings)")
    for name in value:
        if not _is_name(name):
            raise ConfigError(
                f"{where}: {name!r} is not a plugin name (expected e.g. 'msr_protocol')"
            )
    return value


def parse_code(key: str | int, where: str) -> tuple[ExitKind | None, int]:
    """``"0x7b"``, ``"123"``, ``"msr_protocol:0x004"`` or an int -> (kind or None, code)."""
    kinds = ", ".join(k.value for k in ExitKind)
    expected = f'expected an exit code like "0x7b" or "KIND:0x7b" with KIND one of {kinds}'
    kind = None
    if isinstance(key, bool) or not isinstance(key, int | str):
        raise ConfigError(f"{where}: {key!r}: {expected}")
    if isinstance(key, int):
        code = key
    else:
        prefix, colon, number = key.rpartition(":")
        if colon:
            try:
                kind = ExitKind(prefix.strip())
            except ValueError:
                raise ConfigError(
                    f"{where}: {key!r}: unknown kind {prefix!r}; {expected}"
                ) from None
        try:
            code = int(number.strip(), 0)
        except ValueError:
            raise ConfigError(f"{where}: {key!r}: {expected}") from None
    if not 0 <= code <= _MAX_CODE:
        raise ConfigError(f"{where}: {key!r}: {code:#x} is not a 64-bit exit code")
    return kind, code


def _owners(table: Any, where: str) -> tuple[OwnerRule, ...]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} = {table!r}: expected a table of CODE = \"plugin\"")
    rules = []
    for key, plugin in table.items():
        kind, code = parse_code(key, where)
        source = f"{where} {key!r}"
        if not isinstance(plugin, str) or not plugin:
            raise ConfigError(f"{source} = {plugin!r}: expected the winning plugin's name")
        rules.append(OwnerRule(kind, code, plugin, f"{source} = {plugin!r}"))
    return tuple(rules)


def _settings(table: Any, where: str) -> dict[str, Mapping[str, Any]]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} = {table!r}: expected one table per plugin")
    for name, value in table.items():
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{where}.{name} = {value!r}: expected a table ([plugins.settings.{name}])"
            )
    return table
