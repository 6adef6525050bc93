"""NMI injection and NMI_COMPLETE: the guest's NMI handler ends with the VMGEXIT."""

from typing import Any, ClassVar

import pytest

from sevsim import hookimpl
from sevsim.arch.exits import SvmExit
from sevsim.arch.ghcb_msr import GhcbMsr
from sevsim.errors import VcpuError
from sevsim.guest.asm import assemble
from sevsim.guest.image import GHCB_GPA
from sevsim.guest.snippets import TERMINATE, nmi_complete
from sevsim.guest.vc import VcHandler
from sevsim.guest.vc_native import vc_image_args
from sevsim.kvm.dispatch import ExitHandler, ExitKind, Handler
from sevsim.kvm.exits import Hlt, SystemEvent
from sevsim.plugins import ioio, msr_protocol, svm_intercepts
from sevsim.testing import run_guest

pytest_plugins = ["sevsim.testing"]

COUNT = GHCB_GPA + 0x800  # NMIs the guest handled, in the shared page
RESULT = COUNT + 8
NMI_HANDLER, GP_HANDLER, BACKUP = 0x30000, 0x30800, 0x38000
#: Counts, says NMI_COMPLETE (keeping an interrupted #VC handler's GHCB), returns.
HANDLERS = {
    NMI_HANDLER: assemble(f"""
        push rsi; mov rsi, {COUNT}; inc qword ptr [rsi]; pop rsi
        {nmi_complete(BACKUP)}
        iretq
    """, NMI_HANDLER),
    # A #GP handler that waits for an NMI to have been handled, then terminates.
    GP_HANDLER: assemble(f"""
    spin:
        mov rsi, {COUNT}; cmp qword ptr [rsi], 0
        je spin
        {TERMINATE}
    """, GP_HANDLER),
}
WAIT_FOR_TWO = f"""
main:
    hlt
    mov rsi, {COUNT}; cmp qword ptr [rsi], 2
    jb main
    {TERMINATE}
"""
ENABLE = ["nmi", "msr_protocol", "ioio"]


def handled(run) -> int:
    return int.from_bytes(run.vm.memory.read(COUNT, 8), "little")


def guest(source: str, enable=ENABLE, plugins=None, **args: Any):
    return run_guest(source, plugins, enable=enable, idt={2: NMI_HANDLER, 13: GP_HANDLER},
                     data=HANDLERS, **args)  # fmt: skip


def test_queued_nmis_are_injected_one_per_nmi_complete():
    run = guest(WAIT_FOR_TWO)
    vcpu = run.vm.vcpus[0]
    assert run.exit == Hlt()
    for _ in range(3):
        vcpu.nmi()  # KVM_NMI three times: at most two can be pending
    assert isinstance(vcpu.run(), SystemEvent)
    assert handled(run) == 2
    nmi = vcpu.plugin_states["nmi"]
    assert (nmi.pending, nmi.masked, nmi.window_exits) == (0, False, 2)
    assert "\n".join(run.trace.lines).count("nmi: NMIs unmasked") == 2


def test_without_the_plugin_there_is_no_nmi_to_inject():
    """The feature is the plugin's: without it KVM_NMI fails, naming it, and a guest's
    NMI_COMPLETE is an invalid event."""
    run = guest(WAIT_FOR_TWO, enable=["msr_protocol"])
    vcpu = run.vm.vcpus[0]
    with pytest.raises(VcpuError, match="'nmi' plugin"):
        vcpu.nmi()
    complete = run_guest(nmi_complete(BACKUP) + TERMINATE, enable=["msr_protocol"],
                         **vc_image_args(data=HANDLERS))  # fmt: skip
    assert "error INVALID_EVENT" in "\n".join(complete.trace.lines)


#: An NMI handler that counts and returns without NMI_COMPLETE: NMIs stay masked.
SILENT = {**HANDLERS, NMI_HANDLER: assemble(f"""
    push rsi; mov rsi, {COUNT}; inc qword ptr [rsi]; pop rsi
    iretq
""", NMI_HANDLER)}


def test_while_one_nmi_is_in_service_only_one_more_waits():
    """``process_nmi``: the limit is 1 while masked, so of three NMIs queued during the
    first one's handling (its handler never says NMI_COMPLETE), one waits."""
    run = run_guest(WAIT_FOR_TWO, enable=ENABLE, idt={2: NMI_HANDLER, 13: GP_HANDLER},
                    data=SILENT)  # fmt: skip
    vcpu = run.vm.vcpus[0]
    vcpu.nmi()
    assert vcpu.run() == Hlt() and handled(run) == 1 and vcpu.plugin_states["nmi"].masked
    for _ in range(3):
        vcpu.nmi()
    assert vcpu.run() == Hlt()  # the guest waits for a second NMI that never comes
    assert vcpu.plugin_states["nmi"].pending == 1 and handled(run) == 1


