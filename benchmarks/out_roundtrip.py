"""OUT round trip: ``out dx, al`` through the guest's native #VC handler and back.

sevsim: the OUT is intercepted, #VC delivered through the IDT to the handler, which
fills the GHCB, writes the GHCB MSR and VMGEXITs; kvm and the ioio plugin deliver
the byte to the POST-port device, VMRUN resumes the handler, IRETQ.

The fair floor does the same work with the fewest steps bare Unicorn allows, on the
same image (same loop, same handler): three single-address code hooks — one at the
OUT pushes the #VC frame on the IST1 stack and enters the handler by writing RIP, one
records the GHCB MSR value at the handler's WRMSR (Unicorn keeps no unknown MSR), one
stops at its VMGEXIT — and one emu_stop/emu_start pair per round trip, which reads the
GHCB, takes the byte, writes the reply and resumes past VMGEXIT. sevsim also enters
the handler from the hook without a stop (``sevsim.hw.exceptions``).
"""

from __future__ import annotations

import struct
import time

from unicorn import UC_HOOK_CODE, Uc
from unicorn import x86_const as x86

from benchmarks import bare, sevsim_guest
from benchmarks.sevsim_guest import BenchError
from benchmarks.table import Row
from benchmarks.timing import interleaved_medians
from sevsim.arch.exits import SvmExit
from sevsim.arch.ghcb import GHCB_SAVE_AREA
from sevsim.arch.msr import MSR_AMD64_SEV_ES_GHCB
from sevsim.arch.vectors import Vector
from sevsim.guest.asm import assemble
from sevsim.guest.image import CODE, CODE64_SEL, DATA_SEL, IST1_TOP, GuestImage
from sevsim.guest.vc_native import VC_HANDLER_ADDRESS, vc_image_args

HEAD = sevsim_guest.WARM_UP + """
    mov ecx, {n}
    mov dx, 0x80
"""
LOOP = """
loop:
    out dx, al
    dec ecx
    jnz loop
    hlt
"""
#: The handler's GHCB call: WRMSR of the GHCB MSR, then VMGEXIT (rep vmmcall).
HV_CALL = bytes.fromhex("0f30 f30f01d9")
GOAL = 0.5
RAM = 16 << 20
RFLAGS_TF_IF = 1 << 8 | 1 << 9
#: What the floor reads of the GHCB on VMGEXIT: RAX up to the end of the save area.
_FIRST = GHCB_SAVE_AREA.offset("rax")
_READ = GHCB_SAVE_AREA.size - _FIRST
_EXIT_CODE = GHCB_SAVE_AREA.offset("sw_exit_code") - _FIRST
_INFO_1 = GHCB_SAVE_AREA.offset("sw_exit_info_1")


class Floor:
    """Bare Unicorn playing the CPU and the hypervisor for one round trip at a time."""

    def __init__(self, image: GuestImage, out_at: int) -> None:
        handler = image.data[VC_HANDLER_ADDRESS]
        wrmsr_at = VC_HANDLER_ADDRESS + handler.index(HV_CALL)
        self.vmgexit_at = wrmsr_at + 2
        self.entry = image.idt[Vector.VC]
        self.ghcb = 0
        self.out_at = out_at
        self.port_data = bytearray()
        #: Stopped at the VMGEXIT (else the final HLT ended the run).
        self.at_vmgexit = False
        self.uc = bare.engine(image, RAM)
        self.uc.hook_add(UC_HOOK_CODE, self._at_out, begin=out_at, end=out_at)
        self.uc.hook_add(UC_HOOK_CODE, self._at_wrmsr, begin=wrmsr_at, end=wrmsr_at)
        self.uc.hook_add(UC_HOOK_CODE, self._at_vmgexit, begin=self.vmgexit_at,
                         end=self.vmgexit_at)  # fmt: skip

    def _at_out(self, uc: Uc, address: int, size: int, _: object) -> None:
        """#VC(IOIO) through an IST1 interrupt gate, as the hardware delivers it. The
        frame's RIP is the OUT's address: the hook runs in front of it. Writing RIP
        makes Unicorn leave the block and go on at the handler."""
        rflags = uc.reg_read(x86.UC_X86_REG_RFLAGS)
        frame = struct.pack("<6Q", SvmExit.IOIO, self.out_at, CODE64_SEL, rflags,
                            uc.reg_read(x86.UC_X86_REG_RSP), DATA_SEL)  # fmt: skip
        uc.mem_write(IST1_TOP - len(frame), frame)
        uc.reg_write(x86.UC_X86_REG_RSP, IST1_TOP - len(frame))
        uc.reg_write(x86.UC_X86_REG_RFLAGS, rflags & ~RFLAGS_TF_IF)
        uc.reg_write(x86.UC_X86_REG_RIP, self.entry)

    def _at_wrmsr(self, uc: Uc, address: int, size: int, _: object) -> None:
        if uc.reg_read(x86.UC_X86_REG_ECX) == MSR_AMD64_SEV_ES_GHCB:
            self.ghcb = uc.reg_read(x86.UC_X86_REG_EDX) << 32 | uc.reg_read(x86.UC_X86_REG_EAX)

    def _at_vmgexit(self, uc: Uc, address: int, size: int, _: object) -> None:
        uc.emu_stop()
        self.at_vmgexit = True

    def _vmgexit(self, uc: Uc) -> int:
        """KVM's part: read the request, hand AL to the port, reply success."""
        save = uc.mem_read(self.ghcb + _FIRST, _READ)
        if int.from_bytes(save[_EXIT_CODE : _EXIT_CODE + 8], "little") != SvmExit.IOIO:
            raise BenchError("the floor's guest made a GHCB request other than IOIO")
        self.port_data.append(save[0])
        uc.mem_write(self.ghcb + _INFO_1, bytes(16))
        return self.vmgexit_at + 4

    def run(self) -> float:
        """Seconds from the warm-up HLT to the guest's final HLT."""
        pc = self.uc.reg_read(x86.UC_X86_REG_RIP)
        start = time.perf_counter()
        while True:
            self.at_vmgexit = False
            self.uc.emu_start(pc, bare.NEVER)
            if not self.at_vmgexit:  # the HLT ended the run
                return time.perf_counter() - start
            pc = self._vmgexit(self.uc)


def rows(round_trips: int, repeat: int) -> list[Row]:
    head = HEAD.format(n=round_trips)
    image = GuestImage(assemble(head + LOOP, CODE), **vc_image_args())
    out_at = CODE + len(assemble(head, CODE))

    def floor() -> float:
        floor = Floor(image, out_at)
        elapsed = floor.run()
        if len(floor.port_data) != round_trips:
            raise BenchError(f"the floor made {len(floor.port_data)} round trips, "
                             f"not {round_trips}")  # fmt: skip
        return elapsed

    ours, floor_s = interleaved_medians(
        repeat, lambda: sevsim_guest.run_to_hlt(sevsim_guest.launch(image, RAM)), floor
    )
    ours_rate, floor_rate = round_trips / ours, round_trips / floor_s
    ratio = ours_rate / floor_rate
    return [Row(f"OUT round trip via native #VC handler, x{round_trips:,}", "round trips/s",
                ours_rate, floor_rate, ratio, f">= {GOAL} of floor", ratio >= GOAL)]  # fmt: skip
