"""``sevsim run MANIFEST``, ``sevsim run --guest NAME`` and ``sevsim guests``, end to end."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from sevsim.cli import main
from sevsim.manifest import bundled_guests, load_manifest

#: The guest of docs/guest-manifests.md's example: it prints through OUT, one byte per
#: #VC (modeled handler), then asks to terminate with reason set 0 code 0.
HELLO = """\
[guest]
description = "hello through port IO"
vc_handler = "modeled"
memory_mib = 4

[[images]]
address = 0x100000
source = '''
start:
    lea rsi, [rip + message]
    mov dx, 0x3f8
next:
    lodsb
    test al, al
    jz done
    out dx, al
    jmp next
done:
    mov ecx, 0xc0010130
    mov eax, 0x100
    xor edx, edx
    wrmsr
    rep vmmcall
    hlt
message:
    .asciz "hi\\n"
'''
"""

#: A guest that starts at the reset vector: real mode, then a termination request
#: through the GHCB MSR protocol (``reason`` is TERM_REQ's value).
RESET = """\
[guest]
boot = "reset"
memory_mib = {memory}

[[images]]
address = 0xfffff000
bits = 16
source = "mov ecx, 0xc0010130; mov eax, {reason:#x}; xor edx, edx; wrmsr; rep vmmcall; hlt"

