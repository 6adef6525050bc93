"""``sevsim run`` and ``sevsim guests``: run a guest, a manifest or a firmware image.

What runs: a guest manifest given by path (``sevsim run hello.toml``), a bundled one
by name (``--guest demo``; ``sevsim guests`` lists them), the demo when neither is
given, or a firmware image (``--firmware``, :mod:`sevsim.cli_firmware`).

A manifest's ``[plugins]`` table is a layer of the plugin configuration between
``sevsim.toml`` and the environment (``-p`` still wins), and its ``[kvm]`` table
replaces ``sevsim.toml``'s (``--era`` still wins): docs/guest-manifests.md. A
long-mode guest runs on one vCPU through :func:`sevsim.vmm.runner.run_image`, with
the text trace on stdout; a ``boot = "reset"`` manifest is a firmware image and runs
on the ``pc`` machine like ``--firmware`` (so it needs the 32 MiB the machine needs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sevsim.cli_base import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_STATUS_TABLE,
    Parser,
    add_command,
    plugin_flags,
    plugin_host,
    say,
    verbosity,
    warn_problems,
)
from sevsim.cli_firmware import (
    MACHINE_OPTIONS,
    add_machine_options,
    machine_options_given,
    run_firmware,
    run_pc,
)
from sevsim.cli_trace import TraceOutput, add_trace_options
from sevsim.errors import ConfigError, SevsimError
from sevsim.kvm.exits import KvmExit, RunFailed
from sevsim.kvm.vm import Kvm, Vm
from sevsim.manifest import (
    DEVICES,
    GuestManifest,
    bundled_guests,
    find_guest,
    load_manifest,
)
from sevsim.plugin.config import config_file, load_config
from sevsim.plugin.host import PluginHost
from sevsim.vmm.boot import launch_pc_image
from sevsim.vmm.config import KvmSettings, kvm_settings, load_kvm_settings
from sevsim.vmm.firmware import load_firmware
from sevsim.vmm.pc import PcConfig, PcMachine
from sevsim.vmm.runner import TIMEOUT_EXPECTED, RunResult, check_timeout, run_image
from sevsim.vmm.vmm import EndKind

#: ``--timeout`` of a guest (not of ``--firmware``, which has none by default).
GUEST_TIMEOUT = 60.0


def _manifest(args: argparse.Namespace) -> GuestManifest:
    if args.manifest is not None and args.guest is not None:
        raise ConfigError(f"give a manifest ({args.manifest}) or --guest {args.guest}, not both")
    path = Path(args.manifest) if args.manifest is not None else find_guest(args.guest or "demo")
    return load_manifest(path)


def _host(args: argparse.Namespace, manifest: GuestManifest) -> PluginHost:
    """The plugins: sevsim.toml < the manifest's [plugins] < environment < ``-p``."""
    config = load_config(args.config, cli=plugin_flags(args), strict=args.strict,
                         over_file=manifest.plugin_config)  # fmt: skip
    return PluginHost(config)


def _kvm(args: argparse.Namespace, manifest: GuestManifest) -> KvmSettings:
    """The manifest's [kvm] instead of sevsim.toml's, ``--era`` over either."""
    own = manifest.kvm
    if own is None:
        return load_kvm_settings(config_file(args.config), args.era)
    table = {"era": own.era, **({"ghcb_version": own.ghcb_version} if own.ghcb_version else {})}
    return kvm_settings(table, f"{manifest.path}: [kvm]", args.era)


def cmd_run(args: argparse.Namespace) -> int:
    """Run a guest (or a firmware image) and give the exit status of its end."""
    parser: argparse.ArgumentParser = args.parser
    if args.firmware is not None:
        if args.manifest is not None or args.guest is not None:
            parser.error("--firmware runs a firmware image: give no manifest or --guest")
        firmware = load_firmware(args.firmware)
        kvm = load_kvm_settings(config_file(args.config), args.era)
        config = PcConfig(args.vcpus, args.memory)
        return run_firmware(args, firmware, config, plugin_host(args), kvm)
    manifest = _manifest(args)
    if manifest.boot == "reset" or manifest.vcpus > 1:
        return _run_pc(args, parser, manifest)
    given = machine_options_given(args, parser, tuple(MACHINE_OPTIONS))
    if given:
        parser.error(f"{', '.join(given)}: only for --firmware, boot = \"reset\" guests and "
                     "guests with APs")  # fmt: skip
    return _run_image(args, manifest)


