"""Many guests in one long-lived process (issue 11: a fuzz worker was OOM-killed after
~1,000 guests, each run with a timeout leaving a thread that held its engine and RAM).

A fuzzing campaign, a test session and a VMM that restarts guests all live this way:
every guest run with a time limit, destroyed afterwards, must give back its thread,
its Unicorn engine and its guest RAM.
"""

from __future__ import annotations

import gc
import os
import threading

from guests import guest, term_table

from sevsim.guest.snippets import TERMINATE
from sevsim.kvm.exits import Hlt, SystemEvent
from sevsim.kvm.vm import Kvm
from sevsim.vmm.launch import launch_image

GUESTS = 300
WARM_UP = 30
#: RSS growth allowed over the measured guests: a leak of one guest's RAM and engine
#: (~19 MiB each before the fix) would be gigabytes.
RSS_SLACK_MIB = 40


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _one_guest(kvm: Kvm, table: object) -> None:
    """A guest that touches memory, exits twice (halt, then terminate) under a limit."""
    vm = launch_image(kvm, guest("mov rdi, 0x100000; mov ecx, 0x2000; rep stosq; hlt"
                                 + TERMINATE), handlers=table)  # fmt: skip
    try:
        assert isinstance(vm.vcpus[0].run(30.0), Hlt)
        assert isinstance(vm.vcpus[0].run(30.0), SystemEvent)
    finally:
        vm.destroy()


def test_300_guests_with_timeouts_keep_threads_and_memory_flat():
    kvm, table = Kvm(), term_table()
    for _ in range(WARM_UP):  # the host timer's thread starts; caches fill
        _one_guest(kvm, table)
    gc.collect()
    threads, rss = threading.active_count(), _rss_mib()
    for _ in range(GUESTS - WARM_UP):
        _one_guest(kvm, table)
    gc.collect()
    assert threading.active_count() == threads
    assert _rss_mib() - rss < RSS_SLACK_MIB, f"RSS {rss:.0f} -> {_rss_mib():.0f} MiB"
