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

The host's timer must not use ``uc_emu_stop`` either: it sets ``stop_request``
before it asks the CPU to leave its block, and a hook that runs in between is
skipped (``helper_uc_tracecode`` returns early while a stop is requested), so a
sensitive instruction reached in that window ran natively (OVMF's #VC handler read
a GHCB address of 0 from a native RDMSR and stopped in CpuDeadLoop). :meth:`Engine.
interrupt` asks for the exit the way an unmapped access does: it records an error
(``invalid_error``, which ends the run where ``stop_request`` would) and then kicks
the CPU (``exit_request`` and the exit flag in ``icount_decr``), so hooks keep running
until the CPU is out of the block.

The last internal is the instruction counter of counted runs (``emu_start``'s
``count``), which Unicorn keeps but does not report: it is the number of
instructions a run retired, for guest time in icount mode.

The fields are found by probing a throw-away engine (a counted run plants a known
pair of numbers; the CPU is the object with one core and one thread whose
``icount_decr_ptr`` sits just below its ``env_ptr``) and the layout around them is
checked against fields whose values the public API controls before anything is
written; an engine that does not match is refused with an error naming the Unicorn
version.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from functools import cache
from typing import Any

from attrs import frozen
from unicorn import (
    UC_ARCH_X86,
    UC_ERR_OK,
    UC_ERR_RESOURCE,
    UC_HOOK_CODE,
    UC_HOOK_EDGE_GENERATED,
    UC_HOOK_TLB_FILL,
    UC_MODE_64,
    UC_TLB_VIRTUAL,
    Uc,
    UcError,
)
from unicorn import __version__ as unicorn_version
from unicorn.unicorn_py3.unicorn import (
    HOOK_CODE_CFUNC,
    HOOK_EDGE_GEN_CFUNC,
    HOOK_TLB_FILL_CFUNC,
    uc_hook_h,
    uclib,
)
from unicorn.x86_const import UC_X86_REG_RAX, UC_X86_REG_RIP

from sevsim.errors import SevsimError
from sevsim.hw.run_clock import RunClock, hook_clock

#: How far into ``struct uc_struct`` the probe looks for the counter pair.
_SEARCH = 1 << 16
# Offsets from ``emu_count`` in Unicorn 2.1.x's ``struct uc_struct`` (LP64).
_EMU_COUNTER = -8
_STOP_REQUEST = 13
_INVALID_ERROR = 48
_USE_EXITS = 52
_TARGET_PAGE_SIZE = 608
_NO_EXIT_REQUEST = 658
_INIT_DONE = 659


class EngineError(SevsimError):
    """The installed Unicorn is not one whose internals sevsim knows."""


# Offsets in QEMU's CPUState (LP64, glibc's 200-byte sigjmp_buf).
_CPU_NR_CORES = 0
_CPU_EXIT_REQUEST = 21
_CPU_ENV_PTR = 296
_CPU_ICOUNT_DECR_PTR = 304
#: ``IcountDecr.u16.high``: set to -1, the CPU leaves at its next check.
_ICOUNT_HIGH = 2
#: The error the host's timer leaves for ``emu_start`` to return.
TIMER_ERROR = UC_ERR_RESOURCE


@frozen
class _Layout:
    emu_counter: int
    no_exit_request: int
    invalid_error: int
    cpu: int  # where ``struct uc_struct`` keeps its CPUState pointer


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
    cpu = None if problem else _find_cpu(uc)
    if cpu is None and not problem:
        problem = "found no CPUState pointer"
    if problem:
        raise EngineError(
            f"Unicorn {unicorn_version}: {problem}; sevsim knows the internals of Unicorn "
            "2.1.x (x86-64 builds), install that version (pip install 'unicorn>=2.1.4,<2.2')"
        )
    assert cpu is not None
    layout = _Layout(emu_counter=count + _EMU_COUNTER, no_exit_request=count + _NO_EXIT_REQUEST,
                     invalid_error=count + _INVALID_ERROR, cpu=cpu)  # fmt: skip
    if not _kick_works(uc, layout):
        raise EngineError(f"Unicorn {unicorn_version}: a kicked CPU did not stop in front of "
                          "the next instruction; sevsim needs Unicorn 2.1.x")  # fmt: skip
    return layout


