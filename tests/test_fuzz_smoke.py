"""The fuzzing campaign (``fuzz/``): a short fixed-seed run finds nothing, the oracle
agrees with REFERENCE.md written out by hand, and a planted wrong answer is caught
with a reproducer that replays."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from fuzz import campaign, oracle
from fuzz.cases import Case, PageSpec, Step, case_from_json, dumps
from fuzz.execute import kvm_table, run_driver
from fuzz.generate import cases
from fuzz.oracle import ANY, RESUME, Env, Errno, Internal, Masked, ResetHold, State, Terminate
from sevsim.arch.exits import SvmExit, VmgExit
from sevsim.arch.ghcb import Ghcb, valid_bit
from sevsim.arch.ghcb_msr import cpuid_req, term_req
from sevsim.guest.image import GHCB_GPA

ROOT = Path(__file__).resolve().parent.parent
SW = ("sw_exit_code", "sw_exit_info_1", "sw_exit_info_2")


@pytest.fixture(scope="module")
def table():
    return kvm_table()


@pytest.mark.parametrize("era", oracle.ERAS)
def test_a_short_campaign_finds_nothing(era, table, tmp_path):
    config = campaign.Config(era, seed=3, seconds=None, cases=240, out=tmp_path,
                             guest_every=8, code_every=30)  # fmt: skip
    summary = campaign.run(config, table)
    assert summary.counts["guest"] and summary.counts["code"] and summary.counts["driver"]
    assert not summary.findings, summary.report()
    assert not list(tmp_path.iterdir())
    # Coverage counts the exits the oracle judged, by what they asked and got.
    coverage = summary.coverage
    exit_cases = summary.counts["driver"] + summary.counts["guest"]
    assert exit_cases <= coverage.exits <= 3 * exit_cases
    assert sum(coverage.counts["rules"].values()) == coverage.exits
    assert "msr GHCB_MSR_SEV_INFO_REQ" in coverage.counts["requests"]
    if era == "newest":  # GHCB error replies and SEV_TERM; 5.11 fails KVM_RUN (§4, §12.8)
        assert "bad input MISSING_INPUT" in coverage.counts["replies"]
        assert {"resume", "SEV_TERM"} <= set(coverage.counts["ends"])
    else:
        assert {"resume", "-EINVAL"} <= set(coverage.counts["ends"])
    assert f"coverage over {coverage.exits} exits:" in summary.report()


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(case=cases("newest"))
def test_hypothesis_cases_agree_with_the_oracle(table, case):
    results = run_driver(case, table)
    assert not [r for r in results if r.problems], [r.describe() for r in results]


# -- the oracle against REFERENCE.md, case by case ------------------------------------------------


def env(era: str = "newest") -> Env:
    """2 MiB of RAM, no CPUID table entries but leaf 0x8000001F, the C-bit at 51."""
    return Env(era, ((0, 0x20_0000),), {(0x8000_001F, 0): (0xA, 51, 15, 5)}, 51)


def page(code: int, info1: int = 0, info2: int = 0, *, drop: tuple[str, ...] = (),
         usage: int = 0, **fields: int) -> Ghcb:  # fmt: skip
    """A GHCB with the sw_* fields and ``fields`` set and valid, ``drop`` made invalid."""
    g = Ghcb()
    g["sw_exit_code"], g["sw_exit_info_1"], g["sw_exit_info_2"] = code, info1, info2
    for name, value in fields.items():
        g[name] = value
    for name in drop:
        g.set_valid(name, False)
    g["ghcb_usage"] = usage
    return g


def ghcb(g: Ghcb, era: str = "newest", state: State | None = None) -> oracle.Expected:
    return oracle.vmgexit(env(era), state or State(), GHCB_GPA, g)


def test_oracle_msr_protocol_rules():
    # §4: SEV_INFO is the whole MSR; CPUID keeps bits 31:12; unknown codes are ignored
    # (newest) or fail KVM_RUN (5.11); TERM_REQ ends with SEV_TERM carrying the MSR.
    assert oracle.msr_protocol(env(), 0x002).msr == Masked(0x0002_0001_3300_0001)
    assert oracle.msr_protocol(env("v5.11"), 0x002).msr == Masked(0x0001_0001_3300_0001)
    cpuid = oracle.msr_protocol(env(), cpuid_req(0x8000_001F, 1) | 0xABC << 12)
    assert cpuid.end == RESUME and cpuid.msr == Masked(51 << 32 | 1 << 30 | 0xABC << 12 | 5)
    assert oracle.msr_protocol(env(), cpuid_req(1, 0)).msr.mask == 0xFFFF_FFFF  # runtime bits
    assert oracle.msr_protocol(env(), 0x1234_5003).end == RESUME
    assert oracle.msr_protocol(env(), 0x1234_5003).msr == Masked(0x1234_5003)
    assert oracle.msr_protocol(env("v5.11"), 0x003).end == Errno("EINVAL")
    assert oracle.msr_protocol(env(), term_req(1, 4)).end == Terminate(term_req(1, 4))
    assert oracle.msr_protocol(env("v5.11"), term_req(0, 0)).end == Errno("EINVAL")
    hold = oracle.msr_protocol(env(), 0xFFF0_0006)
    assert hold.end == ResetHold() and hold.msr == Masked(0x007)
    assert oracle.msr_protocol(env(), 0x080).msr == Masked(0x3081)
    assert oracle.msr_protocol(env(), 0x012).end == Terminate(0x012)  # SNP: terminate


def test_oracle_entry_and_validation_rules():
    # §1.1: GPA 0 / unmappable; §2: usage first, then the sw_* bits, the code, its bits.
    assert oracle.vmgexit(env(), State(), 0, Ghcb()).end == RESUME
    assert oracle.vmgexit(env(), State(), 0, Ghcb()).reply is None
    assert oracle.vmgexit(env("v5.11"), State(), 0x4000_0000, Ghcb()).end == Errno("EINVAL")
    bad_usage = page(SvmExit.CPUID, rax=0, rcx=0, usage=1, drop=SW)
    assert ghcb(bad_usage).reply == {(2, 2)}
    assert ghcb(bad_usage, "v5.11").end == Errno("EINVAL", (0, 0))
    assert ghcb(page(SvmExit.CPUID, rax=0, rcx=0, drop=("sw_exit_info_2",))).reply == {(2, 4)}
    assert ghcb(page(SvmExit.XSETBV)).reply == {(2, 6)}
    assert ghcb(page(SvmExit.XSETBV), "v5.11").end == Errno("EINVAL", (SvmExit.XSETBV, 0))
    assert ghcb(page(VmgExit.PSC)).reply == {(2, 4)}  # SNP codes: MISSING_INPUT
    assert ghcb(page(SvmExit.CPUID, rax=0xD, rcx=0)).reply == {(2, 4)}  # XCR0 missing
    assert ghcb(page(SvmExit.CPUID, rax=0xD | 1 << 32, rcx=0)).reply == {(0, 0)}
    assert ghcb(page(SvmExit.MSR, 1, rcx=0x10, rax=0)).reply == {(2, 4)}  # a write needs RDX
    assert ghcb(page(SvmExit.IOIO, 0x80 << 16 | 1 << 4)).reply == {(2, 4)}  # OUT needs RAX


def test_oracle_handler_rules():
    leaf = ghcb(page(SvmExit.CPUID, rax=0x8000_001F, rcx=0, rbx=7))
    assert leaf.regs == {"rax": 0xA, "rbx": 51, "rcx": 15, "rdx": 5}
    assert ghcb(page(SvmExit.MSR, 0, rcx=0x10)).reply == {(0, 0), (1, 0x8000030D)}
    assert ghcb(page(SvmExit.RDTSC)).end == Internal((SvmExit.RDTSC, 0))
    assert ghcb(page(SvmExit.RDTSCP)).event == oracle.UD
    assert ghcb(page(SvmExit.RDTSCP), "v5.11").end == Internal((SvmExit.RDTSCP, 0))
    assert ghcb(page(SvmExit.READ_DR7, rax=5, rdx=6)).regs == {"rax": 5, "rbx": 0, "rcx": 0,
                                                                "rdx": 6}  # fmt: skip
    assert ghcb(page(VmgExit.HV_FEATURES)).reply == {(0, 3)}
    assert ghcb(page(VmgExit.TERM_REQUEST, 0x41)).end == Terminate(GHCB_GPA)
    assert ghcb(page(VmgExit.UNSUPPORTED_EVENT)).end == Errno("EINVAL")
    state = State()
    ghcb(page(VmgExit.AP_JUMP_TABLE, 0, 0x9000), state=state)
    assert ghcb(page(VmgExit.AP_JUMP_TABLE, 1), state=state).reply == {(0, 0x9000)}
    assert ghcb(page(VmgExit.AP_JUMP_TABLE, 2)).reply == {(2, 5)}
    assert ghcb(page(VmgExit.AP_JUMP_TABLE, 2), "v5.11").reply == {(1, 0x80000306)}
    assert ghcb(page(VmgExit.AP_HLT_LOOP)).end == ResetHold()


@pytest.mark.parametrize(
    ("scratch", "length", "reply", "written"),
    [(GHCB_GPA + 0x800, 0x7F0, {(0, 0)}, (0x800, 0xFF0)),
     (GHCB_GPA + 0x7FF, 1, {(2, 3)}, None),
     (GHCB_GPA + 0x800, 0x7F1, {(2, 3)}, None),
     (0x10_0000, 0x1_0000, {(0, 0)}, None),
     (0x10_0000, 0x1_0001, {(2, 3)}, None),
     (0, 8, {(2, 3)}, None),
     ((1 << 64) - 4, 8, {(2, 3)}, None),
     # A copy elsewhere written back over the GHCB page: its first bytes, or the reply.
     (GHCB_GPA - 8, 16, {(0, 0)}, (0, 8)),
     (GHCB_GPA - 0x10, 0x3B0, ANY, (0, 0x3A0))],
)  # fmt: skip
def test_oracle_scratch_rules(scratch, length, reply, written):
    expected = ghcb(page(VmgExit.MMIO_READ, 0xD000_0000, length, sw_scratch=scratch))
    assert expected.reply == reply and expected.scratch == written


def test_oracle_unreadable_scratch_and_string_io_limits():
    outside = page(VmgExit.MMIO_WRITE, 0, 8, sw_scratch=0x4000_0000)
    assert ghcb(outside).end == Errno("EFAULT") and ghcb(outside, "v5.11").end == Errno("EINVAL")
    too_many = page(SvmExit.IOIO, 0x80 << 16 | 1 << 4 | 4, 0x8000_0000, sw_scratch=0x10_0000)
    assert ghcb(too_many).end == Errno("EINVAL")
    # 5.11 took the count as bytes: 8 four-byte elements need 8 bytes of scratch.
    edge = page(SvmExit.IOIO, 0x80 << 16 | 4 << 4 | 4 | 1, 8, sw_scratch=GHCB_GPA + 0xFE8)
    assert ghcb(edge).reply == {(2, 3)} and ghcb(edge, "v5.11").reply == {(0, 0)}


# -- a planted wrong answer ---------------------------------------------------------------------


def _wrong_sev_info(config, ctx):
    ctx.msr = 0x0003_0001_3300_0001  # GHCB version 3: the VM offers only 2


def _wrong_hv_features(ctx):
    ctx.success(0x1)  # SNP without SNP_AP_CREATION


@pytest.mark.parametrize(
    ("module", "name", "plant", "rule"),
    [("sevsim.plugins.msr_protocol", "sev_info", _wrong_sev_info, "§4 SEV_INFO"),
     ("sevsim.plugins.ghcb_protocol", "hv_features", _wrong_hv_features, "§1.2 0x8000fffd")],
)  # fmt: skip
def test_a_planted_disagreement_is_caught_with_a_replayable_reproducer(
    module, name, plant, rule, monkeypatch, tmp_path, capsys
):
    monkeypatch.setattr(f"{module}.{name}", plant)
    config = campaign.Config("newest", seed=5, seconds=None, cases=400, out=tmp_path,
                             guest_every=0, code_every=0)  # fmt: skip
    summary = campaign.run(config)  # its table is built now, with the plant
    found = [f for f in summary.findings if f.kind == "disagreement"]
    assert found and all(f.detail.startswith(rule) for f in found), summary.report()
    (path,) = map(Path, summary.reproducers[found[0].signature][:1])
    saved = json.loads(path.read_text())
    assert saved["replay"] == f"python -m fuzz.campaign --replay {path}"
    assert case_from_json(saved["case"]) == found[0].case
    status, text = campaign.replay(path)
    assert status == 1 and "DISAGREES" in text
    assert campaign.main(["--replay", str(path)]) == 1
    assert f"FOUND disagreement: {rule}" in capsys.readouterr().out
    # The one-line command, in a process without the plant: sevsim agrees again.
    replayed = subprocess.run([sys.executable, "-m", "fuzz.campaign", "--replay", str(path)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "agrees with the oracle" in replayed.stdout


def test_a_case_survives_its_json_form():
    step = Step(GHCB_GPA, PageSpec({"sw_exit_code": SvmExit.IOIO, "rax": 1 << 63},
                                   1 << valid_bit("rax"), 7, 2, b"\x01\x02"))  # fmt: skip
    case = Case("v5.11", (step, Step(0x100)), "guest")
    assert case_from_json(json.loads(dumps(case))) == case
