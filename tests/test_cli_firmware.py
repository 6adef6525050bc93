"""``sevsim measure`` and ``sevsim run --firmware``: the launch digest equals
sev-snp-measure's, and a firmware run's options, output and exit status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sevsnpmeasure.guest import calc_launch_digest
from sevsnpmeasure.sev_mode import SevMode
from sevsnpmeasure.vcpu_types import CPU_SIGS

from sevsim.cli import main
from sevsim.cli_firmware import memory_size
from sevsim.guest.asm import assemble
from sevsim.trace_jsonl import read_trace
from sevsim.vmm.firmware import FOUR_GIB, build_firmware_image

OVMF_DIR = Path("/usr/share/OVMF")
NO_OVMF = "needs Debian's OVMF (/usr/share/OVMF/{}): install Debian's ovmf package"
BIN = Path(sys.executable).parent


def debian_ovmf(name: str) -> object:
    path = OVMF_DIR / name
    marks = [pytest.mark.ovmf, pytest.mark.skipif(not path.exists(), reason=NO_OVMF.format(name))]
    return pytest.param(path, marks=marks, id=name)


DEBIAN_OVMF = [debian_ovmf("OVMF_CODE.fd"), debian_ovmf("OVMF_CODE_4M.fd")]
OVMF_CODE = OVMF_DIR / "OVMF_CODE.fd"
needs_ovmf_code = [
    pytest.mark.ovmf,
    pytest.mark.skipif(not OVMF_CODE.exists(), reason=NO_OVMF.format("OVMF_CODE.fd")),
]


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SEVSIM_PLUGINS", raising=False)
    monkeypatch.delenv("SEVSIM_DISABLE_PLUGIN_AUTOLOAD", raising=False)


def oracle(path: Path, vcpus: int, vcpu_type: str) -> str:
    digest = calc_launch_digest(SevMode.SEV_ES, vcpus, CPU_SIGS[vcpu_type], str(path),
                                None, None, None, 0)  # fmt: skip
    return digest.hex()


def sevsim(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """``sevsim ARGS`` in a fresh process, stdin from /dev/null."""
    return subprocess.run([sys.executable, "-m", "sevsim.cli", *args], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=120, check=False,
                          **kwargs)  # type: ignore[call-overload]  # fmt: skip


@pytest.fixture(scope="module")
def small_firmware(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 KiB image with OVMF's footer table (an SEV-ES reset block for the APs):
    from the reset vector, real-mode code asks to terminate through the GHCB MSR
    protocol (TERM_REQ, reason set 0 code 0)."""
    path = tmp_path_factory.mktemp("fw") / "small.fd"
    code = assemble("mov ecx, 0xc0010130; mov eax, 0x100; xor edx, edx; wrmsr; rep vmmcall; "
                    "hlt", 0xFFFF_F000, 16)  # fmt: skip
    image = build_firmware_image(FOUR_GIB - 0x8000, assemble("jmp 0xfffff000", 0xFFFF_FFF0, 16),
                                 size=0x10000, code={0xFFFF_F000: code})  # fmt: skip
    path.write_bytes(image)
    return path


