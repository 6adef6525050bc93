"""What the host sees of guest memory, and what the guest sees of host writes."""

import struct

import pytest
from guests import guest, launch

from sevsim.errors import GuestMemoryError
from sevsim.guest.snippets import TERMINATE
from sevsim.hw.crypto import new_key
from sevsim.hw.memory import SHARED, Change, GuestMemory
from sevsim.kvm.exits import SystemEvent

PAGE = bytes(range(256)) * 16
GHCB = 0x7000


def run_to_term(vm):
    exit_ = vm.vcpus[0].run()
    assert isinstance(exit_, SystemEvent), exit_
    return exit_


def test_host_reads_ciphertext_that_differs_for_equal_plaintext():
    vm = launch(guest("hlt", data={0x30000: PAGE, 0x31000: PAGE}))
    a, b = vm.memory.read(0x30000, 4096), vm.memory.read(0x31000, 4096)
    assert a != PAGE and b != PAGE
    assert a != b  # the tweak is the page address
    assert vm.memory.read(0x30010, 16) == a[16:32]  # partial reads of the same ciphertext


def test_shared_page_reads_as_plaintext_both_ways():
    vm = launch(guest("""
        mov rsi, 0x7000            /* the GHCB page is mapped C=0 */
        mov rax, 0x1122334455667788
        mov [rsi + 8], rax
        mov rbx, [rsi + 0x10]      /* what the host put there */
        mov [rsi + 0x18], rbx
    """ + TERMINATE))
    vm.memory.write(GHCB + 0x10, struct.pack("<Q", 0xCAFEF00D))
    run_to_term(vm)
    assert vm.memory.read(GHCB + 8, 8) == struct.pack("<Q", 0x1122334455667788)
    assert vm.memory.read(GHCB + 0x18, 8) == struct.pack("<Q", 0xCAFEF00D)


def test_host_write_into_private_page_reaches_the_guest_as_garbage():
    vm = launch(guest("""
        mov rsi, 0x32000
        mov rax, [rsi]
        mov rdi, 0x7000
        mov [rdi + 8], rax
    """ + TERMINATE, data={0x32000: PAGE}))
    planted = b"\x41" * 8
    vm.memory.write(0x32000, planted)
    run_to_term(vm)
    seen = vm.memory.read(GHCB + 8, 8)
    assert seen != planted and seen != PAGE[:8]


def test_guest_mapping_a_private_page_shared_sees_its_ciphertext():
    # PT entry 0x1ff maps virtual 0x1ff000; point it at private page 0x33000 with C=0.
    vm = launch(guest("""
        mov rax, 0x33003           /* present | writable, no C-bit */
        mov rsi, 0x4000 + 0x1ff * 8
        mov [rsi], rax
        mov rsi, 0x1ff000
        mov rax, [rsi]
        mov rdi, 0x7000
        mov [rdi + 8], rax
        mov rsi, 0x33000           /* through the identity (C=1) mapping again */
        mov rax, [rsi]
        mov [rdi + 0x10], rax
    """ + TERMINATE, data={0x33000: PAGE}))
    ciphertext = vm.memory.read(0x33000, 8)
    run_to_term(vm)
    assert vm.memory.read(GHCB + 8, 8) == ciphertext
    assert vm.memory.read(GHCB + 0x10, 8) == PAGE[:8]


def test_memory_model_unit_rules():
    mem = GuestMemory()
    mem.add_ram(0, 0x4000)
    with pytest.raises(GuestMemoryError, match="overlaps"):
        mem.add_ram(0x3000, 0x1000)
    with pytest.raises(GuestMemoryError, match="page-aligned"):
        mem.add_mmio(0x10010, 0x1000, "bad")
    with pytest.raises(GuestMemoryError, match="not inside one RAM region"):
        mem.host_read(0x3ff0, 0x20)
    mem.host_write(0x1000, PAGE)
    key = new_key()
    assert mem.launch_encrypt(0x1000, 0x1000, key) == PAGE
    assert mem.owner(0x1000) == mem.key_id(key) != SHARED
    assert mem.guest_read(0x1000, 16, mem.key_id(key)) == PAGE[:16]
    assert mem.host_read(0x1000, 16) != PAGE[:16]
    with pytest.raises(GuestMemoryError, match="already encrypted"):
        mem.launch_encrypt(0x1000, 0x1000, new_key())


def test_launched_whole_pages_come_back_as_a_read_only_view():
    """A firmware image's pages are measured from a view of the buffer, not a copy; the
    firmware gets no way to write guest plaintext through it."""
    mem = GuestMemory()
    mem.add_ram(0, 0x4000)
    mem.host_write(0x1000, PAGE * 2)
    launched = mem.launch_encrypt(0x1000, 0x2000, new_key())
    assert isinstance(launched, memoryview) and launched.readonly
    assert launched == PAGE * 2
    with pytest.raises(TypeError):
        launched[0] = 0


