"""``sevsim``'s exit statuses, ``run --timeout`` validation and ``sevsim.toml`` strictness
through the command line."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sevsim.cli import main
from sevsim.kvm.exits import (
    Hlt,
    InternalError,
    InternalErrorSub,
    KvmExit,
    RunFailed,
    Shutdown,
    SystemEvent,
    SystemEventType,
)
from sevsim.vmm.runner import abnormal_end


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No sevsim.toml and no SEVSIM_* variables unless a test writes them."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SEVSIM_PLUGINS", raising=False)
    monkeypatch.delenv("SEVSIM_DISABLE_PLUGIN_AUTOLOAD", raising=False)


# --- which ends of a run are normal -----------------------------------------------------


def sev_term(msr: int) -> SystemEvent:
    return SystemEvent(SystemEventType.SEV_TERM, (msr,))


@pytest.mark.parametrize("exit_", [Hlt(), sev_term(0x100)])
def test_normal_ends(exit_: KvmExit) -> None:
    assert abnormal_end(exit_) is None


@pytest.mark.parametrize(
    ("exit_", "why"),
    [
        (sev_term(0x10100), "the guest asked to terminate with a failure reason: system event "
                            "SEV_TERM [0x10100]: TERM_REQ set 0 code 1 "
                            "(GHCB_SEV_ES_PROT_UNSUPPORTED) (a normal end is reason set 0 "
                            "code 0, or HLT)"),
        (sev_term(0x1100), "TERM_REQ set 1 code 0"),
        (sev_term(0x32100), "TERM_REQ set 2 code 3 (sevsim #VC handler: VMM_ERROR)"),
        (SystemEvent(SystemEventType.SEV_TERM), "system event SEV_TERM []"),
        (SystemEvent(SystemEventType.SHUTDOWN), "did not end normally: system event SHUTDOWN"),
        (Shutdown(), "the VM did not end normally: shutdown"),
        (InternalError(InternalErrorSub.EMULATION), "internal error EMULATION"),
        (RunFailed("EINTR", "KVM_RUN interrupted after its 1 s limit"),
         "the VM did not end normally: KVM_RUN failed: -EINTR: KVM_RUN interrupted"),
        (RunFailed("EIO", "handler raised", plugin="ioio"), "-EIO: handler raised [plugin ioio]"),
    ],
)  # fmt: skip
def test_abnormal_ends_say_why(exit_: KvmExit, why: str) -> None:
    failure = abnormal_end(exit_)
    assert failure is not None and why in failure and "\n" not in failure


def test_run_ending_normally_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "-q"]) == 0
    captured = capsys.readouterr()
    assert "VM ended: system event SEV_TERM [0x100]" in captured.out
    assert captured.err == ""


def test_a_halt_after_an_unhandled_failure_request_exits_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without msr_protocol the demo guest cannot negotiate, asks to terminate with
    PROT_UNSUPPORTED, nobody handles that, and it halts: the run failed."""
    assert main(["run", "-q", "-p", "no:msr_protocol"]) == 1
    captured = capsys.readouterr()
    assert "VM ended: Hlt" in captured.out
    assert captured.err == (
        "sevsim: run failed: the guest halted after a termination request nobody "
        "handled: set 0 code 1 (GHCB_SEV_ES_PROT_UNSUPPORTED)\n"
    )


