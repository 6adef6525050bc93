"""The PCI side of QEMU's ``pc`` machine: configuration mechanism #1 and the i440FX/PIIX functions.

The guest reaches configuration space through two I/O windows (QEMU ``hw/pci/pci_host.c``
on the regions ``hw/pci-host/i440fx.c`` registers):

====== ==== ==========================================================================
port   size register
====== ==== ==========================================================================
0xCF8  4    CONFADD: a dword write latches bit 31 (enable), bus 23:16, device 15:11,
            function 10:8 and register 7:0
0xCF9  1    the PIIX reset control register, layered over CONFADD (see below)
0xCFC  4    CONFDATA: reads and writes the latched register of the latched function
====== ==== ==========================================================================

CONFADD follows QEMU's ``pci_host_config_read/write``: only a dword write at 0xCF8
changes the latch, any other write is dropped, and a read of any width returns the
low bytes of the latch whatever port it starts at. QEMU gives the PIIX reset control
register a higher priority at 0xCF9, so an access that *starts* at 0xCF9 goes to it
(:class:`sevsim.vmm.reset_ports.ResetControl`) while a dword at 0xCF8 still reaches
the latch; :class:`PciHost` is given that register and does the routing itself.

CONFDATA follows ``pci_host_data_read/write``: the register offset is the latch's
bits 7:0 ORed with the port's offset within 0xCFC-0xCFF (so a word at 0xCFE reads
offset 2 of a dword-aligned latch). With the enable bit clear, reads return all ones
and writes are dropped; an absent bus, device or function reads all ones. An access
that runs past offset 0xFF is cut short there, as ``pci_host_config_read_common``
does, and its missing bytes read 0. QEMU's memory core refuses a data-port access
that is not aligned to its own width (a word at 0xCFD): it reads 0 and writes
nothing, and so does sevsim. The same rule makes a word read at 0xCF9 read 0 when
no reset control register is layered over it.

Functions of ``qemu-system-x86_64 -M pc -nodefaults`` with SEV-ES (bus 0):

======= =========== ================================================================
dev.fn  ID          function
======= =========== ================================================================
00.0    8086:1237   i440FX host bridge (PAM 0x59-0x5F, SMRAM 0x72: plain storage)
01.0    8086:7000   PIIX3 PCI-to-ISA bridge, multi-function (PIRQ routes 0x60-0x63)
01.3    8086:7113   PIIX4 power management: PMBA 0x40 and PMREGMISC 0x80 place the
                    ACPI PM block (:mod:`sevsim.vmm.acpi_pm`) on the I/O bus
======= =========== ================================================================

QEMU also puts the PIIX3 IDE controller at 01.1 on every ``pc`` machine; sevsim leaves
it out. OVMF binds ``SataControllerDxe`` to any class 01/01 function, and
``AtaAtapiPassThru`` then probes both channels through the legacy ports 0x1F0/0x170
(``DetectAndConfigIdeDevice`` in ``IdeMode.c``). With no ATA registers behind those
ports they read all ones, BSY never clears, and ``WaitForBSYClear`` polls each of the
four device positions for its full 35 s timeout, a status read and a
``MicroSecondDelay(100)`` at a time: 140 s of guest time and millions of IOIO #VCs
under SEV-ES. Modelling the function would mean modelling an empty IDE controller
behind it. Without it, PciBusDxe finds nothing at 01.1 and OVMF reaches the Shell the
same way, since sevsim's ``pc`` machine has no disks.

Configuration space semantics are QEMU's ``pci_default_write_config``: every byte has
a write mask and a write-1-to-clear mask. Header bytes are read-only except the
command register's I/O, memory, bus-master, SERR# and INTx-disable bits, the cache
line size and the interrupt line; the status register's error bits are write-1-to-
clear; offsets 0x40-0xFF are writable storage unless a function defines a register
there (the PIIX4 PMBA and PMREGMISC keep the datasheet's read-only bits). None of
these functions has a BAR, so sizing writes to 0x10-0x27 and 0x30 read back 0.

Wiring (see also :func:`sevsim.vmm.reset_ports.attach`)::

    pm_block = AcpiPmBlock(clock, request)
    host = attach_i440fx(io, pm_block, reset_control=reset_ports.attach(io, request))
"""

from __future__ import annotations

from sevsim.errors import SevsimError
from sevsim.vmm.acpi_pm import SIZE as PM_BLOCK_SIZE
from sevsim.vmm.acpi_pm import AcpiPmBlock
from sevsim.vmm.bus import Bus, BusError, Device

