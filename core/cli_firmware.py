"""Firmware on the command line: ``sevsim run --firmware`` and ``sevsim measure``.

``run --firmware FILE`` boots a firmware image (Debian's OVMF_CODE.fd) on QEMU's
``pc`` machine as an SEV-ES guest, as ``qemu-system-x86_64 -machine pc`` with
``-drive if=pflash`` does: :func:`sevsim.vmm.boot.launch_pc` launches it (printing
the launch digest on stderr first) and :class:`sevsim.vmm.vmm.Vmm` runs every vCPU
until the run ends; the end's :class:`~sevsim.vmm.vmm.EndKind` is the exit status.
The UART is the terminal (:mod:`sevsim.cli_console`); the trace goes to stderr
(``-v``) and to ``--trace-file``.

``measure`` prints the same launch digest without running anything: the firmware is
launched on a fresh platform up to LAUNCH_MEASURE. Its options and output are those
of ``sev-snp-measure --mode seves`` (the same vCPU type names, hex or base64), so it
can stand in for it.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import sys
from collections.abc import Callable
from typing import Any

from sevsim.cli_base import (
    EXIT_OK,
    Parser,
    add_command,
    say,
    verbosity,
    warn_problems,
)
from sevsim.cli_boot_progress import BootProgress
from sevsim.cli_console import SerialConsole
from sevsim.cli_trace import TraceOutput
from sevsim.hw import Platform
from sevsim.kvm.events import TeeSink
from sevsim.kvm.vm import Kvm, Vm
from sevsim.plugin.host import PluginHost
from sevsim.vmm.boot import DEFAULT_VCPU_TYPE, launch_pc
from sevsim.vmm.clock import MachineClock
from sevsim.vmm.config import KvmSettings
from sevsim.vmm.cpu_types import VCPU_TYPES, vcpu_signature
from sevsim.vmm.firmware import FirmwareImage, load_firmware
from sevsim.vmm.launch import launch_firmware
from sevsim.vmm.pc import DEFAULT_RAM, PcConfig, PcMachine
from sevsim.vmm.pflash import VarsFile
from sevsim.vmm.vmm import ClockMode, RunEnd, Vmm

_SIZE = re.compile(r"(\d+)([KMGT]?)(i?B)?", re.IGNORECASE)
_SCALE = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def memory_size(text: str) -> int:
    """``--memory``: bytes from QEMU's ``-m`` syntax: ``512M``, ``2G``, ``4096K``; a
    bare number is MiB, as in QEMU."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a size such as 512M or 2G (a bare number is MiB)"
        )
    return int(match[1]) * _SCALE[match[2].upper()]


def vcpu_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of vCPUs >= 1")
    return int(text)


def vcpu_type(text: str) -> str:
    if text not in VCPU_TYPES:
        raise argparse.ArgumentTypeError(
            f"{text!r}: unknown vCPU type; expected one of {', '.join(VCPU_TYPES)}"
        )
    return text