def _run_pc(args: argparse.Namespace, parser: argparse.ArgumentParser,
            manifest: GuestManifest) -> int:  # fmt: skip
    """A manifest that runs on the ``pc`` machine, as ``--firmware`` runs a firmware
    image, with the manifest's vCPUs and memory: a ``boot = "reset"`` guest (its images
    are a firmware image) or a long-mode guest with APs."""
    what = 'a boot = "reset"' if manifest.boot == "reset" else "a long-mode guest with APs"
    given = machine_options_given(args, parser, ("vcpus", "memory"))
    if given:
        parser.error(f"{', '.join(given)}: {manifest.path} sets the vCPUs and memory itself")
    if set(DEVICES) - manifest.devices:
        off = ", ".join(sorted(set(DEVICES) - manifest.devices))
        raise ConfigError(f"{manifest.path}: [devices] turns off {off}, but {what} guest runs "
                          "on the pc machine, whose devices are fixed")  # fmt: skip
    if args.check:
        raise ConfigError(f"--check: {manifest.path} is {what} guest; --check compares "
                          "long-mode guests on one vCPU only")  # fmt: skip
    build = manifest.build()
    try:
        config = PcConfig(build.vcpus, build.ram_size)
    except ConfigError as e:
        raise ConfigError(f"{manifest.path}: guest.memory_mib = {manifest.memory_mib}: the pc "
                          f"machine that runs {what} guest refuses it ({e})") from None
    host, kvm = _host(args, manifest), _kvm(args, manifest)
    if build.firmware is not None:
        return run_firmware(args, build.firmware, config, host, kvm)
    image = build.image
    assert image is not None  # long mode

    def launch(kvm: Kvm, **launch_args: Any) -> tuple[Vm, PcMachine]:
        return launch_pc_image(kvm, image, config, ap_entry=build.ap_entry,
                               vcpu_type=args.vcpu_type, **launch_args)  # fmt: skip

    timeout = GUEST_TIMEOUT if args.timeout is None else args.timeout
    return run_pc(args, launch, host, kvm, timeout=timeout)


def _run_image(args: argparse.Namespace, manifest: GuestManifest) -> int:
    kvm = _kvm(args, manifest)
    host = _host(args, manifest)
    table = host.start()
    warn_problems(host)
    build = manifest.build()
    assert build.image is not None  # long mode
    timeout = GUEST_TIMEOUT if args.timeout is None else args.timeout
    with TraceOutput(args, text_stream=sys.stdout, text_by_default=True) as out:
        out.phase("launch")
        result = run_image(
            build.image, table, out.events(host.events), trace=out.trace,
            sim=out.sim(host.sim), make_devices=build.make_devices, timeout=timeout,
            uart_input=_uart_input(args), ram_size=build.ram_size, vc_model=build.vc_model,
            **kvm.vm_args(),
        )  # fmt: skip
        out.phase("end")
        # KVM_DESTROY_VM as the VMM exits: the ASID and firmware context go back, and
        # observers hear sevsim_vm_destroyed (the run's outcome is read already).
        result.vm.destroy()
    for line in result.trace.summary(result.exit, 0):
        print(line)
    status = _status(result, timeout)
    if args.check:
        status = _check(manifest, result) or status
    return status


def _uart_input(args: argparse.Namespace) -> bytes:
    if args.uart_input is None:
        return b""
    return sys.stdin.buffer.read() if args.uart_input == "-" else args.uart_input.encode()


def _timed_out(exit_: KvmExit) -> bool:
    """KVM_RUN interrupted by its own time limit (not a plugin's overrun)."""
    return isinstance(exit_, RunFailed) and exit_.errno == "EINTR" and exit_.plugin is None


def _status(result: RunResult, timeout: float) -> int:
    failure = result.failure
    if failure is None:
        return EXIT_OK
    if _timed_out(result.exit):
        say(f"run ended (limit, exit status {EndKind.LIMIT.default_status}): --timeout "
            f"{timeout:g} s passed: {result.exit.describe()}")  # fmt: skip
        return EndKind.LIMIT.default_status
    say(f"run failed: {failure}")
    return EXIT_FAILED


