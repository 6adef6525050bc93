"""Guest manifests: a guest of the user's own, described in TOML, for ``sevsim run``.

A manifest (the format: ``docs/guest-manifests.md``) names the guest's images
(assembly, inline or in a file, or raw binaries) and their load addresses, how the
guest boots, which #VC handler it gets, its memory, its devices, the KVM and plugin
settings it was written for, and what a good run of it looks like.
:func:`load_manifest` checks all of it, assembling included, before anything is
launched, so a mistake is one :class:`~sevsim.errors.ConfigError` naming the file,
line, key, value and what was expected rather than a failure half-way through a
launch. :meth:`GuestManifest.build` then makes what the VMM launches with sevsim's
own builders: the long-mode image builder and native #VC handler, or a firmware image
for a guest that starts from the x86 reset state.

``[kvm]`` and ``[plugins]`` are sevsim.toml's tables, checked by the functions that
read sevsim.toml; a manifest that has one is run with it instead of sevsim.toml's.
The bundled manifests (``sevsim/guest/manifests``) are found by name with
:func:`find_guest`.

A manifest describes a whole run, not only guest software: the guest, the machine
around it, KVM's and the plugins' settings, the outcome expected. Reading one is
therefore a tool's job (``sevsim run``, tests), done here on top of every layer,
while ``sevsim.guest`` keeps the builders it uses and imports no hypervisor layer.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any

from attrs import field, frozen

from sevsim.errors import ConfigError
from sevsim.guest.asm import AssemblyError, assemble
from sevsim.guest.image import GHCB_GPA, IMAGE_END, IST1_TOP, PML4, GuestImage
from sevsim.guest.vc import VcHandler
from sevsim.guest.vc_native import HANDLER_SIZE, VC_HANDLER_ADDRESS, vc_image_args
from sevsim.hw.vc_model import VcModel
from sevsim.manifest_checks import TomlChecker, dotted, suggest
from sevsim.manifest_expect import Expected
from sevsim.manifest_lines import KeyLines, KeyPath
from sevsim.plugin.config import PluginConfig, apply_table
from sevsim.vmm.config import KvmSettings, kvm_settings
from sevsim.vmm.firmware import (
    FLASH_SECTOR_SIZE,
    FOUR_GIB,
    MAX_FIRMWARE_SIZE,
    FirmwareError,
    FirmwareImage,
    parse_firmware,
)
from sevsim.vmm.machine import MMIO_TEST_GPA, Devices
from sevsim.vmm.pc import MAX_VCPUS, MIN_RAM

MIB = 1 << 20
#: :func:`~sevsim.vmm.launch.launch_image`'s RAM size.
DEFAULT_MEMORY_MIB = 16
#: RAM holds at least the long-mode image builder's first 2 MiB ...
MIN_MEMORY_MIB = IMAGE_END // MIB
#: ... and ends below the MMIO test device, where a PC's MMIO hole begins.
MAX_MEMORY_MIB = MMIO_TEST_GPA // MIB
BOOT_MODES = ("long", "reset")
VC_HANDLERS = ("native", "modeled", "none")
#: The standard machine's devices a manifest can turn off (fields of :class:`Devices`).
DEVICES = ("uart", "debug", "post", "mmio_test")
#: Where the bundled manifests live (package data).
BUNDLED = Path(__file__).parent / "guest" / "manifests"

#: The tables of a manifest, and the keys of its own ones.
SECTIONS = ("guest", "images", "devices", "kvm", "plugins", "expect")
GUEST_KEYS = ("description", "boot", "memory_mib", "vcpus", "ap_entry", "vc_handler", "shared")
_CONTENT_KEYS = ("source", "source_file", "binary_file")
IMAGE_KEYS = ("address", *_CONTENT_KEYS, "bits")
_FLASH_BASE = FOUR_GIB - MAX_FIRMWARE_SIZE
#: Pages ``shared`` may name: those the image builder maps with 4 KiB pages.
_SHAREABLE = range(0, IMAGE_END, 0x1000)
#: What the long-mode image builder places itself (page tables to stacks), and the
#: native #VC handler: a user's image may not overlap them.
_BUILDER_SPAN = (PML4, IST1_TOP, "sevsim's page tables, GDT, IDT, GHCB and stacks")
_HANDLER_SPAN = (VC_HANDLER_ADDRESS, VC_HANDLER_ADDRESS + HANDLER_SIZE, "the native #VC handler")


@frozen
class Image:
    """One ``[[images]]`` entry, assembled or read: ``data`` goes at ``address``."""

    address: int
    data: bytes = field(repr=False)


@frozen
class GuestBuild:
    """What the VMM launches for a manifest.

    ``image`` for ``boot = "long"`` (:func:`~sevsim.vmm.launch.launch_image`,
    :func:`~sevsim.vmm.runner.run_image`), or ``firmware`` for ``boot = "reset"``
    (:func:`~sevsim.vmm.launch.launch_firmware`).
    """

    image: GuestImage | None
    firmware: FirmwareImage | None
    ram_size: int
    vcpus: int
    #: A fresh modeled #VC handler (``vc_handler = "modeled"``: it keeps per-vCPU state).
    vc_model: VcModel | None
    #: None when the manifest has no ``[kvm]`` table: sevsim.toml's applies.
    kvm: KvmSettings | None
    #: The standard devices the guest gets, by :class:`Devices` field name.
    devices: frozenset[str]
    #: Long mode with APs: where they start (:func:`~sevsim.vmm.boot.launch_pc_image`).
    ap_entry: int | None = None

    def make_devices(self, console: Callable[[bytes], None] | None = None) -> Devices:
        """The standard machine without the devices the manifest turned off."""
        devices = Devices.standard(console)
        kept = [getattr(devices, name) for name in self.devices]
        for bus in (devices.io, devices.mmio):
            for where, device in bus.devices():
                if not any(device is k for k in kept):
                    bus.remove(device, where.base)
        return devices


@frozen
class GuestManifest:
    """A checked manifest; :meth:`build` it for each run."""

    #: The manifest's path and key lines, for errors found when it is built.
    checker: TomlChecker = field(repr=False)
    description: str
    boot: str
    memory_mib: int
    vcpus: int
    vc_handler: str
    #: Pages mapped shared (C=0) besides the GHCB page (long mode).
    shared: frozenset[int]
    #: In file order; in long mode the first one is where execution starts.
    images: tuple[Image, ...]
    devices: frozenset[str]
    kvm: KvmSettings | None
    #: The ``[plugins]`` table as written (checked): :meth:`plugin_config` applies it.
    plugins: Mapping[str, Any] | None
    expect: Expected | None
    #: Long mode with more than one vCPU: where the APs start.
    ap_entry: int | None = None

    @property
    def path(self) -> Path:
        return self.checker.path

    @property
    def name(self) -> str:
        return self.path.stem

    def plugin_config(self, config: PluginConfig) -> PluginConfig:
        """``config`` with this manifest's ``[plugins]`` table over it, if it has one."""
        if self.plugins is None:
            return config
        return apply_table(config, self.plugins, str(self.path))

    def build(self) -> GuestBuild:
        """A fresh image (or firmware) and #VC model for one run."""
        long_mode = self.boot == "long"
        return GuestBuild(
            image=self._image() if long_mode else None,
            firmware=None if long_mode else self._firmware(),
            ram_size=self.memory_mib * MIB,
            vcpus=self.vcpus,
            vc_model=VcHandler() if self.vc_handler == "modeled" else None,
            kvm=self.kvm,
            devices=self.devices,
            ap_entry=self.ap_entry,
        )

    def _image(self) -> GuestImage:
        first, *rest = self.images
        data = {image.address: image.data for image in rest}
        handler = vc_image_args(data=data) if self.vc_handler == "native" else {"data": data}
        shared = frozenset({GHCB_GPA, *self.shared})
        return GuestImage(first.data, entry=first.address, shared=shared, **handler)

    def _firmware(self) -> FirmwareImage:
        """The images laid out as a flash image that ends at 4 GiB."""
        base = min(image.address for image in self.images) & ~(FLASH_SECTOR_SIZE - 1)
        flash = bytearray(FOUR_GIB - base)
        for image in self.images:
            flash[image.address - base : image.address - base + len(image.data)] = image.data
        try:
            firmware = parse_firmware(bytes(flash), str(self.path))
            if self.vcpus > 1:
                firmware.sev_es_reset_eip()  # where the APs start: refuse an image without
        except FirmwareError as e:
            raise ConfigError(f"{self.checker.where(('images',))}: {e}") from None
        return firmware