CONFIG_ADDRESS_PORT = 0xCF8
#: The PIIX reset control register, layered over the second byte of CONFADD.
RESET_CONTROL_PORT = 0xCF9
CONFIG_DATA_PORT = 0xCFC
CONFIG_SPACE_SIZE = 0x100

#: CONFADD bit 31: configuration cycles enabled.
CONFIG_ENABLE = 1 << 31

# Header offsets.
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09
CACHE_LINE_SIZE = 0x0C
HEADER_TYPE = 0x0E
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
HEADER_SIZE = 0x40

HEADER_MULTI_FUNCTION = 0x80

# COMMAND bits the guest may change (QEMU's pci_init_wmask).
COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_MASTER = 1 << 2
COMMAND_SERR = 1 << 8
COMMAND_INTX_DISABLE = 1 << 10
COMMAND_WRITABLE = (
    COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_SERR | COMMAND_INTX_DISABLE
)

# STATUS bits (DEVSEL timing is read-only; the error bits are write-1-to-clear).
STATUS_FAST_BACK_TO_BACK = 1 << 7
STATUS_DEVSEL_MEDIUM = 1 << 9
STATUS_W1C = 0xF900  # parity, target aborts, master abort, SERR#, detected parity

INTEL = 0x8086
#: The subsystem QEMU gives every non-bridge function (``pci_set_default_subsystem_id``).
QEMU_SUBSYSTEM_VENDOR = 0x1AF4
QEMU_SUBSYSTEM = 0x1100

CLASS_HOST_BRIDGE = 0x060000
CLASS_ISA_BRIDGE = 0x060100
CLASS_OTHER_BRIDGE = 0x068000

# i440FX (82441FX) host bridge.
I440FX_DEVICE_ID = 0x1237
I440FX_REVISION = 0x02
I440FX_SMRAM = 0x72
SMRAM_C_BASE_SEG = 0x02  # compatible SMRAM at 0xA0000, QEMU's reset value

# PIIX3 (82371SB) function 0: PCI-to-ISA bridge.
PIIX3_DEVICE_ID = 0x7000
PIIX3_PIRQRC = 0x60  # PIRQ[A-D] route control, one byte each
PIRQ_ROUTE_DISABLED = 0x80
#: QEMU's ``piix_reset`` values besides the header and PIRQRC: (offset, value).
PIIX3_RESET = (
    (0x4C, 0x4D), (0x4E, 0x03), (0x69, 0x02), (0x70, 0x80), (0x76, 0x0C), (0x77, 0x0C),
    (0x78, 0x02), (0xA0, 0x08), (0xA8, 0x0F),
)  # fmt: skip

# PIIX4 (82371AB) function 3: power management.
PIIX4_PM_DEVICE_ID = 0x7113
PIIX4_PM_REVISION = 0x03
PMBA = 0x40
PMBA_RTE = 1 << 0  # resource type indicator: I/O space, read-only 1
PMBA_BASE_MASK = 0xFFC0
DEVACTB = 0x58
PMREGMISC = 0x80
PMIOSE = 1 << 0
SMBBA = 0x90
SMBHSTCFG = 0xD2
#: QEMU's ``smb_io_base`` for ``pc``; the SMBus controller itself is not modelled.
PIIX4_SMBUS_BASE = 0xB100
#: QEMU's values besides the header (``piix4_pm_realize``, ``piix4_pm_reset`` and
#: ``piix4_pm_machine_ready``): DEVACTB byte 3 = 0x02 marks SMM as initialised, since
#: KVM has no SMM for SEV-ES guests; 0x5F, 0x63 and 0x67 are the device resource
#: registers with COM1 (the machine's 16550 at 0x3F8) decoded; SMBus base 0xB100 with
#: its host enable and interrupt select in SMBHSTCFG.
PIIX4_PM_RESET = (
    (DEVACTB + 3, 0x02), (0x5F, 0x10), (0x63, 0x60), (0x67, 0x08),
    (SMBBA, (PIIX4_SMBUS_BASE & 0xFF) | 0x01), (SMBBA + 1, PIIX4_SMBUS_BASE >> 8),
    (SMBHSTCFG, 0x09),
)  # fmt: skip


class PciError(SevsimError):
    """A PCI function or slot was configured with a value out of range or twice."""


def _check(what: str, value: int, bits: int) -> None:
    if not 0 <= value < 1 << bits:
        raise PciError(f"{what} {value!r} does not fit in {bits} bits")


