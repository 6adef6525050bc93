"""Guest manifests: checking, building and running guests described in TOML.

The examples of docs/guest-manifests.md are loaded and run here, so the document
cannot drift from what sevsim accepts.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from attrs import fields, frozen
from guests import term_table

from sevsim.errors import ConfigError
from sevsim.guest.demo import demo_image
from sevsim.guest.vc import VcHandler
from sevsim.guest.vc_native import VC_HANDLER_ADDRESS
from sevsim.hw import Platform
from sevsim.kvm.events import TeeSink
from sevsim.kvm.exits import KvmExit, RunFailed, SystemEvent, SystemEventType
from sevsim.kvm.vm import Kvm, Vm
from sevsim.manifest import (
    DEVICES,
    GUEST_KEYS,
    IMAGE_KEYS,
    SECTIONS,
    GuestManifest,
    bundled_guests,
    find_guest,
    load_manifest,
    parse_manifest,
)
from sevsim.manifest_expect import Expected
from sevsim.plugin.config import PluginConfig
from sevsim.plugin.host import PluginHost
from sevsim.testing import isolated_host
from sevsim.trace import Trace
from sevsim.vmm.config import KvmSettings
from sevsim.vmm.launch import launch_firmware, launch_image
from sevsim.vmm.machine import MMIO_TEST_GPA, Devices
from sevsim.vmm.runner import run_image

DOC = Path(__file__).parents[1] / "docs" / "guest-manifests.md"
#: Every guest here ends in well under a second; a hang must not hang the suite.
TIMEOUT = 30.0
TERMINATE = "mov ecx, 0xc0010130; mov eax, 0x100; xor edx, edx; wrmsr; rep vmmcall; hlt"
SEV_TERM = SystemEvent(SystemEventType.SEV_TERM, (0x100,))


@frozen
class Run:
    exit: KvmExit
    devices: Devices
    trace: Trace
    vm: Vm


def run(manifest: GuestManifest) -> Run:
    """Launch and run a long-mode manifest as ``sevsim run`` would, with the installed
    plugins and the manifest's [plugins] table over the defaults."""
    build = manifest.build()
    host = PluginHost(manifest.plugin_config(PluginConfig()))
    trace = Trace()
    devices = build.make_devices()
    kvm = build.kvm or KvmSettings()
    vm = launch_image(
        Kvm(Platform(sim=trace)),
        build.image,
        handlers=host.start(),
        events=TeeSink(host.events, trace),
        devices=devices,
        ram_size=build.ram_size,
        vc_model=build.vc_model,
        **kvm.vm_args(),
    )
    exit_ = vm.vcpus[0].run(TIMEOUT)
    trace.record_exit(0, exit_)
    return Run(exit_, devices, trace, vm)


def manifest(text: str, name: str | Path = "m.toml") -> GuestManifest:
    return parse_manifest(textwrap.dedent(text), name)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def long_guest(source: str, extra: str = "") -> str:
    return f"[[images]]\naddress = 0x20000\nsource = '''\n{source}\n'''\n{extra}"


# --- the document's examples --------------------------------------------------------------


def doc_blocks(language: str) -> list[tuple[str, str]]:
    """(info string after the language, body) of each fenced block in ``language``."""
    pattern = rf"^```{language}([^\n]*)\n(.*?)^```$"
    return [(m[1].strip(), m[2]) for m in re.finditer(pattern, DOC.read_text(), re.S | re.M)]


def test_the_document_has_the_two_examples():
    assert len(doc_blocks("toml")) == 2
    assert [name for name, _ in doc_blocks("asm")] == ["hello.s"]


def test_the_document_describes_every_key():
    documented = set(re.findall(r"^\| `(\w+)`", DOC.read_text(), re.M))
    keys = {*GUEST_KEYS, *IMAGE_KEYS, *DEVICES, *(f.name for f in fields(Expected))}
    assert keys <= documented
    assert all(f"### `[{table}]`" in DOC.read_text() for table in SECTIONS if table != "images")


