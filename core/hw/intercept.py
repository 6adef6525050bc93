"""Interception that is exact and costs nothing where nothing is sensitive.

The CPU must stop in front of every sensitive instruction (:mod:`sevsim.hw.sites`)
however control reaches it, including code the guest wrote or rewrote at run time
and jumps into the middle of other instructions. Unicorn cannot hook RDMSR, WRMSR,
VMMCALL, MOV CR... by type, and its IN/OUT/CPUID hooks fire in the middle of a
translated block, too late to raise a #VC in front of the instruction.

How it is done: Unicorn reports every block it translates (``UC_HOOK_EDGE_GENERATED``,
with the block's start and length) before the block runs. Those are exact
instruction boundaries, so decoding the block with capstone finds exactly the
instructions that will execute, whatever bytes lie around them. A block that holds
a sensitive instruction not yet hooked gets a single-address code hook on it; the
block is then dropped from the translation cache and the CPU stopped before it ran
a single instruction, so that it is translated again with the hook in place. The
hook runs in front of the instruction, with RIP at it, and the CPU model stops there
or, for the usual #VC, enters the guest's handler from the hook by writing RIP
(which leaves the block: it needs the stop checks below too). Code rewritten by the
guest is retranslated by Unicorn and reported again; blocks whose bytes hold no
opcode byte of any sensitive instruction (:func:`sevsim.hw.sites.candidates`) are
not decoded at all.

So the number of hooks follows the sensitive instructions the guest really
executes, translation costs the same however much code has run, and a block costs
one Python call when it is first translated.

A block is translated with Unicorn's stop checks after each hook and memory access
only if it holds a hooked instruction (:mod:`sevsim.hw.engine` explains why the
others must not have them): the flag in force when Unicorn reports a block is the
one it was translated with, so a block translated with the wrong one is dropped and
translated again under the right one, which then stays for the blocks that follow.

Unicorn reports a block as an edge from the last block that ran to its end, so
until one block has (a stop in a hook, or a RIP write there, does not count), a new
block goes unreported:
until then the CPU decodes the block at the start of each run itself (:meth:`prime`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from unicorn import UC_HOOK_CODE, UC_HOOK_EDGE_GENERATED, Uc

from sevsim.hw.engine import Engine
from sevsim.hw.mmu import GuestAccessFault, Mmu
from sevsim.hw.sites import MAX_INSN, Sensitive, candidates, classify, first_block, sensitive_in

#: (address, site) -> None; the CPU's reaction to an instruction that is about to run.
SiteHandler = Callable[[int, Sensitive], None]


class Interceptor:
    """Hooks on the sensitive instructions of one engine."""

    def __init__(
        self, engine: Engine, mmu: Mmu, bits: Callable[[], int], on_site: SiteHandler,
        retranslate: Callable[[], None],
    ) -> None:  # fmt: skip
        self.engine = engine
        self.uc = engine.uc
        self.mmu = mmu
        self._bits = bits
        self._on_site = on_site
        self._retranslate = retranslate
        #: Address -> (code size it was decoded at, what it is, or None: not sensitive).
        self._sites: dict[int, tuple[int, Sensitive | None]] = {}
        #: Hooked address -> its hook; linear page -> its hooked addresses (a block's
        #: hooks are found on its own pages, whatever number the guest has elsewhere).
        self._hooks: dict[int, int] = {}
        self._hooked_pages: dict[int, set[int]] = {}
        #: Blocks translated before their hooks existed, to drop from the cache.
        self.stale_blocks: list[tuple[int, int]] = []
        #: Unicorn reports new blocks (a block has run to its end since the engine
        #: was made); until then each run's first block must be primed.
        self.reporting = False
        engine.hook_add(UC_HOOK_EDGE_GENERATED, self._on_block)

    @property
    def hook_count(self) -> int:
        return len(self._hooks)

    def prime(self, address: int) -> None:
        """Decode the block at ``address`` before a run, while Unicorn does not
        report new blocks yet, and translate it with the checks it needs."""
        code = self.mmu.code_at(address, 2 * 0x1000 - (address & 0xFFF))
        bits = self._bits()
        found = first_block(code, address, bits) if code and candidates(bits).search(code) else []
        self._place(found)
        self.engine.block_checks = bool(found)

    def _on_block(self, uc: Uc, block: Any, _previous: Any, _data: Any) -> None:
        self.reporting = True
        engine = self.engine
        pc, size = block.pc, block.size
        code = self.mmu.code_at(pc, size)
        bits = self._bits()
        if not code or not candidates(bits).search(code):
            self._forget(pc, pc + size, ())
            found = []
        else:
            found = sensitive_in(code, pc, bits)
            self._forget(pc, pc + size, {addr for addr, _ in found})
            if self._place(found, bits):
                engine.block_checks = True  # translate it again, hooked and checked
                self._stale(pc, pc + size)
                return
        if engine.block_checks != bool(found):
            engine.block_checks = bool(found)
            self._stale(pc, pc + 1)
        # Otherwise the flag stays: blocks around sensitive code tend to follow
        # each other (an exception entry path), and so do blocks of plain code.

    def _stale(self, start: int, end: int) -> None:
        """Drop the blocks holding [start, end) from the translation cache before
        this one runs a single instruction; it is translated again under the flag
        now in force. A block translated with the wrong flag only loses its first
        byte, so that blocks overlapping the rest of it (started at other addresses
        of the same code) stay; one that needs new hooks loses its whole range."""
        self.stale_blocks.append((start, end))
        self._retranslate()

    def _place(self, found: list[tuple[int, Sensitive]], bits: int | None = None) -> bool:
        """Record and hook the sites; True if a new hook had to be added."""
        bits = self._bits() if bits is None else bits
        added = False
        for addr, site in found:
            self._sites[addr] = (bits, site)
            if addr not in self._hooks:
                self._hooks[addr] = self.engine.hook_add(UC_HOOK_CODE, self._on_hit, addr, addr)
                self._hooked_pages.setdefault(addr >> 12, set()).add(addr)
                added = True
        return added

    def _forget(self, start: int, end: int, keep: set[int] | tuple[()]) -> None:
        """Hooked addresses inside a block that are no longer sensitive lose their hook."""
        pages = self._hooked_pages
        if not pages:
            return
        for page in range(start >> 12, ((end - 1) >> 12) + 1):
            hooked = pages.get(page)
            if hooked is None:
                continue
            for addr in [a for a in hooked if start <= a < end and a not in keep]:
                hooked.discard(addr)
                self.uc.hook_del(self._hooks.pop(addr))
                self._sites.pop(addr, None)
            if not hooked:
                del pages[page]

    def _on_hit(self, uc: Uc, address: int, _size: int, _data: Any) -> None:
        bits = self._bits()
        known = self._sites.get(address)
        if known is None or known[0] != bits:
            try:
                code = self.mmu.code_at(address, MAX_INSN)
            except GuestAccessFault:
                code = b""
            known = (bits, classify(code, bits) if code else None)
            self._sites[address] = known
        if known[1] is not None:
            self._on_site(address, known[1])

    def drop_stale_blocks(self) -> None:
        """Remove blocks translated without their hooks from the translation cache."""
        for start, end in self.stale_blocks:
            self.uc.ctl_remove_cache(start, end)
        self.stale_blocks.clear()