def test_run_with_a_failure_reason_exits_1_with_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["run", "-q", "-p", "no:ioio"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(
        "sevsim: run failed: the guest asked to terminate with a failure reason: "
        "system event SEV_TERM [0x32100]: TERM_REQ set 2 code 3"
    )


def test_run_that_times_out_exits_4(capsys: pytest.CaptureFixture[str]) -> None:
    """A limit ends the run with status 4, as --max-exits does for --firmware (EndKind.LIMIT)."""
    # The demo makes many exits; the first one after the limit ends KVM_RUN with -EINTR.
    assert main(["run", "-q", "--timeout", "1e-9"]) == 4
    err = capsys.readouterr().err
    assert err == (
        "sevsim: run ended (limit, exit status 4): --timeout 1e-09 s passed: "
        "KVM_RUN failed: -EINTR: KVM_RUN interrupted after its 1e-09 s limit\n"
    )


def test_run_help_documents_the_exit_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "exit status (every command): 0 success: the run ended normally" in out
    assert "1 failure: the VM ended any other way" in out
    assert "2 a usage or configuration error" in out
    assert "4 a limit ended the run: --timeout or --max-exits" in out


def test_module_doc_documents_the_exit_statuses() -> None:
    import sevsim.cli

    doc = " ".join((sevsim.cli.__doc__ or "").split())
    assert "Exit statuses: 0 success; 1 ``sevsim plugins check`` found problems, or" in doc
    assert "2 a usage or configuration error" in doc


# --- run --timeout ------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-1", "-0.5", "nan", "inf", "-inf", "1e999", "soon", ""])
def test_bad_timeout_is_a_usage_error_naming_the_value(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", f"--timeout={value}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (
        f"sevsim run: error: argument --timeout: {value!r}: "
        "expected a finite number of seconds > 0"
    ) in err


def test_good_timeout_is_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "-q", "--timeout", "30"]) == 0


# --- sevsim.toml strictness through the command line -----------------------------------


def test_unknown_top_level_table_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "sevsim.toml").write_text('[kvmm]\nera = "v5.11"\n')
    for command in (["run", "-q"], ["plugins"], ["plugins", "check"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err == (
            "sevsim: error: sevsim.toml: unknown top-level table(s) or key(s) "
            "'kvmm'; sevsim.toml has only these tables: [kvm], [plugins]\n"
        )


@pytest.fixture
def deaf_plugin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """An installed plugin that reads no settings (no sevsim_configure, and its
    sevsim_exit_handlers takes no config)."""
    site = tmp_path / "site"
    info = site / "sevsim_demo_deaf-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sevsim-demo-deaf\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[sevsim.plugins]\ndemo_deaf = sevsim_demo_deaf\n")
    (site / "sevsim_demo_deaf.py").write_text(
        "from sevsim.plugin.hookspecs import hookimpl\n\n\n"
        "@hookimpl\ndef sevsim_exit_handlers():\n    return []\n"
    )
    monkeypatch.syspath_prepend(str(site))
    yield "demo_deaf"
    sys.modules.pop("sevsim_demo_deaf", None)


def test_settings_for_a_plugin_without_settings_stop_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], deaf_plugin: str
) -> None:
    assert main(["run", "-q"]) == 0  # installed and fine without settings
    capsys.readouterr()
    (tmp_path / "sevsim.toml").write_text(f"[plugins.settings.{deaf_plugin}]\nlevel = 1\n")
    assert main(["run", "-q"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"sevsim: error: sevsim.toml: [plugins.settings.{deaf_plugin}]: plugin "
        f"{deaf_plugin!r} takes no settings (it implements neither sevsim_configure nor "
        "a hook taking config), so this table would be ignored; remove it\n"
    )
    assert main(["plugins", "check"]) == 1
    assert f"plugin {deaf_plugin!r} takes no settings" in capsys.readouterr().out
    # Disabled, it is never imported, so its table is not checked.
    assert main(["run", "-q", "-p", f"no:{deaf_plugin}"]) == 0


def test_an_owner_rule_for_an_uncontested_code_is_a_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "sevsim.toml").write_text('[plugins.owners]\n"0x7b" = "ioio"\n')
    assert main(["plugins", "check"]) == 1
    assert "'0x7b' = 'ioio' settles nothing: 'ioio' is the only active plugin claiming " \
        "vmgexit 0x7b (SVM_EXIT_IOIO)" in capsys.readouterr().out
    assert main(["run", "-q"]) == 0  # a warning only ...
    assert "sevsim: warning: " in capsys.readouterr().err
    assert main(["run", "-q", "--strict"]) == 2  # ... unless strict
    assert "fatal in strict mode: --strict" in capsys.readouterr().err


def test_an_owner_rule_naming_a_non_claimant_stops_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "sevsim.toml").write_text('[plugins.owners]\n"0x7b" = "mmio"\n')
    assert main(["run", "-q"]) == 2
    assert "plugin 'mmio' does not claim exit code 0x7b" in capsys.readouterr().err