@pytest.mark.parametrize("index", [0, 1])
def test_the_documents_examples_run_as_they_say(index, tmp_path):
    for name, body in doc_blocks("asm"):
        (tmp_path / name).write_text(body)
    path = tmp_path / f"example{index}.toml"
    path.write_text(doc_blocks("toml")[index][1])
    guest = load_manifest(path)
    result = run(guest)
    assert guest.expect is not None
    assert guest.expect.mismatches(result.exit, result.devices, result.trace) == []


def test_the_documents_error_examples_are_what_sevsim_says(tmp_path, monkeypatch):
    expected = doc_blocks("text")[0][1].splitlines()
    monkeypatch.chdir(tmp_path)
    manifests = [
        "[guest]\n\n\nmemory = 16\n",
        "\n" * 6 + "[[images]]\naddress = 0x20000\nsource_file = 'hello.S'\n",
    ]
    for text, message in zip(manifests, expected, strict=True):
        write(tmp_path / "guests" / "hello.toml", text)
        with pytest.raises(ConfigError) as error:
            load_manifest("guests/hello.toml")
        assert str(error.value) == message


# --- the bundled guests -------------------------------------------------------------------


def test_the_bundled_demo_is_the_demo_image_byte_for_byte():
    assert "demo" in bundled_guests()
    image = load_manifest(find_guest("demo")).build().image
    demo = demo_image(MMIO_TEST_GPA)
    assert image is not None
    assert image.memory() == demo.memory()
    assert image.launch_ranges() == demo.launch_ranges()
    assert image.initial_state() == demo.initial_state()


def test_the_bundled_demo_runs_through_run_image():
    build = load_manifest(find_guest("demo")).build()
    host = isolated_host(enable=["msr_protocol", "ioio", "mmio"])
    result = run_image(
        build.image,
        host.start(),
        host.events,
        timeout=TIMEOUT,
        ram_size=build.ram_size,
        vc_model=build.vc_model,
    )
    assert result.failure is None
    assert "      [uart] Hello from an SEV-ES guest" in result.trace.lines


def test_the_bundled_demo_meets_its_expectations():
    guest = load_manifest(find_guest("demo"))
    result = run(guest)
    assert guest.expect is not None
    assert guest.expect.mismatches(result.exit, result.devices, result.trace) == []


def test_an_unknown_guest_name_lists_the_bundled_ones():
    with pytest.raises(
        ConfigError,
        match=r"no bundled guest 'dmeo' \(did you mean 'demo'\?\); "
        r"the bundled guests are: .*demo",
    ):
        find_guest("dmeo")


# --- running -----------------------------------------------------------------------------


def test_port_io_reaches_the_post_device_then_the_guest_terminates():
    result = run(manifest(long_guest(f"mov al, 0x5a; out 0x80, al; {TERMINATE}")))
    assert result.devices.post.codes == [0x5A]
    assert result.exit == SEV_TERM


def test_the_modeled_vc_handler_handles_the_guests_io():
    guest = manifest(
        long_guest(
            f"mov dx, 0x3f8; mov al, 0x21; out dx, al; {TERMINATE}",
            '[guest]\nvc_handler = "modeled"\n',
        )
    )
    build = guest.build()
    assert isinstance(build.vc_model, VcHandler)
    assert build.vc_model is not guest.build().vc_model  # one fresh handler per run
    assert build.image is not None
    assert VC_HANDLER_ADDRESS not in build.image.memory()  # no native handler installed
    result = run(guest)
    assert result.devices.uart.output == b"!"
    assert result.exit == SEV_TERM


def test_shared_pages_are_mapped_shared_besides_the_ghcb():
    extra = "[[images]]\naddress = 0x30000\nsource = '.ascii \"for the host\"'\n"
    guest = manifest(long_guest("hlt", extra + "[guest]\nshared = [0x30000]\n"))
    image = guest.build().image
    assert image is not None and image.shared == frozenset({0x7000, 0x30000})
    assert image.memory()[0x30000] == b"for the host"
    assert all(not gpa <= 0x30000 < gpa + size for gpa, size in image.launch_ranges())