class PciFunction:
    """One function's 256-byte configuration space, with QEMU's per-byte masks.

    ``config`` holds what the guest reads. A guest write changes a byte only in the bits
    of its write mask, and clears the bits of its write-1-to-clear mask that it writes as
    1; then :meth:`config_written` runs, which is where a function that decodes its own
    registers (the PIIX4 PMBA) reacts.
    """

    __slots__ = ("_w1cmask", "_wmask", "config", "name")

    def __init__(
        self,
        name: str,
        *,
        vendor_id: int,
        device_id: int,
        class_code: int,
        revision: int = 0,
        header_type: int = 0,
        status: int = 0,
        interrupt_pin: int = 0,
    ) -> None:
        _check("vendor ID", vendor_id, 16)
        _check("device ID", device_id, 16)
        _check("class code (class << 16 | subclass << 8 | prog-if)", class_code, 24)
        _check("revision ID", revision, 8)
        _check("header type", header_type, 8)
        _check("status", status, 16)
        if not 0 <= interrupt_pin <= 4:
            raise PciError(f"interrupt pin {interrupt_pin!r} is not 0 (none) or 1-4 (INTA-INTD)")
        self.name = name
        self.config = bytearray(CONFIG_SPACE_SIZE)
        self._wmask = bytearray(CONFIG_SPACE_SIZE)
        self._w1cmask = bytearray(CONFIG_SPACE_SIZE)
        self.init_register(VENDOR_ID, vendor_id, 2)
        self.init_register(DEVICE_ID, device_id, 2)
        self.init_register(COMMAND, 0, 2, wmask=COMMAND_WRITABLE)
        self.init_register(STATUS, status, 2, w1cmask=STATUS_W1C)
        self.init_register(REVISION_ID, revision)
        self.init_register(CLASS_PROG, class_code, 3)
        self.init_register(CACHE_LINE_SIZE, 0, wmask=0xFF)
        self.init_register(HEADER_TYPE, header_type)
        self.init_register(SUBSYSTEM_VENDOR_ID, QEMU_SUBSYSTEM_VENDOR, 2)
        self.init_register(SUBSYSTEM_ID, QEMU_SUBSYSTEM, 2)
        self.init_register(INTERRUPT_LINE, 0, wmask=0xFF)
        self.init_register(INTERRUPT_PIN, interrupt_pin)
        self._wmask[HEADER_SIZE:] = b"\xff" * (CONFIG_SPACE_SIZE - HEADER_SIZE)

    def init_register(
        self, offset: int, value: int, size: int = 1, *, wmask: int = 0, w1cmask: int = 0
    ) -> None:
        """Give the ``size`` bytes at ``offset`` their reset ``value`` and masks."""
        if not (0 <= offset and size > 0 and offset + size <= CONFIG_SPACE_SIZE):
            raise PciError(
                f"{self.name}: register at {offset!r} size {size!r} is outside the "
                f"{CONFIG_SPACE_SIZE}-byte configuration space"
            )
        for what, field in (("value", value), ("write mask", wmask), ("W1C mask", w1cmask)):
            _check(f"{self.name}: {what} at {offset:#x}", field, 8 * size)
        end = offset + size
        self.config[offset:end] = value.to_bytes(size, "little")
        self._wmask[offset:end] = wmask.to_bytes(size, "little")
        self._w1cmask[offset:end] = w1cmask.to_bytes(size, "little")

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.config[offset : offset + size])

    def write(self, offset: int, data: bytes) -> None:
        for at, byte in enumerate(data, start=offset):
            wmask, w1c = self._wmask[at], self._w1cmask[at]
            self.config[at] = ((self.config[at] & ~wmask) | (byte & wmask)) & ~(byte & w1c)
        self.config_written(offset, len(data))

    def config_written(self, offset: int, size: int) -> None:
        """Called after each guest write of ``size`` bytes at ``offset``; functions whose
        registers have effects beyond their storage override it."""

    def register(self, offset: int, size: int) -> int:
        """The little-endian value of ``size`` bytes at ``offset``."""
        return int.from_bytes(self.config[offset : offset + size], "little")


def _touches(offset: int, size: int, start: int, length: int) -> bool:
    return offset < start + length and start < offset + size


def _aligned(offset: int, size: int) -> bool:
    """Whether QEMU's memory core lets an access through to a region that does not
    accept unaligned ones (``memory_region_access_valid``)."""
    return size > 0 and offset % size == 0