def _check(manifest: GuestManifest, result: RunResult) -> int:
    """``--check``: compare the run with the manifest's ``[expect]``."""
    if manifest.expect is None:
        raise ConfigError(f"--check: {manifest.path} has no [expect] table to check against")
    mismatches = manifest.expect.mismatches(result.exit, result.devices, result.trace)
    for mismatch in mismatches:
        say(f"check: {manifest.path}: {mismatch}", "error")
    if not mismatches:
        say(f"check: {manifest.path}: the run went as [expect] says")
        return EXIT_OK
    return EXIT_FAILED


def _timeout(text: str) -> float:
    """``--timeout``: a finite number of seconds > 0."""
    try:
        return check_timeout(float(text), "--timeout")
    except (ValueError, SevsimError):
        raise argparse.ArgumentTypeError(f"{text!r}: {TIMEOUT_EXPECTED}") from None


_RUN_EXAMPLES = [
    "sevsim run                                  # the demo guest, its trace on stdout",
    "sevsim run --guest demo -q                  # only the summary",
    "sevsim run my-guest.toml --check            # a manifest, checked against [expect]",
    "sevsim run --guest demo --trace-format text,jsonl --trace-file run.jsonl",
    "sevsim run --guest demo --trace-filter 'event=vmgexit_enter;code=SVM_EXIT_IOIO'",
    "sevsim run -p no:mmio --era v5.11           # without a plugin, the original series",
    "cp /usr/share/OVMF/OVMF_VARS.fd vars.fd",
    "sevsim run --firmware /usr/share/OVMF/OVMF_CODE.fd --vars vars.fd --vcpus 4 -m 1G",
    "sevsim run --firmware OVMF_CODE.fd --icount --max-exits 5000 --trace-file boot.jsonl",
]


def add_run_command(commands: argparse._SubParsersAction[Parser]) -> None:
    run = add_command(
        commands, "run", "run a guest (manifest, bundled guest or firmware image) and trace it",
        description="Run a guest as an SEV-ES VM under sevsim's KVM and trace every exit. "
                    "The guest is a manifest file, a bundled guest (--guest NAME, see "
                    "`sevsim guests`; the demo when none is given) or a firmware image "
                    "(--firmware: the UART is the terminal, the launch digest goes to "
                    "stderr).",
        examples=_RUN_EXAMPLES, epilog=EXIT_STATUS_TABLE,
    )  # fmt: skip
    run.add_argument("manifest", nargs="?", metavar="MANIFEST",
                     help="a guest manifest (docs/guest-manifests.md)")
    run.add_argument("--guest", metavar="NAME", help="a bundled guest (sevsim guests)")
    run.add_argument("--check", action="store_true",
                     help="compare the run with the manifest's [expect]: status 1 if it "
                          "differs")
    run.add_argument("--era", metavar="ERA", help="KVM behaviour: newest (default) or v5.11")
    run.add_argument("--timeout", metavar="SECONDS", type=_timeout,
                     help=f"end a run that takes longer than this (exit status 4; default "
                          f"{GUEST_TIMEOUT:g} for a guest, none for --firmware)")
    run.add_argument("--uart-input", metavar="TEXT",
                     help="bytes the guest can read from the UART ('-': all of stdin, for a "
                          "guest). With --firmware the UART reads stdin by default")
    add_machine_options(run)
    add_trace_options(run)
    run.set_defaults(func=cmd_run, parser=run)  # fmt: skip


# --- sevsim guests --------------------------------------------------------------------------


def cmd_guests(args: argparse.Namespace) -> int:
    """List the bundled guests with their one-line descriptions."""
    guests = {name: load_manifest(path) for name, path in bundled_guests().items()}
    if verbosity(args) < 0:
        print("\n".join(guests))
        return EXIT_OK
    width = max(map(len, guests), default=0)
    for name, manifest in guests.items():
        print(f"{name.ljust(width)}  {manifest.description or '-'}")
        if verbosity(args) > 0:
            print(f"{' ' * width}  {manifest.path}")
    return EXIT_OK


def add_guests_command(commands: argparse._SubParsersAction[Parser]) -> None:
    guests = add_command(
        commands, "guests", "list the bundled guests (run one with sevsim run --guest NAME)",
        examples=["sevsim guests", "sevsim guests -v   # with the manifest files",
                  "sevsim run --guest demo"],
    )  # fmt: skip
    guests.set_defaults(func=cmd_guests)
