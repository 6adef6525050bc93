"""The Unicorn engine of one CPU, and the two engine internals the CPU model needs.

Why internals: Unicorn 2.1.4 checks for a stop request not only at the start of
each translated block but after every guest memory access (``check_exit_request``
in its ``tcg_gen_qemu_ld/st``), and restores the guest state to the start of the
instruction when it stops there. A stop that comes from another thread (the host's
timer ending a time slice) can therefore land between the load and the store of a
read-modify-write instruction *after* the store: ``add [m], r`` is then executed
again when the guest resumes. That is real corruption (OVMF's LZMA decompressor
produced a broken PEI core under time slicing), so sevsim translates ordinary
blocks with ``no_exit_request`` set (the flag Unicorn uses for ARM IT blocks): a
stop then takes effect only at the next block start, where the state is exact.
Blocks that hold a hooked sensitive instruction need the check after the hook to
stop in front of it; they are translated with the flag clear
(:mod:`sevsim.hw.intercept` decides, block by block).

The second internal is the instruction counter of counted runs (``emu_start``'s
``count``), which Unicorn keeps but does not report: it is the number of
instructions a run retired, for guest time in icount mode.

Both fields are found by probing a throw-away engine (a counted run plants a known
pair of numbers) and the layout around them is checked against four fields whose
values the public API controls before anything is written; an engine that does not
match is refused with an error naming the Unicorn version.
"""

from __future__ import annotations

import ctypes
import struct
from functools import cache

from attrs import frozen
from unicorn import UC_ARCH_X86, UC_MODE_64, UC_TLB_VIRTUAL, Uc
from unicorn import __version__ as unicorn_version

from sevsim.errors import SevsimError

#: How far into ``struct uc_struct`` the probe looks for the counter pair.
_SEARCH = 1 << 16
# Offsets from ``emu_count`` in Unicorn 2.1.x's ``struct uc_struct`` (LP64).
_EMU_COUNTER = -8
_STOP_REQUEST = 13
_USE_EXITS = 52
_TARGET_PAGE_SIZE = 608
_NO_EXIT_REQUEST = 658
_INIT_DONE = 659


class EngineError(SevsimError):
    """The installed Unicorn is not one whose internals sevsim knows."""


@frozen
class _Layout:
    emu_counter: int
    no_exit_request: int


def _address(uc: Uc) -> int:
    return int(uc._uch.value)


def _probe_counts(uc: Uc, count: int) -> set[int]:
    """Offsets where a counted run of ``count`` left (counter, count) = (count+1, count)."""
    uc.emu_start(0x1000, 0x1000 + 0x100, count=count)
    raw = ctypes.string_at(_address(uc), _SEARCH)
    return {off + 8 for off in range(0, _SEARCH - 16, 8)
            if struct.unpack_from("<QQ", raw, off) == (count + 1, count)}  # fmt: skip


@cache
def _layout() -> _Layout:
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0x1000, 0x1000)
    uc.mem_write(0x1000, b"\x90" * 0x100)
    found = _probe_counts(uc, 7) & _probe_counts(uc, 13)
    problem = f"found the run counter at {sorted(found)}" if len(found) != 1 else ""
    if not problem:
        count = found.pop()
        base = _address(uc)

        def byte(offset: int) -> int:
            return ctypes.c_uint8.from_address(base + count + offset).value

        def word(offset: int) -> int:
            return ctypes.c_int32.from_address(base + count + offset).value

        uc.ctl_exits_enabled(True)
        exits_on = word(_USE_EXITS)
        uc.ctl_exits_enabled(False)
        exits_off = word(_USE_EXITS)
        uc.emu_stop()  # sets stop_request even outside a run
        checks = {
            "use_exits follows UC_CTL_UC_USE_EXITS": (exits_on, exits_off) == (1, 0),
            "stop_request is set by uc_emu_stop": byte(_STOP_REQUEST) == 1,
            "target_page_size is 4 KiB": word(_TARGET_PAGE_SIZE) == 0x1000,
            "init_done is set": byte(_INIT_DONE) == 1,
            "no_exit_request is clear": byte(_NO_EXIT_REQUEST) == 0,
        }
        failed = [name for name, ok in checks.items() if not ok]
        problem = f"layout checks failed: {failed}" if failed else ""
    if problem:
        raise EngineError(
            f"Unicorn {unicorn_version}: {problem}; sevsim knows the internals of Unicorn "
            "2.1.x (x86-64 builds), install that version (pip install 'unicorn>=2.1.4,<2.2')"
        )
    return _Layout(emu_counter=count + _EMU_COUNTER, no_exit_request=count + _NO_EXIT_REQUEST)


class Engine:
    """One x86-64 Unicorn engine with TLB fills by sevsim and exits enabled.

    :attr:`block_checks` says whether blocks translated from now on check for a
    stop request after each memory access and hook (see the module doc);
    :attr:`retired` is the instruction count of the last counted run.
    """

    __slots__ = ("_checks", "_counter", "_flag", "uc")

    def __init__(self, cpu_model: int) -> None:
        layout = _layout()
        uc = self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.ctl_set_cpu_model(cpu_model)
        uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
        # With exits enabled and none set, emu_start's "until" is ignored: otherwise
        # Unicorn translates that address through sevsim's page walk on every start.
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
        base = _address(uc)
        self._flag = ctypes.c_uint8.from_address(base + layout.no_exit_request)
        self._counter = ctypes.c_uint64.from_address(base + layout.emu_counter)
        self._checks = True
        self.block_checks = False

    @property
    def block_checks(self) -> bool:
        return self._checks

    @block_checks.setter
    def block_checks(self, on: bool) -> None:
        self._checks = on
        self._flag.value = 0 if on else 1

    @property
    def retired(self) -> int:
        """Instructions the last counted run executed (Unicorn counts the one it
        stopped in front of, too)."""
        return max(self._counter.value - 1, 0)