[[images]]
address = 0xfffffff0
bits = 16
source = "jmp 0xfffff000"
"""


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SEVSIM_PLUGINS", raising=False)
    monkeypatch.delenv("SEVSIM_DISABLE_PLUGIN_AUTOLOAD", raising=False)


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


# --- sevsim guests ---------------------------------------------------------------------------


def test_guests_lists_each_bundled_guest_with_its_description(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["guests"]) == 0
    out = capsys.readouterr().out.splitlines()
    bundled = bundled_guests()
    assert len(out) == len(bundled)
    for line, (name, path) in zip(out, bundled.items(), strict=True):
        assert line.split()[0] == name
        assert line.endswith(load_manifest(path).description)
    assert "demo  the SEV-ES demo: GHCB MSR protocol, then UART and MMIO through #VC" in out


def test_guests_quiet_and_verbose(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["guests", "-q"]) == 0
    assert capsys.readouterr().out.split() == list(bundled_guests())
    assert main(["guests", "-v"]) == 0
    assert str(bundled_guests()["demo"]) in capsys.readouterr().out


# --- sevsim run --guest NAME / MANIFEST ---------------------------------------------------------


def test_run_guest_demo(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--guest", "demo"]) == 0
    out = capsys.readouterr().out
    assert "[uart] Hello from an SEV-ES guest" in out
    assert "VM ended: system event SEV_TERM [0x100]" in out


def test_an_unknown_guest_lists_the_bundled_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--guest", "dmeo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sevsim: error: no bundled guest 'dmeo' (did you mean 'demo'?)")
    assert err.count("\n") == 1


def test_a_manifest_file_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "hello.toml", HELLO)
    assert main(["run", "hello.toml"]) == 0
    out = capsys.readouterr().out
    assert "[uart] hi" in out
    assert out.count("GHCB SVM_EXIT_IOIO  out port 0x3f8 size 1") == 3


def test_a_missing_manifest_is_one_line_and_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "nowhere.toml"]) == 2
    assert capsys.readouterr().err == (
        "sevsim: error: cannot read guest manifest nowhere.toml: No such file or directory\n"
    )


def test_a_manifest_error_names_the_file_line_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path / "bad.toml", HELLO.replace("memory_mib = 4", "memory = 4"))
    assert main(["run", "bad.toml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sevsim: error: bad.toml:4: guest.memory = 4: unknown key")
    assert err.count("\n") == 1


def test_a_manifest_and_a_guest_name_together_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path / "hello.toml", HELLO)
    assert main(["run", "hello.toml", "--guest", "demo"]) == 2
    assert "give a manifest (hello.toml) or --guest demo, not both" in capsys.readouterr().err


def test_machine_options_need_a_firmware(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", "--guest", "demo", "--vcpus", "2", "--icount"])
    assert info.value.code == 2
    assert "--vcpus, --icount: only for --firmware" in capsys.readouterr().err


# --- the manifest's [plugins] and [kvm] in the configuration's layers -------------------------


def test_manifest_plugins_sit_over_sevsim_toml_and_under_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """sevsim.toml < the manifest's [plugins] < -p (plugin.config.load_config's layers)."""
    write(tmp_path / "sevsim.toml", '[plugins]\ndisable = ["mmio"]\n')
    write(tmp_path / "hello.toml", HELLO + '\n[plugins]\ndisable = ["ioio"]\n')
    # The manifest's table replaces sevsim.toml's disable list: ioio is off, so no
    # plugin handles the guest's OUT and nothing reaches the UART.
    assert main(["run", "hello.toml"]) == 0
    out = capsys.readouterr().out
    assert "GHCB SVM_EXIT_IOIO  out port 0x3f8 size 1" in out
    assert "ioio: " not in out and "[uart]" not in out
    assert main(["run", "hello.toml", "-p", "ioio"]) == 0  # -p wins
    assert "[uart] hi" in capsys.readouterr().out


def test_manifest_kvm_replaces_sevsim_toml_and_era_wins(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path / "sevsim.toml", '[kvm]\nera = "v5.11"\n')
    write(tmp_path / "hello.toml", HELLO + '\n[kvm]\nera = "newest"\n')
    assert main(["run", "hello.toml", "-q"]) == 0  # newest: SEV_TERM is a normal end
    capsys.readouterr()
    # v5.11 failed KVM_RUN with -EINVAL on a termination request.
    assert main(["run", "hello.toml", "-q", "--era", "v5.11"]) == 1
    assert "-EINVAL" in capsys.readouterr().out


# --- run --check ---------------------------------------------------------------------------------


def test_check_passes_for_the_demo(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--guest", "demo", "-q", "--check"]) == 0
    assert "the run went as [expect] says" in capsys.readouterr().err


def test_check_reports_each_mismatch_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path / "hello.toml", HELLO + '\n[expect]\nuart = "bye\\n"\npost = [1]\n')
    assert main(["run", "hello.toml", "-q", "--check"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "sevsim: error: check: hello.toml: expected UART output 'bye\\n', got 'hi\\n'",
        "sevsim: error: check: hello.toml: expected POST codes [0x1], got []",
    ]


def test_check_without_expect_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path / "hello.toml", HELLO)
    assert main(["run", "hello.toml", "--check"]) == 2
    assert "--check: hello.toml has no [expect] table" in capsys.readouterr().err


# --- boot = "reset" manifests run on the pc machine ------------------------------------------


def test_a_reset_mode_manifest_runs_on_the_pc_machine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path / "fw.toml", RESET.format(memory=32, reason=0x100))
    assert main(["run", "fw.toml", "-v"]) == 0
    err = capsys.readouterr().err
    assert "sevsim: launch digest " in err
    assert "TERM_REQ set 0 code 0" in err  # the text trace, on stderr with -v
    assert err.endswith("sevsim: run ended: terminated: the guest asked to terminate "
                        "(reason set 0 code 0)\n")  # fmt: skip


def test_a_reset_mode_manifest_that_gives_up_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path / "fw.toml", RESET.format(memory=32, reason=0x1100))
    assert main(["run", "fw.toml"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("sevsim: run ended (failed, exit status 1): vCPU 0: ")
    assert "TERM_REQ set 1 code 0" in err[-1]


def test_a_reset_mode_manifest_too_small_for_the_pc_machine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path / "fw.toml", RESET.format(memory=16, reason=0x100))
    assert main(["run", "fw.toml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sevsim: error: fw.toml: guest.memory_mib = 16: the pc machine")
    assert "at least 32 MiB" in err and err.count("\n") == 1
