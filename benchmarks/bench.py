"""sevsim's benchmarks: each measured beside a bare baseline in the same run.

    python benchmarks/bench.py            (or: make bench)

Prints one row per benchmark: sevsim's rate, the bare rate, and their ratio. Ratios,
not absolute numbers, are what to compare across machines.

(a) OUT loop: a guest writes a byte to the debug port N times. Every OUT is a #VC,
    the guest's native #VC handler fills the GHCB and VMGEXITs, kvm and the ioio
    plugin deliver the byte to the device, VMRUN resumes the handler, IRETQ.
    Baseline: bare Unicorn running the same loop with a code hook that stops the
    engine at each OUT and restarts it after (the same number of stops).
(b) Compute loop: a tight arithmetic loop in an SEV-ES guest with interception
    armed (page walk, site scanning, hooks in place) beside the same loop in bare
    Unicorn with flat memory and no hooks.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from unicorn import UC_ARCH_X86, UC_HOOK_CODE, UC_MODE_64, Uc
from unicorn import x86_const as x86

from sevsim.guest.asm import assemble
from sevsim.guest.image import CODE, GuestImage
from sevsim.guest.vc_native import vc_image_args
from sevsim.kvm.exits import Hlt
from sevsim.kvm.vm import Kvm
from sevsim.testing import isolated_host
from sevsim.vmm.launch import launch_image
from sevsim.vmm.machine import Devices

OUT_LOOP = """
    mov ecx, {n}
    mov dx, 0x80
loop:
    out dx, al
    dec ecx
    jnz loop
    hlt
"""

COMPUTE = """
    mov rcx, {n}
    xor rax, rax
loop:
    add rax, rcx
    xor rax, 0x55
    dec rcx
    jnz loop
    hlt
"""


def best_of(repeat: int, fn: Callable[[], float]) -> float:
    return min(fn() for _ in range(repeat))


def bare_unicorn(code: bytes, stop_at: int | None = None) -> Callable[[], float]:
    """Seconds for bare Unicorn to run ``code`` (optionally stopping at ``stop_at``)."""

    def run() -> float:
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.mem_map(0, 0x200000)
        uc.mem_write(CODE, code)
        uc.reg_write(x86.UC_X86_REG_RSP, 0x10000)
        stops = [0]
        if stop_at is not None:
            # Stop in front of the instruction, then let it run on the restart.
            def on_site(uc: Uc, address: int, size: int, _: object) -> None:
                stops[0] ^= 1
                if stops[0]:
                    uc.emu_stop()

            uc.hook_add(UC_HOOK_CODE, on_site, begin=stop_at, end=stop_at)
        pc = CODE
        start = time.perf_counter()
        while True:
            uc.emu_start(pc, CODE + len(code))
            pc = uc.reg_read(x86.UC_X86_REG_RIP)
            if pc >= CODE + len(code) - 1 or code[pc - CODE] == 0xF4:
                break
        return time.perf_counter() - start

    return run


def sevsim_guest(source: str, **image_args: object) -> Callable[[], float]:
    def run() -> float:
        table = isolated_host(enable=["msr_protocol", "ioio", "mmio"]).start()
        image = GuestImage(assemble(source, CODE), **image_args)  # type: ignore[arg-type]
        vm = launch_image(Kvm(), image, handlers=table, devices=Devices.standard())
        start = time.perf_counter()
        exit_ = vm.vcpus[0].run()
        elapsed = time.perf_counter() - start
        assert isinstance(exit_, Hlt), exit_
        return elapsed

    return run


def out_loop(n: int, repeat: int) -> tuple[str, float, float]:
    source = OUT_LOOP.format(n=n)
    code = assemble(source, CODE)
    out_at = CODE + code.index(b"\xee")
    ours = best_of(repeat, sevsim_guest(source, **vc_image_args()))
    bare = best_of(repeat, bare_unicorn(code, stop_at=out_at))
    return (f"(a) OUT loop, native #VC handler, {n} round trips", n / ours, n / bare)


def compute(n: int, repeat: int) -> tuple[str, float, float]:
    source = COMPUTE.format(n=n)
    ours = best_of(repeat, sevsim_guest(source))
    bare = best_of(repeat, bare_unicorn(assemble(source, CODE)))
    return (f"(b) compute loop, {n} iterations", n / ours, n / bare)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = [out_loop(args.iterations, args.repeat), compute(args.iterations * 100, args.repeat)]
    print(f"{'benchmark':<52} {'sevsim /s':>14} {'bare /s':>14} {'ratio':>8}")
    for name, ours, bare in rows:
        print(f"{name:<52} {ours:>14,.0f} {bare:>14,.0f} {ours / bare:>8.3f}")


if __name__ == "__main__":
    main()