def _kick_works(uc: Uc, layout: _Layout) -> bool:
    """A kick from inside a hook must end the run before the hooked instruction."""
    kick = _Kick(uc, layout)
    uc.mem_write(0x1000, b"\x48\xff\xc0" + b"\xeb\xfb")  # inc rax; jmp back
    uc.reg_write(UC_X86_REG_RAX, 0)
    hook = uc.hook_add(UC_HOOK_CODE, lambda *_: kick(), begin=0x1003, end=0x1003)
    try:
        uc.emu_start(0x1000, 0x2000)
    except UcError as err:
        stopped = err.errno == TIMER_ERROR
    else:
        stopped = False
    uc.hook_del(hook)
    return stopped and uc.reg_read(UC_X86_REG_RIP) == 0x1003 and uc.reg_read(UC_X86_REG_RAX) == 1


class _Kick:
    """Asks the running CPU of an engine to leave at its next check (see the module
    doc): an error for ``emu_start`` to return, then the CPU's exit flags."""

    __slots__ = ("_error", "_exit_request", "_icount_high")

    def __init__(self, uc: Uc, layout: _Layout) -> None:
        base = _address(uc)
        self._error = ctypes.c_int32.from_address(base + layout.invalid_error)
        cpu = ctypes.c_uint64.from_address(base + layout.cpu).value
        icount = ctypes.c_uint64.from_address(cpu + _CPU_ICOUNT_DECR_PTR).value
        self._exit_request = ctypes.c_uint8.from_address(cpu + _CPU_EXIT_REQUEST)
        self._icount_high = ctypes.c_uint16.from_address(icount + _ICOUNT_HIGH)

    def __call__(self) -> None:
        self._error.value = TIMER_ERROR
        self._exit_request.value = 1
        self._icount_high.value = 0xFFFF


def _writable_ranges() -> list[tuple[int, int]]:
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, perms = line.split()[:2]
            if perms.startswith("rw"):
                low, high = (int(x, 16) for x in span.split("-"))
                ranges.append((low, high))
    return ranges


def _find_cpu(uc: Uc) -> int | None:
    """The offset in ``struct uc_struct`` of the first pointer to the engine's CPU:
    a mapped object with nr_cores = nr_threads = 1 whose ``icount_decr_ptr`` lies
    just below its ``env_ptr`` (the X86CPU's negative-offset state)."""
    ranges = _writable_ranges()
    raw = ctypes.string_at(_address(uc), 0x1000)
    for offset in range(0, len(raw), 8):
        (target,) = struct.unpack_from("<Q", raw, offset)
        end = target + _CPU_ICOUNT_DECR_PTR + 8
        if not any(low <= target and end <= high for low, high in ranges):
            continue
        cores, threads = struct.unpack("<ii", ctypes.string_at(target + _CPU_NR_CORES, 8))
        env, icount = struct.unpack("<QQ", ctypes.string_at(target + _CPU_ENV_PTR, 16))
        if (cores, threads) == (1, 1) and 0 < env - icount <= 64:
            return offset
    return None