def test_the_kvm_era_reaches_the_vm():
    guest = manifest(long_guest(TERMINATE, '[kvm]\nera = "v5.11"\n'))
    assert guest.kvm == KvmSettings("v5.11", None)
    result = run(guest)
    assert result.vm.compat.name == "v5.11"
    assert result.vm.ghcb_version == 1
    # 5.11 failed KVM_RUN on a termination request instead of reporting it.
    assert isinstance(result.exit, RunFailed) and result.exit.errno == "EINVAL"


def test_a_device_turned_off_is_not_on_the_bus():
    guest = manifest(
        long_guest(f"mov al, 0x5a; out 0x80, al; {TERMINATE}", "[devices]\npost = false\n")
    )
    assert guest.devices == frozenset({"uart", "debug", "mmio_test"})
    result = run(guest)
    assert result.devices.io.find(0x80, 1) is None
    assert result.devices.post.codes == []
    assert result.exit == SEV_TERM


def test_the_plugins_table_reaches_the_plugin_config():
    guest = manifest(
        long_guest(
            TERMINATE,
            '[plugins]\ndisable = ["ioio"]\n[plugins.settings.msr_protocol]\nmax_version = 1\n',
        )
    )
    config = guest.plugin_config(PluginConfig())
    assert config.decide("ioio", autoload_candidate=True) == (False, "disabled in m.toml")
    assert config.settings_for("msr_protocol") == {"max_version": 1}
    assert manifest(long_guest(TERMINATE)).plugin_config(config) is config


def test_expectations_report_what_differs():
    expect = '[expect]\nnormal_end = false\nexit = "SHUTDOWN"\nuart = "hi"\npost = [2]\n'
    guest = manifest(long_guest(f"mov al, 1; out 0x80, al; {TERMINATE}", expect))
    result = run(guest)
    assert guest.expect is not None
    assert guest.expect.mismatches(result.exit, result.devices, result.trace) == [
        "expected the run to fail, but it ended normally",
        "expected the last exit to mention 'SHUTDOWN', got 'system event SEV_TERM [0x100]: "
        "TERM_REQ set 0 code 0 (GHCB_SEV_ES_GEN_REQ)'",
        "expected UART output 'hi', got ''",
        "expected POST codes [0x2], got [0x1]",
    ]


def test_a_reset_mode_guest_is_firmware_that_ends_at_4_gib():
    guest = manifest("""
        [guest]
        boot = "reset"
        memory_mib = 2

        [[images]]
        address = 0xfffff000
        bits = 16
        source = "mov ecx, 0xc0010130; mov eax, 0x100; xor edx, edx; wrmsr; rep vmmcall; hlt"

        [[images]]                      # the reset vector
        address = 0xfffffff0
        bits = 16
        source = "jmp 0xfffff000"
        """)
    build = guest.build()
    assert build.image is None and build.vc_model is None
    assert build.firmware is not None
    assert (build.firmware.gpa, build.firmware.size) == (0xFFFFF000, 0x1000)
    vm = launch_firmware(
        Kvm(), build.firmware, vcpus=build.vcpus, ram_size=build.ram_size, handlers=term_table()
    )
    vm.launch_measure()
    vm.launch_finish()
    assert vm.vcpus[0].run(TIMEOUT) == SEV_TERM


def test_a_reset_mode_binary_without_an_address_ends_at_4_gib(tmp_path):
    (tmp_path / "fw.bin").write_bytes(b"\xf4" * 0x2000)
    path = write(
        tmp_path / "m.toml", '[guest]\nboot = "reset"\n[[images]]\nbinary_file = "fw.bin"\n'
    )
    firmware = load_manifest(path).build().firmware
    assert firmware is not None and firmware.gpa == 0xFFFFE000


# --- paths --------------------------------------------------------------------------------


def test_paths_are_relative_to_the_manifest(tmp_path, monkeypatch):
    write(tmp_path / "guest" / "code" / "main.s", "mov al, 0x33\nout 0x80, al\n" + TERMINATE)
    (tmp_path / "data.bin").write_bytes(b"DATA")
    path = write(
        tmp_path / "guest" / "m.toml",
        """
        [[images]]
        address = 0x20000
        source_file = "code/main.s"
        [[images]]
        address = 0x30000
        binary_file = "../data.bin"
        """,
    )
    monkeypatch.chdir(tmp_path)  # not where the manifest is
    guest = load_manifest(path.relative_to(tmp_path))
    image = guest.build().image
    assert image is not None and image.memory()[0x30000] == b"DATA"
    assert run(guest).devices.post.codes == [0x33]


