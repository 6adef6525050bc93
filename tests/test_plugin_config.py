"""Plugin configuration: the file schema, the precedence chain, and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from sevsim.errors import ConfigError
from sevsim.kvm.dispatch import ExitKind
from sevsim.plugin.config import (
    PluginConfig,
    apply_cli,
    apply_env,
    apply_file,
    isolated_config,
    load_config,
    parse_code,
)


def write(tmp_path: Path, text: str, name: str = "sevsim.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_autoload_everything_and_are_not_strict() -> None:
    config = PluginConfig()
    assert config.decide("ioio", autoload_candidate=True) == (True, "autoloaded")
    assert config.decide("mine", autoload_candidate=False) == (True, "registered directly")
    assert not config.strict
    assert dict(config.settings_for("ioio")) == {}


def test_file_schema_is_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [plugins]
        enable = ["mmio"]
        disable = ["nmi"]
        autoload = false
        strict = true

        [plugins.owners]
        "0x7b" = "ioio"
        "msr_protocol:0x004" = "msr_protocol"
        144 = "crtraps"

        [plugins.settings.msr_protocol]
        min_version = 1
        max_version = 2

        [kvm]
        era = "newest"  # read by sevsim.vmm.config, accepted here
        """,
    )
    config = apply_file(PluginConfig(), path)
    assert config.enable == {"mmio"} and config.disable == {"nmi"}
    assert (config.autoload, config.strict) == (False, True)
    assert config.autoload_source == f"{path}: [plugins] autoload = false"
    assert [(r.kind, r.code, r.plugin) for r in config.owners] == [
        (None, 0x7B, "ioio"),
        (ExitKind.MSR_PROTOCOL, 0x004, "msr_protocol"),
        (None, 144, "crtraps"),
    ]
    assert dict(config.settings_for("msr_protocol")) == {"min_version": 1, "max_version": 2}
    assert config.settings_source("msr_protocol") == (
        f"{path}: [plugins.settings.msr_protocol]"
    )
    assert config.decide("nmi", autoload_candidate=True) == (False, f"disabled in {path}")
    assert config.decide("mmio", autoload_candidate=True) == (True, f"enabled in {path}")
    assert config.decide("ioio", autoload_candidate=True) == (
        False,
        f"autoload off ({path}: [plugins] autoload = false)",
    )


def test_settings_are_read_only(tmp_path: Path) -> None:
    config = apply_file(PluginConfig(), write(tmp_path, "[plugins.settings.ioio]\nports = 3\n"))
    with pytest.raises(TypeError):
        config.settings_for("ioio")["ports"] = 4  # type: ignore[index]


def test_precedence_chain_step_by_step(tmp_path: Path) -> None:
    """defaults < file < env < CLI, each step overriding the one before for 'ioio'."""
    config = PluginConfig()
    assert config.decide("ioio", autoload_candidate=True) == (True, "autoloaded")

    path = write(tmp_path, '[plugins]\ndisable = ["ioio"]\nenable = ["mmio"]\n')
    config = apply_file(config, path)
    assert config.decide("ioio", autoload_candidate=True) == (False, f"disabled in {path}")

    config = apply_env(config, {"SEVSIM_PLUGINS": "ioio, nmi"})
    assert config.decide("ioio", autoload_candidate=True) == (True, "listed in SEVSIM_PLUGINS")
    # The allow-list is "only those": the file's enable no longer counts.
    assert config.decide("mmio", autoload_candidate=True) == (
        False,
        "not listed in SEVSIM_PLUGINS",
    )

    config = apply_cli(config, ["no:ioio"])
    assert config.decide("ioio", autoload_candidate=True) == (False, "-p no:ioio")
    assert config.decide("nmi", autoload_candidate=True) == (True, "listed in SEVSIM_PLUGINS")

    config = apply_cli(config, ["mmio", "ioio"])  # the last mention wins
    assert config.decide("ioio", autoload_candidate=True) == (True, "-p ioio")
    assert config.decide("mmio", autoload_candidate=True) == (True, "-p mmio")


