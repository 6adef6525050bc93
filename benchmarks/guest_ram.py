"""Guest RAM: the peak RSS of a process running a 4 GiB guest that touches 64 MiB.

Guest RAM must be committed only where the guest touches it. Each side runs in a
fresh child process so the number is that guest's alone (nothing else this run
allocated): sevsim launches and runs the guest; the floor maps the same amount of
RAM for bare Unicorn over an anonymous mmap and runs the same guest code. The
guest writes one qword to every 4 KiB page of its 64 MiB, from 16 MiB up. The
4 GiB guest has no MMIO devices: its RAM covers the whole 4 GiB below the top.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import subprocess
import sys
from pathlib import Path

from benchmarks import bare, sevsim_guest
from benchmarks.rss import peak_rss_mib
from benchmarks.table import Row
from sevsim.guest.asm import assemble
from sevsim.guest.image import CODE, GuestImage
from sevsim.vmm.machine import Devices

GOAL_MIB = 200
MIB = 1 << 20
#: Where the touched range starts: above the image and its stacks.
TOUCH_FROM = 16 * MIB
TOUCH = sevsim_guest.WARM_UP + """
    mov rdi, {start:#x}
    mov rcx, {pages}
touch:
    mov qword ptr [rdi], rcx
    add rdi, 0x1000
    dec rcx
    jnz touch
    hlt
"""
ROOT = Path(__file__).resolve().parent.parent


def guest(touched: int) -> GuestImage:
    return GuestImage(assemble(TOUCH.format(start=TOUCH_FROM, pages=touched // 0x1000), CODE))


def run_sevsim(ram: int, touched: int) -> None:
    vcpu = sevsim_guest.launch(guest(touched), ram, Devices())
    sevsim_guest.run_to_hlt(vcpu)


def run_floor(ram: int, touched: int) -> None:
    """Bare Unicorn over a lazily committed mapping, as a VMM with mmap'd RAM has."""
    memory = mmap.mmap(-1, ram, flags=mmap.MAP_PRIVATE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    bare.resume(bare.engine(guest(touched), ram, address))


def child_peak_rss_mib(side: str, ram: int, touched: int) -> float:
    """Peak RSS of a child process that runs one side's guest."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.guest_ram", side, str(ram), str(touched)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return float(json.loads(out)["peak_rss_mib"])


def rows(ram: int = 4 << 30, touched: int = 64 * MIB) -> list[Row]:
    ours = child_peak_rss_mib("sevsim", ram, touched)
    floor = child_peak_rss_mib("floor", ram, touched)
    return [Row(f"RSS, {ram // MIB:,} MiB guest touching {touched // MIB} MiB", "MiB peak",
                ours, floor, ours / floor, f"< {GOAL_MIB} MiB", ours < GOAL_MIB)]  # fmt: skip


def main() -> None:
    side, ram, touched = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    {"sevsim": run_sevsim, "floor": run_floor}[side](ram, touched)
    print(json.dumps({"peak_rss_mib": peak_rss_mib()}))


if __name__ == "__main__":
    main()
