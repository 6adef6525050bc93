"""What the host sees of guest memory, and what the guest sees of host writes."""

import struct

import pytest
from guests import guest, launch

from sevsim.errors import GuestMemoryError
from sevsim.guest.snippets import TERMINATE
from sevsim.hw.crypto import new_key
from sevsim.hw.memory import SHARED, GuestMemory
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