# --- sevsim measure ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", DEBIAN_OVMF)
@pytest.mark.parametrize("vcpus", [1, 2, 4])
@pytest.mark.parametrize("vcpu_type", ["EPYC-v4", "EPYC-Milan"])
def test_measure_equals_sev_snp_measure_on_debian_ovmf(
    path: Path, vcpus: int, vcpu_type: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["measure", "--firmware", str(path), "--vcpus", str(vcpus), "--vcpu-type", vcpu_type]
    assert main(argv) == 0
    assert capsys.readouterr().out == oracle(path, vcpus, vcpu_type) + "\n"


@pytest.mark.parametrize("vcpus", [1, 3])
@pytest.mark.parametrize("vcpu_type", ["EPYC", "EPYC-Rome-v2", "EPYC-Genoa-v1", "EPYC-Turin"])
def test_measure_equals_sev_snp_measure_on_a_small_image(
    small_firmware: Path, vcpus: int, vcpu_type: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["measure", "--firmware", str(small_firmware), "--vcpus", str(vcpus),
            "--vcpu-type", vcpu_type]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out == oracle(small_firmware, vcpus, vcpu_type) + "\n"


@pytest.mark.parametrize("output_format", ["hex", "base64"])
def test_measure_prints_what_the_sev_snp_measure_command_prints(
    small_firmware: Path, output_format: str
) -> None:
    """The same command line (sevsim accepts --mode and --ovmf) gives the same bytes."""
    args = ["--mode", "seves", "--ovmf", str(small_firmware), "--vcpus", "2",
            "--vcpu-type", "EPYC-Milan", "--output-format", output_format]  # fmt: skip
    theirs = subprocess.run([BIN / "sev-snp-measure", *args], capture_output=True, text=True,
                            check=True, timeout=60)  # fmt: skip
    ours = sevsim("measure", *args)
    assert (ours.returncode, ours.stderr) == (0, "")
    assert ours.stdout == theirs.stdout


def test_measure_as_json(small_firmware: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["measure", "--firmware", str(small_firmware), "--vcpus", "2",
                 "--vcpu-type", "EPYC-Milan", "--json"]) == 0  # fmt: skip
    document = json.loads(capsys.readouterr().out)
    assert document == {
        "mode": "seves", "firmware": str(small_firmware), "vcpus": 2,
        "vcpu_type": "EPYC-Milan", "vcpu_sig": "0xa00f11",
        "digest": oracle(small_firmware, 2, "EPYC-Milan"), "format": "hex",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--vcpus", "0"], "argument --vcpus: '0': expected a whole number of vCPUs >= 1"),
        (["--vcpu-type", "EPYC-Zen9"], "argument --vcpu-type: 'EPYC-Zen9': unknown vCPU type; "
                                       "expected one of EPYC, EPYC-v1"),
        (["--mode", "snp"], "argument --mode: invalid choice: 'snp'"),
    ],
)  # fmt: skip
def test_measure_refuses_bad_options_in_one_line(
    small_firmware: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["measure", "--firmware", str(small_firmware), *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("sevsim measure: error: ") and message in err
    assert err.count("\n") == 1


def test_measure_names_an_unreadable_or_bad_image(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["measure", "--firmware", "none.fd"]) == 2
    assert capsys.readouterr().err == (
        "sevsim: error: cannot read firmware none.fd: No such file or directory\n"
    )
    (tmp_path / "odd.fd").write_bytes(bytes(0x1800))
    assert main(["measure", "--firmware", "odd.fd"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sevsim: error: firmware odd.fd is 0x1800 bytes") and err.count("\n") == 1


# --- sevsim run --firmware ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [("512M", 512 << 20), ("2G", 2 << 30), ("2g", 2 << 30), ("4096K", 4 << 20),
     ("1024", 1 << 30), ("64MiB", 64 << 20)],
)  # fmt: skip
def test_memory_sizes_read_as_qemu_reads_m(text: str, size: int) -> None:
    assert memory_size(text) == size


@pytest.mark.parametrize("text", ["", "1.5G", "G", "-1M", "12Q"])
def test_bad_memory_sizes_are_usage_errors(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", "--firmware", "x.fd", f"--memory={text}"])
    assert info.value.code == 2
    assert f"argument --memory/-m: {text!r}: expected a size such as 512M or 2G" in (
        capsys.readouterr().err
    )


def test_memory_the_pc_machine_refuses_is_one_line(
    small_firmware: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--firmware", str(small_firmware), "-m", "16M"]) == 2
    assert capsys.readouterr().err == (
        "sevsim: error: memory size 16777216: expected a whole number of MiB, at least 32 MiB\n"
    )


def test_a_missing_vars_file_is_one_line(
    small_firmware: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--firmware", str(small_firmware), "--vars", "vars.fd"]) == 2
    assert capsys.readouterr().err == (
        "sevsim: error: VARS file 'vars.fd': No such file or directory\n"
    )


def test_firmware_with_a_guest_is_refused(
    small_firmware: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", "--guest", "demo", "--firmware", str(small_firmware)])
    assert info.value.code == 2
    assert "--firmware runs a firmware image: give no manifest or --guest" in (
        capsys.readouterr().err
    )


def test_a_firmware_run_prints_its_digest_and_ends_with_its_status(small_firmware: Path) -> None:
    """The BSP asks to terminate with reason set 0 code 0: EndKind.TERMINATED, status 0;
    the digest printed before the run is sev-snp-measure's for the same inputs."""
    done = sevsim("run", "--firmware", str(small_firmware), "--vcpus", "2",
                  "--vcpu-type", "EPYC-Milan")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # the console: the guest printed nothing
    lines = done.stderr.splitlines()
    assert lines[0] == f"sevsim: launch digest {oracle(small_firmware, 2, 'EPYC-Milan')}"
    assert lines[-1] == (
        "sevsim: run ended: terminated: the guest asked to terminate (reason set 0 code 0)"
    )


def test_quiet_firmware_run_says_nothing_on_success(small_firmware: Path) -> None:
    done = sevsim("run", "--firmware", str(small_firmware), "-q")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


@pytest.mark.parametrize("vcpus", [1, 2])
def test_ovmf_runs_to_max_exits_with_the_measured_digest(
    vcpus: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    for mark in needs_ovmf_code:
        request.applymarker(mark)
    done = sevsim("run", "--firmware", str(OVMF_CODE), "--vcpus", str(vcpus), "--vcpu-type",
                  "EPYC-Milan", "--max-exits", "30", "--trace-file", "boot.jsonl",
                  cwd=tmp_path)  # fmt: skip
    assert done.returncode == 4, done.stderr  # EndKind.LIMIT
    lines = done.stderr.splitlines()
    assert lines[0] == f"sevsim: launch digest {oracle(OVMF_CODE, vcpus, 'EPYC-Milan')}"
    assert lines[-1] == "sevsim: run ended (limit, exit status 4): --max-exits: 30 exits"
    events = list(read_trace(tmp_path / "boot.jsonl"))
    launched = [e["command"] for e in events if e["event"] == "launch_command"]
    assert launched.count("LAUNCH_UPDATE_VMSA") == vcpus
    assert any(e["event"] == "vmexit" for e in events)
    assert all("guest_ns" in e for e in events)  # the machine's clock
    assert [e["name"] for e in events if e["event"] == "phase"] == [
        "launch", "run", "end: limit"
    ]  # fmt: skip
