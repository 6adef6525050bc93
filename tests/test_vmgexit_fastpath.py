"""KVM's side of a VMGEXIT done with one GHCB write per exit, and the same results.

KVM works on the mapped GHCB page: the valid bitmap it clears and the reply it writes
are in guest memory as soon as it writes them, RAX..RDX at the next entry. sevsim keeps
a copy of the page and writes what KVM changed back once, when the guest is entered
again — so every way KVM_RUN can return in between must write it back too, or the VMM
would read the guest's request where KVM's reply belongs. The compiled pieces of the
path (the request read in one struct call, the reply and register writes, the valid
bits as masks, the written-bytes mask) must give what the per-field layout accessors
give.
"""

from __future__ import annotations

import random
import time

import pytest
from guests import guest

from sevsim import hookimpl
from sevsim.arch.exits import SVM_EXIT_SW, GhcbErr
from sevsim.arch.ghcb import (
    GHCB_PAGE_SIZE,
    GHCB_SAVE_AREA,
    REGISTER_FIELDS,
    Ghcb,
    page_reader,
    valid_bit,
    valid_mask,
)
from sevsim.arch.layout import FieldReader
from sevsim.errors import LayoutError
from sevsim.guest.image import GHCB_GPA
from sevsim.guest.snippets import ghcb_vmgexit
from sevsim.kvm import outcome as O
from sevsim.kvm.dispatch import ExitHandler, ExitKind
from sevsim.kvm.exits import Hlt, IrqWindowOpen, RunFailed
from sevsim.kvm.ghcb_map import EXIT_INFO, MappedGhcb
from sevsim.kvm.vm import Kvm
from sevsim.testing import isolated_host
from sevsim.vmm.launch import launch_image

SW_CODE = SVM_EXIT_SW + 0x51
#: What the handler answers: sw_exit_info_2, and RAX for the next entry.
REPLY, RAX_OUT = 0x1234, 0x55
#: The valid bits KVM's reply sets: sw_exit_info_1/2, then RAX..RDX at the entry.
INFO_BITS = valid_mask(EXIT_INFO)
ENTRY_BITS = INFO_BITS | valid_mask(("rax", "rbx", "rcx", "rdx"))
#: RAX as the guest leaves it in the page: ghcb_vmgexit does not write it.
GUEST_RAX = 0


class Answers:
    """Owns SW_CODE: replies (info_2 = REPLY, RAX = RAX_OUT), then does ``then(ctx)``."""

    def __init__(self, then=None, requires=()) -> None:
        self.then = then
        self.requires = requires

    @hookimpl
    def sevsim_exit_handlers(self):
        def handler(ctx):
            ctx.set_exit_info(0, REPLY)
            ctx.regs["rax"] = RAX_OUT
            return self.then(ctx) if self.then is not None else None

        yield ExitHandler(ExitKind.VMGEXIT, SW_CODE, handler, self.requires)


def launched(plugin: Answers, prelude: str = "", requests: int = 1):
    """A guest that sends SW_CODE through its GHCB ``requests`` times, then halts."""
    table = isolated_host({"answers": plugin}).start()
    source = prelude + ghcb_vmgexit(SW_CODE) * requests + "    hlt\n"
    vm = launch_image(Kvm(), guest(source), handlers=table)
    return vm, vm.vcpus[0]


def page(vm) -> Ghcb:
    return Ghcb(vm.memory.read(GHCB_GPA, GHCB_PAGE_SIZE))


def assert_replied(vm, bits: int, rax: int) -> None:
    g = page(vm)
    assert (g["sw_exit_info_1"], g["sw_exit_info_2"]) == (0, REPLY)
    assert g.valid_bitmap == bits
    assert g["rax"] == rax


# -- every way KVM_RUN returns after a VMGEXIT leaves KVM's writes in guest memory ---------


def test_a_vmm_kick_returning_eintr_after_the_exit_finds_the_reply_in_the_page():
    """The handler resumes the guest, but the VMM kicked the vCPU meanwhile
    (immediate_exit): KVM_RUN returns -EINTR before the next entry, with the bitmap
    cleared and the reply written; RAX goes back only when the guest is entered."""
    vcpus = []

    def kick(ctx):
        vcpus[0].immediate_exit = True

    vm, vcpu = launched(Answers(kick))
    vcpus.append(vcpu)
    exit_ = vcpu.run(10)
    assert isinstance(exit_, RunFailed) and exit_.errno == "EINTR", exit_.describe()
    assert_replied(vm, INFO_BITS, GUEST_RAX)
    vcpu.immediate_exit = False
    assert isinstance(vcpu.run(10), Hlt)
    assert_replied(vm, ENTRY_BITS, RAX_OUT)