def test_a_missing_file_names_where_it_was_looked_for(tmp_path):
    path = write(
        tmp_path / "m.toml",
        """
        [[images]]
        address = 0x20000
        source_file = "nowhere.s"
        """,
    )
    with pytest.raises(ConfigError) as error:
        load_manifest(path)
    assert str(error.value) == (
        f"{path}:4: images[0].source_file = 'nowhere.s': expected an existing file; "
        f"{tmp_path / 'nowhere.s'} does not exist (paths are relative to the manifest's "
        "directory)"
    )


def test_a_manifest_that_cannot_be_read(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read guest manifest .*absent\.toml"):
        load_manifest(tmp_path / "absent.toml")
    (tmp_path / "latin1.toml").write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1\.toml: not UTF-8 text"):
        load_manifest(tmp_path / "latin1.toml")


# --- errors: each names the file, the line, the key, the value and what was expected -------

CODE = "[[images]]\naddress = 0x20000\nsource = 'hlt'\n"

ERRORS = {
    "toml": ("\n[guest\n", "m.toml:2: not valid TOML: "),
    "unknown table": (
        CODE + "[imgaes]\n",
        "m.toml:4: imgaes = {}: unknown key (did you mean 'images'?); the top level takes: "
        "guest, images, devices, kvm, plugins, expect",
    ),
    "unknown key": (
        CODE + "[guest]\nmemory = 16\n",
        "m.toml:5: guest.memory = 16: unknown key (did you mean 'memory_mib'?); guest takes:",
    ),
    "dotted key": ("guest.memory_mib = 1\n" + CODE, "m.toml:1: guest.memory_mib = 1: expected"),
    "not a table": ("guest = 3\n" + CODE, "m.toml:1: guest = 3: expected a table of"),
    "type": (
        CODE + "[guest]\nmemory_mib = '16'\n",
        "m.toml:5: guest.memory_mib = '16': expected a whole number 2..3328",
    ),
    "range": (CODE + "[guest]\nmemory_mib = 1\n", "m.toml:5: guest.memory_mib = 1: expected"),
    "choice": (
        CODE + "[guest]\nboot = 'lng'\n",
        "m.toml:5: guest.boot = 'lng': expected one of 'long', 'reset' (did you mean 'long'?)",
    ),
    "vcpus in long mode": (
        CODE + "[guest]\nvcpus = 2\n",
        "m.toml:5: guest.vcpus = 2: expected 1: a long-mode guest runs on one vCPU",
    ),
    "handler in reset mode": (
        "[guest]\nboot = 'reset'\nvc_handler = 'native'\n",
        'm.toml:3: guest.vc_handler = \'native\': expected "none" for boot = "reset"',
    ),
    "shared page": (
        CODE + "[guest]\nshared = [0x7001]\n",
        "m.toml:5: guest.shared = [0x7001]: expected a list of page addresses (multiples of "
        "0x1000)",
    ),
    "no images": ("[guest]\n", "m.toml:1: no [[images]]: expected at least one image"),
    "images not an array": (
        "[images]\naddress = 1\n",
        "m.toml:1: images = {'address': 1}: expected [[images]] entries",
    ),
    "two contents": (
        "[[images]]\naddress = 0x20000\nsource = 'hlt'\nbinary_file = 'x'\n",
        "m.toml:1: images[0]: expected exactly one of source, source_file, binary_file "
        "(got source, binary_file)",
    ),
    "no address": (
        "[[images]]\nsource = 'hlt'\n",
        "m.toml:1: images[0].address is missing: expected the guest-physical load address",
    ),
    "bits": (
        CODE + "bits = 8\n",
        "m.toml:4: images[0].bits = 8: expected one of 16, 32, 64",
    ),
    "bits of a binary": (
        "[[images]]\naddress = 0x20000\nbinary_file = 'x'\nbits = 16\n",
        "m.toml:4: images[0].bits = 16: expected no bits for a binary_file",
    ),
    "assembly": (
        # The line count must not be fooled by the key-like line inside the string.
        "[[images]]\naddress = 0x20000\nsource = '''\nnop\naddress = 1\n'''\n"
        "[[images]]\naddress = 0x30000\nsource = 'frobnicate rax'\n",
        "m.toml:9: images[1].source: cannot assemble (Invalid mnemonic (KS_ERR_ASM_MNEMONICFAIL))",
    ),
    "empty image": (
        "[[images]]\naddress = 0x20000\nsource = ''\n",
        "m.toml:3: images[0].source = '': expected at least one byte of code or data",
    ),
    "overlaps sevsim": (
        "[[images]]\naddress = 0x7000\nsource = 'hlt'\n",
        "m.toml:1: images[0] [0x7000, 0x7001) overlaps sevsim's page tables, GDT, IDT, GHCB "
        "and stacks [0x1000, 0x12000)",
    ),
    "overlaps the handler": (
        "[[images]]\naddress = 0x41000\nsource = 'hlt'\n",
        "m.toml:1: images[0] [0x41000, 0x41001) overlaps the native #VC handler",
    ),
    "images overlap": (
        CODE + "[[images]]\naddress = 0x1ffff\nsource = 'nop; nop'\n",
        "m.toml:1: images[0] [0x20000, 0x20001) overlaps images[1] [0x1ffff, 0x20001)",
    ),
    "beyond ram": (
        "[guest]\nmemory_mib = 2\n[[images]]\naddress = 0x200000\nsource = 'hlt'\n",
        "m.toml:3: images[0] [0x200000, 0x200001) ends beyond guest.memory_mib",
    ),
    "firmware range": (
        "[guest]\nboot = 'reset'\n[[images]]\naddress = 0x20000\nsource = 'hlt'\n",
        "m.toml:4: images[0].address = 0x20000: expected a whole number 0xff800000..0xffffffff",
    ),
    "device": (
        CODE + "[devices]\nuart = 'off'\n",
        "m.toml:5: devices.uart = 'off': expected true or false",
    ),
    "kvm era": (
        CODE + "[kvm]\nghcb_version = 1\nera = 'v4.0'\n",
        "m.toml:6: [kvm] era = 'v4.0': expected one of ['newest', 'v5.11']",
    ),
    "kvm version": (
        CODE + "[kvm]\nghcb_version = 7\n",
        "m.toml:5: [kvm] ghcb_version = 7: expected 1..2",
    ),
    "kvm key": (CODE + "[kvm]\nerra = 'newest'\n", "m.toml:5: [kvm] has unknown key(s) ['erra']"),
    "plugins key": (
        CODE + "[plugins]\nstrict = true\nenable = 'ioio'\n",
        "m.toml:6: [plugins] enable = 'ioio': expected a list of plugin names",
    ),
    "plugins table": (
        CODE + "[plugins]\nenable = ['ioio']\ndisable = ['ioio']\n",
        "m.toml:4: [plugins] lists 'ioio' in both enable and disable",
    ),
    "plugin settings": (
        CODE + "[plugins.settings]\nioio = 3\n",
        "m.toml:4: [plugins.settings].ioio = 3: expected a table",
    ),
    "expect": (
        CODE + "[expect]\npost = [1, '2']\n",
        "m.toml:5: expect.post = [1, '2']: expected a list of POST codes",
    ),
}


@pytest.mark.parametrize("kind", ERRORS)
def test_errors_name_the_file_line_key_value_and_what_was_expected(kind):
    text, message = ERRORS[kind]
    with pytest.raises(ConfigError) as error:
        parse_manifest(text, "m.toml")
    assert str(error.value).startswith(message), str(error.value)


def test_a_reset_mode_guest_with_aps_needs_their_reset_block():
    guest = manifest("""
        [guest]
        boot = "reset"
        vcpus = 2
        [[images]]
        address = 0xfffffff0
        bits = 16
        source = "hlt"
        """)
    with pytest.raises(ConfigError, match=r"m.toml:5: firmware m.toml has no OVMF footer table"):
        guest.build()
