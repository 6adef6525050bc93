"""New-code cost: a guest that runs N code pages it has never run before.

Each page is what interception meets in real firmware: code whose operand bytes
often look like the one-byte IN/OUT/INS/OUTS opcodes (0x6C-0x6F, 0xE4-0xE7,
0xEC-0xEF) — 80 such bytes per page here, in four chunks spread over the page —
and no sensitive instruction at all. The guest runs every chunk once, page after
page, then halts. sevsim pays, per page, for mapping and scanning it and arming
whatever it hooks; bare Unicorn only translates it. The cost per page must not grow
with the code already run (N = 256, 1024, 4096) and must stay within 10x bare.
"""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks import bare, sevsim_guest
from benchmarks.table import Row
from benchmarks.timing import interleaved_medians
from sevsim.guest.asm import assemble
from sevsim.guest.image import CODE, GuestImage

PAGE = 0x1000
#: Where the code pages start: above the image's own 2 MiB (mapped with 2 MiB pages).
PAGES = 0x200000
CHUNKS = 4
#: One chunk: five MOVs whose immediates are all IN/OUT/INS/OUTS-looking bytes (20 per
#: chunk), then a jump to the next chunk, a quarter page on.
CHUNK = """
    mov eax, 0xE4E5E6E7
    add ebx, eax
    mov eax, 0xECEDEEEF
    add ebx, eax
    mov eax, 0x6C6D6E6F
    add ebx, eax
    mov eax, 0xE4ECEE6E
    add ebx, eax
    mov eax, 0xE5E7EF6D
    add ebx, eax
    jmp {next:#x}
"""
SENSITIVE_LOOKING = frozenset((*range(0x6C, 0x70), *range(0xE4, 0xE8), *range(0xEC, 0xF0)))
GOAL = 10.0
#: "Flat": the per-page cost at any N within this factor of the smallest N's.
FLAT = 1.5


def code_pages(count: int) -> bytes:
    """``count`` pages of chunks, each jumping to the next, and a HLT after the last."""
    span = PAGE // CHUNKS
    chunk = assemble(CHUNK.format(next=span), 0).ljust(span, b"\0")
    return chunk * (CHUNKS * count) + b"\xf4"


def image(count: int) -> tuple[GuestImage, int]:
    """The guest for ``count`` pages and the RAM it needs (whole 2 MiB pages)."""
    entry = assemble(sevsim_guest.WARM_UP + f"jmp {PAGES:#x}", CODE)
    ram = (PAGES + count * PAGE + PAGE + (2 << 20) - 1) & ~((2 << 20) - 1)
    return GuestImage(entry, data={PAGES: code_pages(count)}), ram


#: Runs shorter than this many pages are repeated more, up to :data:`MORE` times as
#: often (the same count on both sides): a 256-page run lasts ~0.1 s, where one
#: collection or descheduling shows in a median of three.
STEADY_PAGES = 1024
MORE = 4


def per_page_us(count: int, repeat: int) -> tuple[float, float]:
    """Microseconds per page for sevsim and for bare Unicorn (medians)."""
    guest, ram = image(count)
    ours, floor = interleaved_medians(
        repeat * max(1, min(MORE, STEADY_PAGES // count)),
        lambda: sevsim_guest.run_to_hlt(sevsim_guest.launch(guest, ram)),
        lambda: bare.resume(bare.engine(guest, ram)),
    )
    return ours / count * 1e6, floor / count * 1e6


def rows(counts: Sequence[int], repeat: int) -> list[Row]:
    out: list[Row] = []
    first = 0.0
    for count in counts:
        ours, floor = per_page_us(count, repeat)
        first = first or ours
        growth, ratio = ours / first, ours / floor
        note = f"per page {growth:.2f}x the N={counts[0]:,} cost" if count != counts[0] else ""
        out.append(Row(f"new code, N={count:,} pages, 80 IO-like bytes/page", "us/page",
                       ours, floor, ratio, f"<= {GOAL:g}x bare, flat in N",
                       ratio <= GOAL and growth <= FLAT, note))  # fmt: skip
    return out
