"""The GHCB protocol's own requests, sent by guest code through the whole path."""

from sevsim.arch.exits import VmgExit
from sevsim.arch.ghcb import GHCB_SAVE_AREA
from sevsim.guest.image import GHCB_GPA
from sevsim.guest.snippets import ghcb_vmgexit
from sevsim.kvm.exits import RunFailed, SystemEvent, SystemEventType
from sevsim.testing import run_guest
from sevsim.vmm.runner import abnormal_end

RESULT = GHCB_GPA + 0x800  # in the shared page, where the host can read it back


def test_hv_features_then_term_request_with_a_reason():
    info2 = GHCB_SAVE_AREA.offset("sw_exit_info_2")
    source = (ghcb_vmgexit(VmgExit.HV_FEATURES)
              + f"mov rax, [rdi + {info2}]; mov rsi, {RESULT}; mov [rsi], rax"
              + ghcb_vmgexit(VmgExit.TERM_REQUEST, 1 | 4 << 4))  # fmt: skip
    run = run_guest(source)
    assert run.exit == SystemEvent(SystemEventType.SEV_TERM, (GHCB_GPA,))
    assert int.from_bytes(run.vm.memory.read(RESULT, 8), "little") == 0x3
    text = "\n".join(run.trace.lines)
    assert "GHCB SVM_VMGEXIT_TERM_REQUEST  set 1 code 4 (GHCB_TERM_CPUID)" in text
    ended = "SEV_TERM [0x7000]: GHCB TERM_REQUEST at 0x7000 set 1 code 4 (GHCB_TERM_CPUID)"
    assert ended in text
    failure = abnormal_end(run.exit, run.trace, 0)
    assert failure is not None and ended in failure
    # KVM wrote its reply into the page: the request's reason is gone from it.
    info1 = GHCB_GPA + GHCB_SAVE_AREA.offset("sw_exit_info_1")
    assert int.from_bytes(run.vm.memory.read(info1, 8), "little") == 0


def test_a_general_request_through_the_ghcb_is_a_normal_end():
    run = run_guest(ghcb_vmgexit(VmgExit.TERM_REQUEST, 0))
    assert run.exit == SystemEvent(SystemEventType.SEV_TERM, (GHCB_GPA,))
    assert abnormal_end(run.exit, run.trace, 0) is None
    assert abnormal_end(run.exit) is not None  # without the trace, the reason is unknown


def test_unsupported_event_fails_kvm_run():
    run = run_guest(ghcb_vmgexit(VmgExit.UNSUPPORTED_EVENT, 0x29))
    assert isinstance(run.exit, RunFailed) and run.exit.errno == "EINVAL"
    assert "exit_info_1 0x29" in run.exit.why