class Engine:
    """One x86-64 Unicorn engine with TLB fills by sevsim and exits enabled.

    :attr:`block_checks` says whether blocks translated from now on check for a
    stop request after each memory access and hook (see the module doc);
    :attr:`retired` is the instruction count of the last counted run; :attr:`clock`
    the guest time of its runs (every hook goes through :meth:`hook_add`, so that
    hook time is not guest time).
    """

    __slots__ = ("_checks", "_counter", "_flag", "_handle", "clock", "env", "interrupt", "uc")

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
        #: Called from another thread while the guest runs: ``emu_start`` returns
        #: :data:`TIMER_ERROR` at the CPU's next check (a block start, or the check
        #: after a hook), every hook until then having run as usual.
        self.interrupt = _Kick(uc, layout)
        #: Address of the CPU's ``CPUX86State`` (what a saved context copies).
        self.env = ctypes.c_uint64.from_address(
            ctypes.c_uint64.from_address(base + layout.cpu).value + _CPU_ENV_PTR).value
        self.clock = RunClock()
        self._handle = uc._uch
        self._checks = True
        self.block_checks = False

    def hook_add(self, kind: int, callback: Callable[..., Any], begin: int = 1,
                 end: int = 0) -> int:  # fmt: skip
        """Unicorn's ``hook_add``, with the callback's time kept out of guest time.

        The kinds called on the exit path and for new code (code hooks on sensitive
        instructions, TLB fills, new blocks) are registered with Unicorn here, not
        through the binding: one Python frame per call that times the callback, calls
        it with the binding's arguments and records an exception the binding's way,
        where the binding and the clock would stack three. ``uc.hook_del`` removes
        either kind.
        """
        direct = _DIRECT_HOOKS.get(kind)
        if direct is None:
            return self.uc.hook_add(kind, self.clock.timed(callback), begin=begin, end=end)
        uc = self.uc
        fptr = direct(uc, self.clock, callback)
        handle = uc_hook_h()
        status = uclib.uc_hook_add(self._handle, ctypes.byref(handle), kind, fptr, None,
                                   ctypes.c_uint64(begin), ctypes.c_uint64(end))  # fmt: skip
        if status != UC_ERR_OK:
            raise UcError(status)
        uc._callbacks[handle.value] = fptr  # where the binding keeps its callbacks alive
        return int(handle.value)

    def start(self, begin: int, count: int = 0) -> None:
        """``emu_start`` from ``begin`` for at most ``count`` instructions (0: no limit),
        with no end address (exits are enabled, none set); an exception a hook raised
        comes out here, as from the binding's ``emu_start``."""
        uc = self.uc
        uc._hook_exception = None
        status = _uc_emu_start(self._handle, begin, _NO_END, 0, count)
        if status != UC_ERR_OK:
            raise UcError(status)
        if uc._hook_exception is not None:
            raise uc._hook_exception

    def stop(self) -> None:
        """``emu_stop``: the run ends at the CPU's next check (after the hook calling it)."""
        _uc_emu_stop(self._handle)

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


_uc_emu_start, _uc_emu_stop = uclib.uc_emu_start, uclib.uc_emu_stop
_NO_END = 0xFFFF_FFFF_FFFF_FFFF


def _hook_failed(uc: Uc, error: BaseException) -> None:
    """What the binding does with a hook's exception: keep the first for ``emu_start``
    to raise, and stop the run."""
    if uc._hook_exception is None:
        uc._hook_exception = error
    _uc_emu_stop(uc._uch)


def _code_hook(uc: Uc, clock: RunClock, callback: Callable[..., Any]) -> Any:
    def hook(_: int, address: int, size: int, _data: int) -> None:
        began = hook_clock()
        try:
            callback(uc, address, size, None)
        except BaseException as error:
            _hook_failed(uc, error)
        finally:
            clock.hooks_ns += hook_clock() - began

    return HOOK_CODE_CFUNC(hook)


def _tlb_fill_hook(uc: Uc, clock: RunClock, callback: Callable[..., Any]) -> Any:
    def hook(_: int, vaddr: int, access: int, entry: Any, _data: int) -> bool:
        began = hook_clock()
        try:
            return bool(callback(uc, vaddr, access, entry.contents, None))
        except BaseException as error:
            _hook_failed(uc, error)
            return False
        finally:
            clock.hooks_ns += hook_clock() - began

    return HOOK_TLB_FILL_CFUNC(hook)


def _edge_hook(uc: Uc, clock: RunClock, callback: Callable[..., Any]) -> Any:
    def hook(_: int, block: Any, previous: Any, _data: int) -> None:
        began = hook_clock()
        try:
            callback(uc, block.contents, previous.contents, None)
        except BaseException as error:
            _hook_failed(uc, error)
        finally:
            clock.hooks_ns += hook_clock() - began

    return HOOK_EDGE_GEN_CFUNC(hook)


#: Hook kinds :meth:`Engine.hook_add` registers directly: kind -> callback factory.
_DIRECT_HOOKS: dict[int, Callable[[Uc, RunClock, Callable[..., Any]], Any]] = {
    UC_HOOK_CODE: _code_hook,
    UC_HOOK_TLB_FILL: _tlb_fill_hook,
    UC_HOOK_EDGE_GENERATED: _edge_hook,
}