def test_a_run_timing_out_after_the_exit_leaves_the_reply_in_the_page():
    """KVM_RUN's own limit passes while the handler runs (it is not the plugins'
    limit): -EINTR after the exit, the reply in the page."""

    def slow(ctx):
        time.sleep(0.3)

    vm, vcpu = launched(Answers(slow), prelude="    hlt\n")
    assert isinstance(vcpu.run(10), Hlt)  # the first entry, which makes the CPU, untimed
    exit_ = vcpu.run(0.2, plugin_timeout=None)
    assert isinstance(exit_, RunFailed) and exit_.errno == "EINTR", exit_.describe()
    assert "limit" in exit_.why
    assert_replied(vm, INFO_BITS, GUEST_RAX)


def test_an_exit_to_userspace_from_the_handler_leaves_the_reply_in_the_page():
    vm, vcpu = launched(Answers(lambda ctx: O.ExitToUser(Hlt())))
    assert isinstance(vcpu.run(10), Hlt)
    assert_replied(vm, INFO_BITS, GUEST_RAX)
    assert page(vm)["sw_exit_code"] == SW_CODE  # the rest of the page is the guest's
    assert isinstance(vcpu.run(10), Hlt)  # the guest's own HLT, after the entry
    assert_replied(vm, ENTRY_BITS, RAX_OUT)


def test_an_open_interrupt_window_after_the_exit_leaves_the_reply_in_the_page():
    """The VMM asks for an interrupt window (here, while the exit is handled) and the
    guest's IF is set: KVM_RUN returns IRQ_WINDOW_OPEN right after the exit."""
    vcpus = []

    def ask(ctx):
        vcpus[0].request_interrupt_window = True

    vm, vcpu = launched(Answers(ask), prelude="    sti\n    nop\n")
    vcpus.append(vcpu)
    exit_ = vcpu.run(10)
    assert isinstance(exit_, IrqWindowOpen), exit_.describe()
    assert_replied(vm, INFO_BITS, GUEST_RAX)


def test_a_requires_that_fails_ends_the_run_with_the_bitmap_already_cleared():
    """``sev_es_sync_from_ghcb`` cleared the page's valid bitmap before validation ran
    the plugin's requires(): the VM ends naming the plugin, and the page shows it."""

    def broken(ghcb):
        raise RuntimeError("no")

    vm, vcpu = launched(Answers(requires=broken))
    exit_ = vcpu.run(10)
    assert isinstance(exit_, RunFailed) and exit_.plugin == "answers", exit_.describe()
    assert page(vm).valid_bitmap == 0


@pytest.mark.parametrize("answer", [list, tuple, iter])
def test_requires_answers_of_any_iterable_are_checked_every_time(answer):
    """A callable's answer is checked whatever it is (a fresh list, a tuple made each
    time, a one-shot iterator): an unknown name in the second answer ends the VM,
    though the first answer was fine."""
    answers = [["rax"], ["no_such_field"]]

    def requires(ghcb):
        return answer(answers.pop(0))

    vm, vcpu = launched(Answers(requires=requires), requests=2)
    exit_ = vcpu.run(10)
    assert isinstance(exit_, RunFailed) and exit_.plugin == "answers", exit_.describe()
    assert "no_such_field" in exit_.why and answers == []
    # The first request lacked a valid RAX (MISSING_INPUT); the second's bitmap was
    # cleared before its requires() failed.
    assert page(vm).valid_bitmap == 0


def test_a_static_requires_is_checked_on_every_request():
    """A tuple given as ``requires`` (checked once, when the row was made) still
    refuses each request that lacks its fields."""
    vm, vcpu = launched(Answers(requires=("rax",)), requests=2)
    assert isinstance(vcpu.run(10), Hlt)
    g = page(vm)
    assert (g["sw_exit_info_1"], g["sw_exit_info_2"]) == (2, GhcbErr.MISSING_INPUT)