class NmiOn:
    """Raises an NMI inside KVM (``kvm_inject_nmi``) while one request is handled: it
    takes over that row (an owner rule says so) and calls the usual handler first."""

    ROWS: ClassVar[dict[int, tuple[ExitKind, Handler, Any]]] = {
        SvmExit.IOIO: (ExitKind.VMGEXIT, ioio.io_interception, ioio.requires),
        SvmExit.RDPMC: (ExitKind.VMGEXIT, svm_intercepts.rdpmc, ("rcx",)),
        GhcbMsr.CPUID_REQ: (ExitKind.MSR_PROTOCOL, msr_protocol.cpuid, ()),
    }

    def __init__(self, code: int) -> None:
        self.code = code

    @hookimpl
    def sevsim_exit_handlers(self):
        kind, usual, requires = self.ROWS[self.code]

        def handler(ctx):
            result = usual(ctx)
            ctx.vcpu.inject_nmi()
            return result

        yield ExitHandler(kind, self.code, handler, requires)


def nmi_on(code: int) -> dict[str, Any]:
    """run_guest arguments for an :class:`NmiOn` taking over ``code``."""
    kind = NmiOn.ROWS[code][0]
    key = f"msr_protocol:{code:#05x}" if kind is ExitKind.MSR_PROTOCOL else code
    return {"plugins": {"nmi_on": NmiOn(code)}, "owners": {key: "nmi_on"}}


@pytest.mark.parametrize("modeled", [False, True], ids=["native", "modeled"])
def test_an_nmi_inside_the_vc_handler_leaves_its_reply_intact(modeled):
    """The NMI arrives right after the native handler's VMGEXIT (the modeled one ends
    its exchange first); the NMI handler's own GHCB request must not clobber the
    reply the #VC handler has yet to read."""
    source = f"mov dx, 0x3fd; in al, dx; mov rsi, {RESULT}; mov [rsi], rax\n{TERMINATE}"
    args: dict[str, Any] = {"idt": {2: NMI_HANDLER}, "data": HANDLERS}
    args = args if modeled else vc_image_args(**args)
    run = run_guest(source, enable=ENABLE, vc_model=VcHandler() if modeled else None,
                    **nmi_on(SvmExit.IOIO), **args)  # fmt: skip
    assert isinstance(run.exit, SystemEvent), run.trace.lines[-6:]
    assert int.from_bytes(run.vm.memory.read(RESULT, 8), "little") & 0xFF == 0x60  # LSR
    assert handled(run) == 1


def test_an_nmi_behind_an_exception_still_gets_in():
    """An exception occupies EVENTINJ: KVM asks for an immediate exit and injects the
    NMI at the next entry, so a guest spinning in its #GP handler still takes it."""
    source = "mov ecx, 9; rdpmc"  # counter 9: KVM queues #GP through EVENTINJ
    args = vc_image_args(idt={2: NMI_HANDLER, 13: GP_HANDLER}, data=HANDLERS)
    run = run_guest(source, enable=ENABLE, timeout=10, **nmi_on(SvmExit.RDPMC), **args)
    assert isinstance(run.exit, SystemEvent), run.exit  # not RunFailed EINTR: no NMI
    assert handled(run) == 1
    assert run.trace.exits["INTR"] == 1  # the immediate exit


def test_an_nmi_after_an_msr_protocol_request_leaves_the_reply_in_the_msr():
    """The NMI comes in right after the VMGEXIT of a CPUID request through the GHCB
    MSR; the NMI handler's own request must not cost the guest its reply."""
    source = f"""
        mov ecx, 0xC0010130; mov eax, 4; xor edx, edx; wrmsr   /* CPUID fn 0, EAX */
        rep vmmcall
        rdmsr; mov rsi, {RESULT}; mov [rsi], eax; mov [rsi + 4], edx
        {TERMINATE}
    """
    args = nmi_on(GhcbMsr.CPUID_REQ)
    run = run_guest(source, args["plugins"], enable=ENABLE, owners=args["owners"],
                    idt={2: NMI_HANDLER, 13: GP_HANDLER}, data=HANDLERS)  # fmt: skip
    assert isinstance(run.exit, SystemEvent), run.trace.lines[-6:]
    assert int.from_bytes(run.vm.memory.read(RESULT, 8), "little") == 0xD_0000_0005
    assert handled(run) == 1