def i440fx_host_bridge() -> PciFunction:
    """00:00.0, as QEMU's ``i440fx_class_init``/``i440fx_realize`` create it.

    OVMF tells the ``pc`` machine from ``q35`` by this function's device ID (``PciRead16``
    of 00:00.0 offset 2 in SEC's ``AcpiTimerLibConstructor``, PlatformPei and DXE). The
    PAM registers and SMRAM are plain storage: OVMF writes them, and sevsim's low memory
    is RAM whatever they say.
    """
    bridge = PciFunction(
        "i440fx",
        vendor_id=INTEL,
        device_id=I440FX_DEVICE_ID,
        class_code=CLASS_HOST_BRIDGE,
        revision=I440FX_REVISION,
    )
    bridge.init_register(I440FX_SMRAM, SMRAM_C_BASE_SEG, wmask=0xFF)
    return bridge


def piix3_isa_bridge() -> PciFunction:
    """00:01.0, as QEMU's ``piix3_class_init`` and ``piix_reset`` leave it.

    Multi-function, so that enumeration (PciBusDxe, Linux) looks at 01.1-01.7 and finds
    the PM function at 01.3. OVMF's ``PciAcpiInitialization`` writes the PIRQ route
    control registers 0x60-0x63; they are kept (QEMU's reset value 0x80 means "not
    routed").
    """
    bridge = PciFunction(
        "piix3",
        vendor_id=INTEL,
        device_id=PIIX3_DEVICE_ID,
        class_code=CLASS_ISA_BRIDGE,
        header_type=HEADER_MULTI_FUNCTION,
        status=STATUS_DEVSEL_MEDIUM,
    )
    enabled = COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER
    bridge.init_register(COMMAND, enabled, 2, wmask=COMMAND_WRITABLE)
    bridge.init_register(PIIX3_PIRQRC, PIRQ_ROUTE_DISABLED * 0x0101_0101, 4, wmask=0xFFFF_FFFF)
    for offset, value in PIIX3_RESET:
        bridge.init_register(offset, value, wmask=0xFF)
    return bridge


class Piix4PowerManagement(PciFunction):
    """00:01.3, the PIIX4 ACPI/power-management function (QEMU ``hw/acpi/piix4.c``).

    PMBA (0x40) holds the base of the 64-port ACPI PM block in bits 15:6; bit 0 reads 1
    (I/O space) and the other bits read 0, as on the PIIX4. PMREGMISC (0x80) bit 0,
    PMIOSE, turns the block's decoding on. After every write that touches either
    register the block is put where they say, as QEMU's ``pm_io_space_update`` does:
    moved when PMBA changes, taken off the bus when PMIOSE is cleared. OVMF's SEC
    (``AcpiTimerLibConstructor``) and PlatformPei program PMBA to 0xB000 and set PMIOSE
    if it is clear.

    If the guest places the block over ports another device holds, it stays unmapped
    until the guest moves it somewhere free: sevsim's bus has no priorities to decide
    who would win.
    """

    __slots__ = ("_block", "_io", "mapped_at")

    def __init__(self, io: Bus, block: AcpiPmBlock) -> None:
        super().__init__(
            "piix4-pm",
            vendor_id=INTEL,
            device_id=PIIX4_PM_DEVICE_ID,
            class_code=CLASS_OTHER_BRIDGE,
            revision=PIIX4_PM_REVISION,
            status=STATUS_FAST_BACK_TO_BACK | STATUS_DEVSEL_MEDIUM,
            interrupt_pin=1,
        )
        self._io = io
        self._block = block
        #: Where the PM block is on the I/O bus, or None while it is not decoded.
        self.mapped_at: int | None = None
        self.init_register(PMBA, PMBA_RTE, 4, wmask=PMBA_BASE_MASK)
        self.init_register(PMREGMISC, 0, wmask=PMIOSE)
        for offset, value in PIIX4_PM_RESET:
            self.init_register(offset, value, wmask=0xFF)

    def config_written(self, offset: int, size: int) -> None:
        if _touches(offset, size, PMBA, 4) or _touches(offset, size, PMREGMISC, 1):
            self._place_block()

    def _place_block(self) -> None:
        wanted = None
        if self.config[PMREGMISC] & PMIOSE:
            wanted = self.register(PMBA, 4) & PMBA_BASE_MASK
        if wanted == self.mapped_at:
            return
        if self.mapped_at is not None:
            self._io.remove(self._block, self.mapped_at)
            self.mapped_at = None
        if wanted is not None:
            try:
                self._io.insert(self._block, wanted, PM_BLOCK_SIZE)
            except BusError:
                return  # over another device's ports: left undecoded
            self.mapped_at = wanted


