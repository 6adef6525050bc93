"""Compute loop: guest code with no sensitive instruction, interception armed.

sevsim runs it as an SEV-ES guest (its page walk, interception and hooks in
place); the floor is the same image in bare Unicorn with no hooks. Both engines
exist and have run to the warm-up HLT before the timer starts, so the ratio is
the per-iteration cost of interception, which should be nothing.
"""

from __future__ import annotations

from benchmarks import bare, sevsim_guest
from benchmarks.table import Row
from benchmarks.timing import interleaved_medians
from sevsim.guest.asm import assemble
from sevsim.guest.image import CODE, GuestImage

SOURCE = sevsim_guest.WARM_UP + """
    mov rcx, {n}
    xor rax, rax
loop:
    add rax, rcx
    xor rax, 0x55
    dec rcx
    jnz loop
    hlt
"""
GOAL = 0.95
RAM = 16 << 20


def rows(iterations: int, repeat: int) -> list[Row]:
    image = GuestImage(assemble(SOURCE.format(n=iterations), CODE))
    ours, floor = interleaved_medians(
        repeat,
        lambda: sevsim_guest.run_to_hlt(sevsim_guest.launch(image, RAM)),
        lambda: bare.resume(bare.engine(image, RAM)),
    )
    ours_rate, floor_rate = iterations / ours / 1e6, iterations / floor / 1e6
    ratio = ours_rate / floor_rate
    return [Row(f"compute loop, {iterations:,} iterations", "M iter/s", ours_rate, floor_rate,
                ratio, f">= {GOAL} of bare", ratio >= GOAL)]  # fmt: skip