def test_disable_autoload_env_leaves_only_explicit_plugins(tmp_path: Path) -> None:
    path = write(tmp_path, '[plugins]\nautoload = true\nenable = ["mmio"]\n')
    config = apply_env(apply_file(PluginConfig(), path), {"SEVSIM_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert config.decide("ioio", autoload_candidate=True) == (
        False,
        "autoload off (SEVSIM_DISABLE_PLUGIN_AUTOLOAD=1)",
    )
    assert config.decide("mmio", autoload_candidate=True) == (True, f"enabled in {path}")
    assert config.decide("mine", autoload_candidate=False) == (True, "registered directly")
    config = apply_cli(config, ["ioio"])
    assert config.decide("ioio", autoload_candidate=True) == (True, "-p ioio")


def test_env_zero_does_not_turn_autoload_back_on(tmp_path: Path) -> None:
    config = apply_file(PluginConfig(), write(tmp_path, "[plugins]\nautoload = false\n"))
    config = apply_env(config, {"SEVSIM_DISABLE_PLUGIN_AUTOLOAD": "0", "SEVSIM_PLUGINS": ""})
    assert not config.autoload
    assert config.allow is None


def test_direct_registrations_obey_disable() -> None:
    config = apply_cli(PluginConfig(autoload=False), ["no:mine"])
    assert config.decide("mine", autoload_candidate=False) == (False, "-p no:mine")


def test_load_config_reads_sevsim_toml_in_cwd_then_env_then_cli(tmp_path: Path) -> None:
    write(tmp_path, '[plugins]\ndisable = ["ioio", "nmi"]\n')
    config = load_config(cwd=tmp_path, env={"SEVSIM_DISABLE_PLUGIN_AUTOLOAD": "yes"},
                         cli=["ioio"], strict=True)  # fmt: skip
    assert config.origin == str(tmp_path / "sevsim.toml")
    assert config.decide("nmi", autoload_candidate=True)[0] is False
    assert config.decide("ioio", autoload_candidate=True) == (True, "-p ioio")
    assert config.decide("mmio", autoload_candidate=True)[0] is False
    assert (config.strict, config.strict_source) == (True, "--strict")


def test_load_config_without_a_file_is_the_defaults(tmp_path: Path) -> None:
    config = load_config(cwd=tmp_path, env={})
    assert config == PluginConfig()


def test_explicit_config_path_wins_over_cwd(tmp_path: Path) -> None:
    write(tmp_path, '[plugins]\ndisable = ["ioio"]\n')
    other = write(tmp_path, '[plugins]\ndisable = ["nmi"]\n', name="other.toml")
    config = load_config(other, cwd=tmp_path, env={})
    assert config.disable == {"nmi"}


def test_isolated_config_ignores_environment_and_autoloads_nothing() -> None:
    config = isolated_config(enable=["msr_protocol"], owners={"0x7b": "ioio"},
                             settings={"msr_protocol": {"max_version": 1}})  # fmt: skip
    assert config.decide("ioio", autoload_candidate=True) == (
        False,
        "autoload off (isolated host)",
    )
    assert config.decide("msr_protocol", autoload_candidate=True)[0] is True
    assert config.strict
    assert config.owner_rule(ExitKind.VMGEXIT, 0x7B).plugin == "ioio"


def test_kind_specific_owner_rule_beats_the_general_one(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[plugins.owners]\n"0x4" = "general"\n"msr_protocol:0x004" = "specific"\n',
    )
    config = apply_file(PluginConfig(), path)
    assert config.owner_rule(ExitKind.MSR_PROTOCOL, 4).plugin == "specific"
    assert config.owner_rule(ExitKind.VMGEXIT, 4).plugin == "general"
    assert config.owner_rule(ExitKind.VMGEXIT, 5) is None


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("0x7b", (None, 0x7B)),
        ("0x7B", (None, 0x7B)),
        ("123", (None, 123)),
        (0x7B, (None, 0x7B)),
        ("vmgexit:0x8000_0001", (ExitKind.VMGEXIT, 0x8000_0001)),
        ("msr_protocol:0x004", (ExitKind.MSR_PROTOCOL, 4)),
        ("vmexit:0x90", (ExitKind.VMEXIT, 0x90)),
    ],
)
def test_parse_code(key: str | int, expected: tuple[ExitKind | None, int]) -> None:
    assert parse_code(key, "test") == expected