def test_a_page_launched_in_part_shows_only_the_launched_bytes_as_plaintext():
    # The host places 16 measured bytes and 16 unmeasured ones in one page; only the
    # measured ones may reach the guest intact (no way around the launch digest).
    mem, key = GuestMemory(), new_key()
    mem.add_ram(0, 0x2000)
    mem.host_write(0x1000, b"M" * 16 + b"U" * 16)
    assert mem.launch_encrypt(0x1000, 16, key) == b"M" * 16
    seen = mem.guest_read(0x1000, 32, mem.key_id(key))
    assert seen[:16] == b"M" * 16
    assert seen[16:] != b"U" * 16
    # A later launch into the same page measures, and hands the guest, what the host
    # wrote there since (encryption is modelled per page, so that write garbles the
    # rest of the page's guest view; hardware would garble only its 16-byte blocks).
    mem.host_write(0x1020, b"N" * 16)
    assert mem.launch_encrypt(0x1020, 16, key) == b"N" * 16
    assert mem.guest_read(0x1020, 16, mem.key_id(key)) == b"N" * 16


# -- whole runs of pages at once (an image placed and launched) --------------------------


def _filled(size: int, base: int = 0x10000) -> tuple[GuestMemory, bytes]:
    """Memory with two RAM regions side by side, the host's bytes written over both."""
    mem = GuestMemory()
    mem.add_ram(base, size // 2, "low")
    mem.add_ram(base + size // 2, size // 2, "high")
    data = bytes((i * 7 + i // 4096) & 0xFF for i in range(size))
    mem.host_write(base, data)
    return mem, data


@pytest.mark.parametrize(("start", "length"), [
    (0x10000, 0x4000),  # a whole region (launched at once)
    (0x11000, 0x2000),  # whole pages inside one region (at once)
    (0x10000, 0x8000),  # whole pages of both regions
    (0x10010, 0x7FE0),  # a partial page at each end
    (0x11FF0, 0x20),  # one 16-byte block each side of a page boundary
    (0x13000, 0x1010),  # whole pages across the region boundary, a partial tail
])  # fmt: skip
def test_launching_a_range_equals_launching_it_page_by_page(start, length):
    key = new_key()
    bulk, data = _filled(0x8000)
    paged, _ = _filled(0x8000)
    measured = bulk.launch_encrypt(start, length, key)
    assert measured == data[start - 0x10000 : start - 0x10000 + length]
    pieces = []
    for gpa in range(start, start + length, 16):  # never more than a block at a time
        pieces.append(paged.launch_encrypt(gpa, 16, key))
    assert b"".join(pieces) == measured
    kid = bulk.key_id(key)
    for page in range(0x10000, 0x18000, 0x1000):
        assert bulk.owner(page) == paged.owner(page)
        assert bulk.host_read(page, 0x1000) == paged.host_read(page, 0x1000)
    assert bulk.guest_read(start, length, kid) == measured


@pytest.mark.parametrize("end", [0x14000, 0x18000])  # one region, or both
def test_launching_over_a_private_page_refuses_it_after_the_pages_before(end):
    first, second = new_key(), new_key()
    mem, _ = _filled(0x8000)
    mem.launch_encrypt(0x12000, 0x1000, first)
    with pytest.raises(GuestMemoryError, match="page 0x12000 is already encrypted"):
        mem.launch_encrypt(0x10000, end - 0x10000, second)
    # As page by page: the pages before the refused one were launched, none after.
    owners = [mem.owner(page) for page in range(0x10000, 0x18000, 0x1000)]
    assert owners == [mem.key_id(second)] * 2 + [mem.key_id(first)] + [SHARED] * 5


def test_a_host_write_over_shared_and_private_pages():
    key = new_key()
    mem, data = _filled(0x8000)
    kid = mem.key_id(key)
    mem.launch_encrypt(0x12000, 0x1000, key)
    seen: list[tuple[int, int]] = []
    mem.on_page_changed.append(lambda page, change: seen.append((page, change)))
    planted = b"\x5a" * 0x3000
    mem.host_write(0x11800, planted)
    assert mem.host_read(0x11800, 0x800) == planted[:0x800]  # shared: as written
    assert mem.host_read(0x12000, 0x1000) == planted[0x800:0x1800]  # private: DRAM as written
    assert mem.guest_read(0x12000, 16, kid) != planted[:16]  # the guest sees garbage
    assert mem.host_read(0x13000, 0x800) == planted[0x1800:0x2000]
    assert mem.host_read(0x14800, 0x800) == data[0x4800:0x5000]  # untouched
    assert sorted(page for page, _ in seen) == list(range(0x11000, 0x15000, 0x1000))


def test_a_large_host_write_into_shared_pages_tells_every_page():
    mem, data = _filled(0x8000)
    seen: list[tuple[int, int]] = []
    mem.on_page_changed.append(lambda page, change: seen.append((page, change)))
    planted = b"\xa5" * 0x2800
    mem.host_write(0x10800, planted)  # inside the low region, all shared: one copy
    assert mem.host_read(0x10000, 0x4000) == data[:0x800] + planted + data[0x3000:0x4000]
    assert seen == [(page, Change.BYTES) for page in (0x10000, 0x11000, 0x12000)]