_OVERLAY_OFFSET = RESET_CONTROL_PORT - CONFIG_ADDRESS_PORT


class ConfigAddressPort:
    """CONFADD at 0xCF8-0xCFB, with the reset control register layered over 0xCF9."""

    __slots__ = ("_host", "_overlay", "name")

    def __init__(self, host: PciHost, overlay: Device | None) -> None:
        self.name = "pci-conf-idx"
        self._host = host
        self._overlay = overlay

    def read(self, offset: int, size: int) -> bytes:
        if offset == _OVERLAY_OFFSET and self._overlay is not None:
            return self._overlay.read(0, size)
        if not _aligned(offset, size):
            return bytes(size)
        return (self._host.config_address & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        if offset == _OVERLAY_OFFSET and self._overlay is not None:
            self._overlay.write(0, data)
        elif offset == 0 and len(data) == 4:
            self._host.config_address = int.from_bytes(data, "little")


class ConfigDataPort:
    """CONFDATA at 0xCFC-0xCFF: the window onto the latched function's registers."""

    __slots__ = ("_host", "name")

    def __init__(self, host: PciHost) -> None:
        self.name = "pci-conf-data"
        self._host = host

    def read(self, offset: int, size: int) -> bytes:
        if not _aligned(offset, size):
            return bytes(size)
        target = self._host.selected(offset)
        if target is None:
            return b"\xff" * size
        function, register = target
        return function.read(register, size).ljust(size, b"\x00")

    def write(self, offset: int, data: bytes) -> None:
        if not _aligned(offset, len(data)):
            return
        target = self._host.selected(offset)
        if target is not None:
            function, register = target
            function.write(register, data[: CONFIG_SPACE_SIZE - register])


class PciHost:
    """Configuration mechanism #1 onto PCI bus 0 (the only bus: no bridges).

    ``reset_control`` is the device QEMU layers over port 0xCF9 (the PIIX reset control
    register); without one, 0xCF9 is part of CONFADD.
    """

    __slots__ = ("_functions", "address_port", "config_address", "data_port")

    def __init__(self, reset_control: Device | None = None) -> None:
        #: The CONFADD latch, as last written with a dword.
        self.config_address = 0
        self._functions: dict[int, PciFunction] = {}
        self.address_port = ConfigAddressPort(self, reset_control)
        self.data_port = ConfigDataPort(self)

    def add(self, device: int, function: int, pci_function: PciFunction) -> None:
        """Put ``pci_function`` at bus 0, ``device``.``function``."""
        if not (0 <= device < 32 and 0 <= function < 8):
            raise PciError(
                f"PCI address {device!r}.{function!r} is not a device 0-31 and function 0-7"
            )
        devfn = device << 3 | function
        if devfn in self._functions:
            raise PciError(
                f"00:{device:02x}.{function} holds {self._functions[devfn].name!r} already; "
                f"cannot add {pci_function.name!r}"
            )
        self._functions[devfn] = pci_function

    def function(self, bus: int, device: int, function: int) -> PciFunction | None:
        if bus != 0:
            return None
        return self._functions.get(device << 3 | function)

    def selected(self, port_offset: int) -> tuple[PciFunction, int] | None:
        """The function and register a CONFDATA access at ``port_offset`` reaches, or None
        when configuration cycles are off or nothing answers."""
        address = self.config_address | port_offset
        if not address & CONFIG_ENABLE:
            return None
        devfn = (address >> 8) & 0xFF
        found = self.function((address >> 16) & 0xFF, devfn >> 3, devfn & 7)
        if found is None:
            return None
        return found, address & 0xFF

    def attach(self, io: Bus) -> None:
        """Claim CONFADD and CONFDATA on the I/O bus."""
        io.insert(self.address_port, CONFIG_ADDRESS_PORT, 4)
        io.insert(self.data_port, CONFIG_DATA_PORT, 4)


def attach_i440fx(io: Bus, pm_block: AcpiPmBlock, reset_control: Device | None) -> PciHost:
    """Build the PCI host of QEMU's ``pc`` machine (-nodefaults, SEV-ES) and put it on ``io``."""
    host = PciHost(reset_control)
    host.add(0, 0, i440fx_host_bridge())
    host.add(1, 0, piix3_isa_bridge())
    host.add(1, 3, Piix4PowerManagement(io, pm_block))
    host.attach(io)
    return host