@pytest.mark.parametrize(
    ("toml", "fragments"),
    [
        ('[plugins]\nenabel = ["x"]\n', ["'enabel'", "[plugins]", "expected: autoload"]),
        ('[plugins]\nenable = "ioio"\n', ["enable = 'ioio'", "expected a list of plugin names"]),
        ("[plugins]\nenable = [1]\n", ["enable = [1]", "expected a list"]),
        ('[plugins]\nenable = ["a:b"]\n', ["'a:b' is not a plugin name"]),
        ('[plugins]\nautoload = "yes"\n', ["autoload = 'yes'", "expected true or false"]),
        ("[plugins]\nstrict = 1\n", ["strict = 1", "expected true or false"]),
        ('[plugins.owners]\nox7b = "ioio"\n', ["'ox7b'", "[plugins.owners]", 'like "0x7b"']),
        ('[plugins.owners]\n"cr:0x90" = "x"\n', ["'cr:0x90'", "unknown kind 'cr'", "vmexit"]),
        ('[plugins.owners]\n"-1" = "x"\n', ["'-1'", "not a 64-bit exit code"]),
        ('[plugins.owners]\n"0x7b" = 5\n', ["'0x7b' = 5", "expected the winning plugin"]),
        ('[plugins.owners]\n"0x7b" = ""\n', ["'0x7b' = ''", "expected the winning plugin"]),
        ("[plugins]\nowners = 3\n", ["[plugins.owners] = 3", "expected a table"]),
        ("[plugins.settings]\nioio = 3\n", ["[plugins.settings].ioio = 3", "expected a table"]),
        ('[plugins]\nenable = ["x"]\ndisable = ["x"]\n', ["'x'", "both enable and disable"]),
        ("plugins = 3\n", ["'plugins' must be a table", "3"]),
        ("[plugins\n", ["not valid TOML"]),
        ("[plugin]\nstrict = true\n", ["unknown top-level", "'plugin'", "[kvm], [plugins]"]),
        ('[kvm]\nera = "newest"\n[run]\nquiet = true\n', ["'run'", "[kvm], [plugins]"]),
        ("strict = true\n", ["top-level table(s) or key(s) 'strict'", "[plugins]"]),
    ],
)
def test_bad_file_input_names_value_origin_and_expectation(
    tmp_path: Path, toml: str, fragments: list[str]
) -> None:
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    message = str(info.value)
    assert message.startswith(str(path))
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    ("env", "fragments"),
    [
        ({"SEVSIM_DISABLE_PLUGIN_AUTOLOAD": "maybe"}, ["SEVSIM_DISABLE_PLUGIN_AUTOLOAD='maybe'",
                                                        "expected 1"]),
        ({"SEVSIM_PLUGINS": "ioio,no:x"}, ["SEVSIM_PLUGINS", "'no:x' is not a plugin name"]),
    ],
)  # fmt: skip
def test_bad_environment(env: dict[str, str], fragments: list[str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(cwd=tmp_path, env=env)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize("flag", ["no:", "", "a,b", "no:no:x"])
def test_bad_p_flag(flag: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected NAME or no:NAME") as info:
        load_config(cwd=tmp_path, env={}, cli=[flag])
    assert f"-p {flag!r}" in str(info.value)


def test_missing_explicit_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(missing, env={})
    assert str(missing) in str(info.value)


def test_mentions_list_every_name_with_its_origin(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[plugins]\nenable = ["a"]\ndisable = ["b"]\n'
        '[plugins.owners]\n"0x7b" = "c"\n[plugins.settings.d]\nx = 1\n',
    )
    config = load_config(path, env={"SEVSIM_PLUGINS": "e"}, cli=["no:f"])
    assert [(m.name, m.source) for m in config.mentions()] == [
        ("a", f"{path}: [plugins] enable"),
        ("b", f"{path}: [plugins] disable"),
        ("e", "SEVSIM_PLUGINS"),
        ("f", "-p no:f"),
        ("c", f"{path}: [plugins.owners] '0x7b' = 'c'"),
        ("d", f"{path}: [plugins.settings.d]"),
    ]


def test_every_table_the_project_reads_is_accepted_and_nothing_else(tmp_path: Path) -> None:
    from sevsim.plugin.config import TABLES
    from sevsim.vmm.config import load_kvm_settings

    assert set(TABLES) == {"kvm", "plugins"}
    path = write(tmp_path, '[kvm]\nera = "v5.11"\n[plugins]\nstrict = true\n')
    assert load_config(path, env={}).strict
    assert load_kvm_settings(path).era == "v5.11"
    # [kvm]'s own reader refuses a stray table too, even when called on its own.
    path = write(tmp_path, '[kvm]\nera = "v5.11"\n[kvmm]\nera = "newest"\n')
    with pytest.raises(ConfigError, match=r"unknown top-level table\(s\) or key\(s\) 'kvmm'"):
        load_kvm_settings(path)