# --- loading ---------------------------------------------------------------------------


def load_manifest(path: str | Path) -> GuestManifest:
    """Read and check the manifest at ``path``; relative paths in it are relative to it."""
    path = Path(path)
    try:
        text = path.read_bytes().decode()
    except OSError as e:
        raise ConfigError(f"cannot read guest manifest {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_manifest(text, path)


def parse_manifest(text: str, name: str | Path) -> GuestManifest:
    """Check the manifest ``text``; ``name`` is its path, for messages and relative paths."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        line = re.search(r"at line (\d+)", str(e))  # tomllib says where only in its message
        where = f"{name}:{line[1]}" if line else str(name)
        raise ConfigError(f"{where}: not valid TOML: {e}") from None
    at = TomlChecker(Path(name), KeyLines(text))
    at.keys((), document, SECTIONS)
    guest = at.table(("guest",), document.get("guest", {}), GUEST_KEYS)
    boot = at.choice(("guest", "boot"), guest.get("boot", "long"), BOOT_MODES)
    long_mode = boot == "long"
    description = at.string(("guest", "description"), guest.get("description", ""))
    memory = guest.get("memory_mib", DEFAULT_MEMORY_MIB)
    memory_mib = at.integer(("guest", "memory_mib"), memory, MIN_MEMORY_MIB, MAX_MEMORY_MIB)
    vcpus = _vcpus(at, guest.get("vcpus", 1), long_mode, guest.get("ap_entry"))
    vc_handler = _vc_handler(at, guest.get("vc_handler", "native" if long_mode else "none"), boot)
    shared = _shared(at, guest.get("shared", []), long_mode)
    images = _images(at, document.get("images"), long_mode)
    ap_entry = None
    if long_mode:
        _check_long_layout(at, images, memory_mib * MIB, vc_handler == "native")
        if vcpus > 1:
            ap_entry = _ap_entry(at, guest["ap_entry"], images)
            _check_pc_machine(at, memory_mib, vc_handler)
    else:
        _refuse_overlaps(at, [_span(i, image) for i, image in enumerate(images)])
    return GuestManifest(
        checker=at,
        description=description,
        boot=boot,
        memory_mib=memory_mib,
        vcpus=vcpus,
        vc_handler=vc_handler,
        shared=shared,
        images=images,
        devices=_devices(at, document.get("devices", {})),
        kvm=_kvm(at, document["kvm"]) if "kvm" in document else None,
        plugins=_plugins(at, document["plugins"]) if "plugins" in document else None,
        expect=_expect(at, document["expect"]) if "expect" in document else None,
        ap_entry=ap_entry,
    )


# --- the bundled guests ------------------------------------------------------------------


def bundled_guests() -> dict[str, Path]:
    """The manifests that come with sevsim, by name (the file name without ``.toml``)."""
    return {path.stem: path for path in sorted(BUNDLED.glob("*.toml"))}


def find_guest(name: str) -> Path:
    """The bundled manifest called ``name``."""
    guests = bundled_guests()
    if name not in guests:
        raise ConfigError(
            f"no bundled guest {name!r}{suggest(name, guests)}; the bundled guests are: "
            f"{', '.join(guests)} (or give the path of a manifest file)"
        )
    return guests[name]


# --- the tables --------------------------------------------------------------------------


def _vc_handler(at: TomlChecker, value: Any, boot: str) -> str:
    key = ("guest", "vc_handler")
    handler = at.choice(key, value, VC_HANDLERS)
    if boot == "reset" and handler != "none":
        raise at.error(key, value, '"none" for boot = "reset" (the firmware brings its own)')
    return handler


def _vcpus(at: TomlChecker, value: Any, long_mode: bool, ap_entry: Any) -> int:
    """The vCPU count; in long mode, more than one only with ``ap_entry`` (None: not
    given), which only long mode with APs takes."""
    key = ("guest", "vcpus")
    if not long_mode:
        if ap_entry is not None:
            raise at.error(("guest", "ap_entry"), ap_entry, 'no ap_entry for boot = "reset" '
                           "(the APs start at the firmware's SEV-ES reset block)")  # fmt: skip
        return at.integer(key, value, 1, None)
    if ap_entry is None:
        if value != 1 or isinstance(value, bool):
            raise at.error(key, value, "1: a long-mode guest runs on one vCPU unless "
                           "guest.ap_entry says where its APs start")  # fmt: skip
        return 1
    vcpus = at.integer(key, value, 1, MAX_VCPUS)
    if vcpus == 1:
        raise at.error(("guest", "ap_entry"), ap_entry, "no ap_entry for one vCPU (no APs)")
    return vcpus


def _ap_entry(at: TomlChecker, value: Any, images: tuple[Image, ...]) -> int:
    """Where the APs start: an address inside one of the images."""
    key = ("guest", "ap_entry")
    address = at.integer(key, value, 0, None)
    if not any(image.address <= address < image.address + len(image.data) for image in images):
        raise at.error(key, value, "an address inside one of the [[images]]")
    return address


def _check_pc_machine(at: TomlChecker, memory_mib: int, vc_handler: str) -> None:
    """A long-mode guest with APs runs on the ``pc`` machine (sevsim.vmm.pc)."""
    if memory_mib < MIN_RAM // MIB:
        raise at.error(("guest", "memory_mib"), memory_mib, f"at least {MIN_RAM // MIB} with "
                       "APs: a guest with APs runs on the pc machine")  # fmt: skip
    if vc_handler == "modeled":
        raise at.error(("guest", "vc_handler"), vc_handler, '"native" or "none" with APs: the '
                       "modeled handler serves one vCPU")  # fmt: skip


def _shared(at: TomlChecker, value: Any, long_mode: bool) -> frozenset[int]:
    key = ("guest", "shared")
    if value and not long_mode:
        raise at.error(key, value, 'no shared pages for boot = "reset" (the firmware maps its own)')
    if not isinstance(value, list) or not all(
        isinstance(page, int) and not isinstance(page, bool) and page in _SHAREABLE
        for page in value
    ):
        raise at.error(
            key,
            value,
            f"a list of page addresses (multiples of 0x1000) below "
            f"{IMAGE_END:#x}, where the page tables map 4 KiB pages",
        )
    return frozenset(value)


def _images(at: TomlChecker, value: Any, long_mode: bool) -> tuple[Image, ...]:
    key = ("images",)
    if value is None or value == []:
        raise ConfigError(
            f"{at.where(key)}: no [[images]]: expected at least one image (in long mode the "
            "first is where execution starts)"
        )
    if not isinstance(value, list):
        raise at.error(key, value, "[[images]] entries (an array of tables)")
    return tuple(_image(at, i, entry, long_mode) for i, entry in enumerate(value))


def _image(at: TomlChecker, index: int, value: Any, long_mode: bool) -> Image:
    prefix = ("images", index)
    entry = at.table(prefix, value, IMAGE_KEYS)
    given = [k for k in _CONTENT_KEYS if k in entry]
    if len(given) != 1:
        found = f"got {', '.join(given)}" if given else "got none"
        raise ConfigError(
            f"{at.where(prefix)}: {dotted(prefix)}: expected exactly one of "
            f"{', '.join(_CONTENT_KEYS)} ({found})"
        )
    kind = given[0]
    if kind == "binary_file":
        if "bits" in entry:
            raise at.error((*prefix, "bits"), entry["bits"], "no bits for a binary_file")
        data = _read_file(at, (*prefix, kind), entry[kind])
        # only a binary in reset mode may leave its address out: it ends at 4 GiB
        end_at_4gib = None if long_mode else FOUR_GIB - len(data)
        address = _address(at, prefix, entry, long_mode, end_at_4gib)
    else:
        address = _address(at, prefix, entry, long_mode, None)
        source = (
            at.string((*prefix, kind), entry[kind])
            if kind == "source"
            else _read_text(at, (*prefix, kind), entry[kind])
        )
        bits = at.choice((*prefix, "bits"), entry.get("bits", 64), (16, 32, 64))
        data = _assemble(at, (*prefix, kind), source, address, bits)
    if not data:
        raise at.error((*prefix, kind), entry[kind], "at least one byte of code or data")
    return Image(address, data)


def _address(
    at: TomlChecker, prefix: KeyPath, entry: dict[str, Any], long_mode: bool, default: int | None
) -> int:
    """The load address, or ``default`` when the entry has none and one is allowed."""
    key = (*prefix, "address")
    if "address" not in entry:
        if default is None:
            raise ConfigError(
                f"{at.where(prefix)}: {dotted(key)} is missing: expected the guest-physical "
                "load address (only a binary_file in reset mode may leave it out, to end at "
                "4 GiB)"
            )
        return default
    if long_mode:
        return at.integer(key, entry["address"], 0, None)  # RAM's end is checked later
    return at.integer(key, entry["address"], _FLASH_BASE, FOUR_GIB - 1)


def _assemble(at: TomlChecker, key: KeyPath, source: str, address: int, bits: int) -> bytes:
    try:
        return assemble(source, address, bits)
    except AssemblyError as e:
        # Keystone's reason only: the message goes on to repeat the whole source.
        reason = str(e).split("\n", 1)[0].removesuffix(" in:")
        raise ConfigError(f"{at.where(key)}: {dotted(key)}: {reason}") from None


def _read_file(at: TomlChecker, key: KeyPath, value: Any) -> bytes:
    name = at.string(key, value)
    path = at.path.parent / name
    try:
        return path.read_bytes()
    except FileNotFoundError:
        why = f"{path} does not exist (paths are relative to the manifest's directory)"
        raise at.error(key, value, f"an existing file; {why}") from None
    except OSError as e:
        raise at.error(key, value, f"a readable file; {path}: {e.strerror}") from None


def _read_text(at: TomlChecker, key: KeyPath, value: Any) -> str:
    try:
        return _read_file(at, key, value).decode()
    except UnicodeDecodeError as e:
        raise at.error(key, value, f"UTF-8 text ({e.reason} at byte {e.start})") from None


def _check_long_layout(
    at: TomlChecker, images: tuple[Image, ...], ram_size: int, native: bool
) -> None:
    for i, image in enumerate(images):
        end = image.address + len(image.data)
        if end > ram_size:
            raise ConfigError(
                f"{at.where(('images', i))}: images[{i}] [{image.address:#x}, {end:#x}) ends "
                f"beyond guest.memory_mib ({ram_size:#x} bytes of RAM): expected it in RAM"
            )
    spans = [(*_BUILDER_SPAN, None)] + ([(*_HANDLER_SPAN, None)] if native else [])
    _refuse_overlaps(at, spans + [_span(i, image) for i, image in enumerate(images)])


_Span = tuple[int, int, str, int | None]  # start, end, what, image index (None: sevsim's)


def _span(index: int, image: Image) -> _Span:
    return image.address, image.address + len(image.data), f"images[{index}]", index


def _refuse_overlaps(at: TomlChecker, spans: list[_Span]) -> None:
    for (a0, a1, a, ia), (b0, b1, b, ib) in pairwise(sorted(spans, key=lambda s: s[:2])):
        if b0 < a1:
            index = ib if ib is not None else ia
            key: KeyPath = ("images",) if index is None else ("images", index)
            raise ConfigError(
                f"{at.where(key)}: {b} [{b0:#x}, {b1:#x}) overlaps {a} "
                f"[{a0:#x}, {a1:#x}): expected images apart from each other and from sevsim's "
                f"own ranges"
            )


def _devices(at: TomlChecker, value: Any) -> frozenset[str]:
    table = at.table(("devices",), value, DEVICES)
    return frozenset(
        name for name in DEVICES if at.boolean(("devices", name), table.get(name, True))
    )


def _kvm(at: TomlChecker, value: Any) -> KvmSettings:
    """Checked by sevsim.toml's own reader, key by key so that an error names its line."""
    _each_key(at, ("kvm",), value, lambda table, where: kvm_settings(table, f"{where}: [kvm]"))
    return kvm_settings(value, f"{at.where(('kvm',))}: [kvm]")


def _plugins(at: TomlChecker, value: Any) -> Mapping[str, Any]:
    """Checked by sevsim.toml's own reader, as :func:`_kvm`."""
    _each_key(
        at, ("plugins",), value, lambda table, where: apply_table(PluginConfig(), table, where)
    )
    apply_table(PluginConfig(), value, at.where(("plugins",)))  # what spans keys (enable/disable)
    return value


def _each_key(
    at: TomlChecker, prefix: KeyPath, value: Any, check: Callable[[Any, str], object]
) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            check({key: item}, at.where((*prefix, key)))


def _expect(at: TomlChecker, value: Any) -> Expected:
    checks: dict[str, Callable[[KeyPath, Any], Any]] = {
        "normal_end": at.boolean,
        "exit": at.string,
        "uart": at.string,
        "post": partial(_post_codes, at),
    }
    table = at.table(("expect",), value, checks)
    return Expected(**{key: checks[key](("expect", key), item) for key, item in table.items()})


def _post_codes(at: TomlChecker, key: KeyPath, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(code, int) and not isinstance(code, bool) and code >= 0 for code in value
    ):
        raise at.error(key, value, "a list of POST codes (whole numbers >= 0)")
    return tuple(value)