# -- the compiled pieces agree with the layout ----------------------------------------------


def test_the_request_read_agrees_with_the_per_field_reads():
    names = ("cpl", "rax", "rcx", "sw_exit_code", "xcr0", "valid_bitmap", "ghcb_usage")
    reader = page_reader(*names)
    rng = random.Random(5)
    for _ in range(20):
        g = Ghcb(rng.randbytes(GHCB_PAGE_SIZE))
        got = dict(zip(reader.names, reader.get(g.raw), strict=True))
        assert got == {name: g[name] for name in names}
    with pytest.raises(LayoutError, match="does not follow"):
        FieldReader(GHCB_SAVE_AREA[name] for name in ("rcx", "rax"))
    with pytest.raises(LayoutError, match="no field"):
        page_reader("rax", "no_such_field")


def test_valid_masks_are_the_bitmap_bits():
    g = Ghcb()
    for name in ("rax", "sw_scratch", "xcr0", "cpl"):
        g.set_valid(name)
    assert g.valid_bitmap == valid_mask(("rax", "sw_scratch", "xcr0", "cpl"))
    assert valid_mask(REGISTER_FIELDS) == sum(1 << valid_bit(n) for n in REGISTER_FIELDS)


def test_the_compiled_reply_and_register_writes_are_set_fields():
    rng = random.Random(9)
    raw = rng.randbytes(GHCB_PAGE_SIZE)
    fast, slow = MappedGhcb(raw, 0x1000), MappedGhcb(raw, 0x1000)
    fast.put_exit_info(1, 1 << 63)
    slow.set_fields(EXIT_INFO, (1, 1 << 63))
    fast.put_gprs(1, 2, 3, 4)
    slow.set_fields(("rax", "rbx", "rcx", "rdx"), (1, 2, 3, 4))
    assert fast.raw == slow.raw
    assert fast._written == slow._written
    # RAX alone, RCX..RBX adjacent, the two infos adjacent, three bitmap bytes.
    assert fast._written == ((0x1F8, 8), (0x308, 24), (0x398, 16), (0x3F7, 1), (0x3FC, 1),
                             (0x3FE, 1))  # fmt: skip


def test_written_bytes_merge_into_runs_and_touch_stays_in_the_page():
    g = MappedGhcb(bytes(GHCB_PAGE_SIZE), 0x1000)
    g.touch(0x800, 8)
    g.touch(0x808, 8)  # adjacent: one run
    g.touch(0x804, 2)  # inside: nothing new
    g.touch(0x900, 0)  # nothing at all
    assert g._written == ((0x800, 16),)
    for offset, length in ((-1, 2), (0xFFF, 2), (0x10, -1)):
        with pytest.raises(LayoutError, match="not a span"):
            g.touch(offset, length)


class _Memory:
    def __init__(self) -> None:
        self.writes: list[tuple[int, list[tuple[int, bytes]]]] = []

    def write_parts(self, gpa, parts):
        self.writes.append((gpa, [(offset, bytes(data)) for offset, data in parts]))


def test_a_flush_writes_each_run_once_and_forgets_it():
    g = MappedGhcb(bytes(GHCB_PAGE_SIZE), 0x7000)
    g.clear_valid_bitmap()
    g.put_exit_info(2, GhcbErr.INVALID_USAGE)
    memory = _Memory()
    g.flush(memory)
    g.flush(memory)  # nothing written since
    assert memory.writes == [(0x7000, [(0x398, (2).to_bytes(8, "little")
                                        + (2).to_bytes(8, "little")),
                                       (0x3F0, bytes(14) + b"\x18\x00")])]  # fmt: skip


@pytest.mark.parametrize("bad", [-1, 1 << 64, "x"])
def test_a_plugin_reply_out_of_range_is_refused_as_a_field_write_is(bad):
    """ctx.set_exit_info checks a plugin's values: info_1 is written, then info_2 is
    refused with the layout's error, as ``ghcb[name] = value`` refuses it."""
    errors = []

    def reply(ctx):
        try:
            ctx.set_exit_info(7, bad)
        except LayoutError as error:
            errors.append(error)

    vm, vcpu = launched(Answers(reply))
    assert isinstance(vcpu.run(10), Hlt)
    assert len(errors) == 1
    assert page(vm)["sw_exit_info_1"] == 7