def max_exits(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of exits >= 1")
    return int(text)


def add_machine_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``run --firmware`` (and those ``measure`` shares with it)."""
    group = parser.add_argument_group("firmware (QEMU's pc machine)")
    group.add_argument("--firmware", metavar="FILE",
                       help="boot this firmware image (e.g. /usr/share/OVMF/OVMF_CODE.fd) "
                            "instead of a guest")
    group.add_argument("--vars", metavar="FILE",
                       help="the UEFI variable store (a copy of OVMF_VARS.fd): flash unit 1, "
                            "written through as the guest changes it")
    group.add_argument("--vcpus", metavar="N", type=vcpu_count, default=1,
                       help="how many vCPUs (default 1)")
    group.add_argument("--memory", "-m", metavar="SIZE", type=memory_size,
                       default=DEFAULT_RAM, help="guest RAM, as QEMU's -m: 512M (default), 2G")
    group.add_argument("--vcpu-type", metavar="TYPE", type=vcpu_type, default=DEFAULT_VCPU_TYPE,
                       help=f"QEMU's -cpu model, part of the launch digest (default "
                            f"{DEFAULT_VCPU_TYPE}; the names of sev-snp-measure)")
    group.add_argument("--icount", action="store_true",
                       help="guest time from instructions retired: the same run every time "
                            "(slower); default: the host's clock")
    group.add_argument("--max-exits", metavar="N", type=max_exits,
                       help="end the run after N exits (exit status 4)")  # fmt: skip


#: The machine options by their ``args`` name: what only a firmware run takes.
MACHINE_OPTIONS = {
    "vars": "--vars", "vcpus": "--vcpus", "memory": "--memory", "vcpu_type": "--vcpu-type",
    "icount": "--icount", "max_exits": "--max-exits",
}  # fmt: skip


def machine_options_given(
    args: argparse.Namespace, parser: argparse.ArgumentParser, among: tuple[str, ...]
) -> list[str]:
    """Which of the machine options ``among`` were given a value other than the default."""
    return [MACHINE_OPTIONS[dest] for dest in among
            if getattr(args, dest) != parser.get_default(dest)]  # fmt: skip


# --- sevsim run --firmware -------------------------------------------------------------------


#: Launches a VM on a ``pc`` machine: ``launch(kvm, **launch_args)`` with the keyword
#: arguments :func:`~sevsim.vmm.boot.launch_pc` and ``launch_pc_image`` share.
PcLauncher = Callable[..., tuple[Vm, PcMachine]]


def run_firmware(
    args: argparse.Namespace,
    firmware: FirmwareImage,
    config: PcConfig,
    host: PluginHost,
    kvm_settings: KvmSettings,
) -> int:
    """Boot ``firmware`` on a ``pc`` machine of ``config`` with ``host``'s plugins and
    run it to the end; the end's exit status."""
    vars_store = VarsFile(args.vars) if args.vars else None

    def launch(kvm: Kvm, **launch_args: Any) -> tuple[Vm, PcMachine]:
        return launch_pc(kvm, firmware, config, vcpu_type=args.vcpu_type, vars_store=vars_store,
                         vars_size=vars_store.size if vars_store else 0, **launch_args)  # fmt: skip

    return run_pc(args, launch, host, kvm_settings, timeout=args.timeout, vars_store=vars_store)


def run_pc(
    args: argparse.Namespace,
    launch: PcLauncher,
    host: PluginHost,
    kvm_settings: KvmSettings,
    *,
    timeout: float | None,
    vars_store: VarsFile | None = None,
) -> int:
    """Launch a guest on a ``pc`` machine with ``launch`` and ``host``'s plugins, run
    every vCPU to the end (or ``timeout`` seconds); the end's exit status.
    ``vars_store`` is the firmware's variable store, reported on if the guest's writes
    could not be saved."""
    extensions = host.start()
    warn_problems(host)
    clock = MachineClock()
    console = SerialConsole(sys.stdin, sys.stdout, read_input=args.uart_input is None)
    with TraceOutput(args, text_stream=sys.stderr, text_by_default=verbosity(args) > 0,
                     guest_clock=clock.now_ns, host_times=not args.icount) as out:  # fmt: skip
        kvm = Kvm(Platform(sim=out.sim(host.sim, out.trace)))
        out.phase("launch")
        # On a terminal, quiet or verbose aside, a status line shows where the boot is.
        progress = BootProgress() if verbosity(args) == 0 and sys.stderr.isatty() else None
        events = out.events(host.events, out.trace)

        def console_write(data: bytes) -> None:
            console.write(data)
            if progress is not None:
                progress.console(data)

        vm, machine = launch(
            kvm, clock=clock, handlers=extensions,
            events=events if progress is None else TeeSink(events, progress),
            machine_args={"console": console_write}, **kvm_settings.vm_args(),
        )  # fmt: skip
        digest = vm.launch_digest().hex()
        out.trace.note(f"launch digest {digest}")
        if verbosity(args) >= 0:
            say(f"launch digest {digest}")
        if args.uart_input is not None:
            machine.uart.input += args.uart_input.encode()
        vmm = Vmm(
            vm, machine, trace=out.trace,
            clock_mode=ClockMode.ICOUNT if args.icount else ClockMode.HOST,
            timeout=timeout, max_exits=args.max_exits,
            poll_input=console.poll if console.reads_input else None, idle=console.idle,
        )  # fmt: skip
        out.phase("run")
        if progress is not None:
            progress.start()
        try:
            with console:
                end = vmm.run()
        finally:
            if progress is not None:
                progress.stop()
        out.phase(f"end: {end.kind.label}")
        vm.destroy()  # KVM_DESTROY_VM as the VMM exits: observers hear of it
    _report_end(args, end, vmm, vars_store)
    return end.status


def _report_end(args: argparse.Namespace, end: RunEnd, vmm: Vmm, vars_store: VarsFile | None
                ) -> None:  # fmt: skip
    stats = vmm.stats()
    if vars_store is not None and vars_store.write_error is not None:
        say(f"--vars {args.vars}: the guest's variable writes were not saved: "
            f"{vars_store.write_error.strerror}", "warning")  # fmt: skip
    if verbosity(args) >= 0:
        insns = f", {stats.instructions} instructions" if stats.instructions is not None else ""
        say(f"{stats.exits} exits in {stats.wall_s:.2f} s, {stats.guest_ns / 1e9:.3f} s of "
            f"guest time{insns}")  # fmt: skip
    if end.ok:
        if verbosity(args) >= 0:
            say(f"run ended: {end.kind.label}: {end.why}")
    else:
        say(f"run ended ({end.kind.label}, exit status {end.status}): {end.why}")


# --- sevsim measure -------------------------------------------------------------------------


def launch_digest(firmware: FirmwareImage, vcpus: int, vcpu_type: str) -> bytes:
    """The SEV-ES launch digest of ``firmware`` on ``vcpus`` vCPUs of ``vcpu_type``:
    the launch of ``run --firmware`` up to LAUNCH_MEASURE, on a platform of its own."""
    vm = launch_firmware(Kvm(), firmware, vcpus=vcpus, vcpu_type=vcpu_type)
    vm.launch_measure()
    return vm.launch_digest()


def cmd_measure(args: argparse.Namespace) -> int:
    """Print the launch digest of a firmware image without running it."""
    firmware = load_firmware(args.firmware)
    digest = launch_digest(firmware, args.vcpus, args.vcpu_type)
    text = base64.b64encode(digest).decode() if args.output_format == "base64" else digest.hex()
    if args.json:
        print(json.dumps({
            "mode": "seves",
            "firmware": args.firmware,
            "vcpus": args.vcpus,
            "vcpu_type": args.vcpu_type,
            "vcpu_sig": f"{vcpu_signature(args.vcpu_type):#x}",
            "digest": text,
            "format": args.output_format,
        }, indent=2))  # fmt: skip
    else:
        print(text)
    return EXIT_OK


def add_measure_command(commands: argparse._SubParsersAction[Parser]) -> None:
    measure = add_command(
        commands, "measure",
        "print a firmware's SEV-ES launch digest without running it (as sev-snp-measure)",
        description="Print the launch digest `sevsim run --firmware` would measure for the "
                    "same image, vCPU count and type, without running anything. Options "
                    "and output match `sev-snp-measure --mode seves`.",
        examples=["sevsim measure --firmware /usr/share/OVMF/OVMF_CODE.fd --vcpus 4 "
                  "--vcpu-type EPYC-Milan",
                  "sevsim measure --ovmf OVMF_CODE.fd --vcpus 2 --vcpu-type EPYC-v4 --json",
                  "sev-snp-measure --mode seves --ovmf OVMF_CODE.fd --vcpus 4 "
                  "--vcpu-type EPYC-Milan   # the same digest"],
    )  # fmt: skip
    measure.add_argument("--firmware", "--ovmf", metavar="FILE", required=True,
                         help="the firmware image (OVMF_CODE.fd)")
    measure.add_argument("--mode", choices=["seves"], default="seves",
                         help="only seves, accepted for sev-snp-measure's command lines")
    measure.add_argument("--vcpus", metavar="N", type=vcpu_count, default=1,
                         help="how many vCPUs (default 1)")
    measure.add_argument("--vcpu-type", metavar="TYPE", type=vcpu_type,
                         default=DEFAULT_VCPU_TYPE,
                         help=f"QEMU's -cpu model (default {DEFAULT_VCPU_TYPE}): "
                              f"{', '.join(VCPU_TYPES)}")
    measure.add_argument("--output-format", choices=["hex", "base64"], default="hex",
                         help="how the digest is printed (default hex)")
    measure.add_argument("--json", action="store_true",
                         help="print a JSON object with the digest and its inputs")  # fmt: skip
    measure.set_defaults(func=cmd_measure)
