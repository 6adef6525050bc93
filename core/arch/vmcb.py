"""``struct vmcb_control_area`` and its bit fields, from Linux's svm.h.

The control area is the hypervisor's whole view of a stopped SEV-ES vCPU: exit code
and info, the guest's GHCB MSR value (``ghcb_gpa``), EVENTINJ, and ``vmsa_pa``.
The names are the long-standing ones (``nested_ctl``, ``virt_ext``, split
``exit_code``/``exit_code_hi``); the newest tree renames them at the same offsets.
"""

from __future__ import annotations

from enum import IntFlag

from sevsim.arch.layout import FieldReader, Layout

# fmt: off
VMCB_CONTROL = Layout.build("vmcb_control_area", 1024, [
    ("intercepts", 0x0, "u8[24]"), ("reserved_1", 0x18, "u8[36]"),
    ("pause_filter_thresh", 0x3c, "u16"), ("pause_filter_count", 0x3e, "u16"),
    ("iopm_base_pa", 0x40, "u64"), ("msrpm_base_pa", 0x48, "u64"), ("tsc_offset", 0x50, "u64"),
    ("asid", 0x58, "u32"), ("tlb_ctl", 0x5c, "u8"), ("erap_ctl", 0x5d, "u8"),
    ("reserved_2", 0x5e, "u8[2]"),
    ("int_ctl", 0x60, "u32"), ("int_vector", 0x64, "u32"), ("int_state", 0x68, "u32"),
    ("reserved_3", 0x6c, "u8[4]"),
    ("exit_code", 0x70, "u32"), ("exit_code_hi", 0x74, "u32"),
    ("exit_info_1", 0x78, "u64"), ("exit_info_2", 0x80, "u64"),
    ("exit_int_info", 0x88, "u32"), ("exit_int_info_err", 0x8c, "u32"),
    ("nested_ctl", 0x90, "u64"), ("avic_vapic_bar", 0x98, "u64"), ("ghcb_gpa", 0xa0, "u64"),
    ("event_inj", 0xa8, "u32"), ("event_inj_err", 0xac, "u32"),
    ("nested_cr3", 0xb0, "u64"), ("virt_ext", 0xb8, "u64"),
    ("clean", 0xc0, "u32"), ("reserved_5", 0xc4, "u32"),
    ("next_rip", 0xc8, "u64"), ("insn_len", 0xd0, "u8"), ("insn_bytes", 0xd1, "u8[15]"),
    ("avic_backing_page", 0xe0, "u64"), ("reserved_6", 0xe8, "u8[8]"),
    ("avic_logical_id", 0xf0, "u64"), ("avic_physical_id", 0xf8, "u64"),
    ("reserved_7", 0x100, "u8[8]"), ("vmsa_pa", 0x108, "u64"), ("reserved_8", 0x110, "u8[16]"),
    ("bus_lock_counter", 0x120, "u16"), ("reserved_9", 0x122, "u8[22]"),
    ("allowed_sev_features", 0x138, "u64"), ("guest_sev_features", 0x140, "u64"),
    ("reserved_10", 0x148, "u8[664]"), ("reserved_sw", 0x3e0, "u8[32]"),
])
# fmt: on

#: The control fields every VMRUN and #VMEXIT touch, each read or written with one
#: compiled struct (same bytes as ``VMCB_CONTROL.get``/``set`` of each field).
VMCB_EXIT = VMCB_CONTROL.group("exit_code", "exit_code_hi", "exit_info_1", "exit_info_2")
VMCB_INT_CTL = VMCB_CONTROL.group("int_ctl")
VMCB_INT_STATE = VMCB_CONTROL.group("int_state")
VMCB_GHCB_GPA = VMCB_CONTROL.group("ghcb_gpa")
VMCB_EVENT_INJ = VMCB_CONTROL.group("event_inj", "event_inj_err")
VMCB_ASID = VMCB_CONTROL.group("asid")
#: Everything VMRUN reads of the control area, in one struct, in this order.
VMCB_VMRUN = FieldReader(VMCB_CONTROL[name] for name in (
    "intercepts", "msrpm_base_pa", "int_ctl", "nested_ctl", "ghcb_gpa", "event_inj",
    "event_inj_err", "vmsa_pa"))  # fmt: skip


class NestedCtl(IntFlag):
    """``nested_ctl`` (newest: ``misc_ctl``) enable bits."""

    NP_ENABLE = 1 << 0
    SEV_ENABLE = 1 << 1
    SEV_ES_ENABLE = 1 << 2


class EventInj:
    """EVENTINJ / EXITINTINFO encoding: vector 7:0, type 10:8, error-code valid 11, valid 31."""

    VECTOR_MASK = 0xFF
    TYPE_SHIFT = 8
    TYPE_INTR = 0
    TYPE_NMI = 2
    TYPE_EXEPT = 3
    TYPE_SOFT = 4
    EV = 1 << 11
    VALID = 1 << 31

    @classmethod
    def exception(cls, vector: int, error_code: int | None = None) -> int:
        """The 64-bit form KVM writes to sw_exit_info_2 for an exception reply.

        ``#GP`` with error code 0 gives 0x80000b0d; KVM's MSR failure path
        writes ``#GP`` without the error-code bit, 0x8000030d.
        """
        value = cls.VALID | (cls.TYPE_EXEPT << cls.TYPE_SHIFT) | vector
        if error_code is not None:
            value |= cls.EV | (error_code << 32)
        return value


class IntState:
    """``int_state``: bit 1 is the guest's IF for SEV-ES guests (``svm_get_if_flag``).

    Plain ints, not an IntFlag: VMRUN writes them and KVM tests them before every
    entry, and ``int & IntFlag`` builds a flag member through the Enum machinery."""

    INTERRUPT_SHADOW = 1 << 0
    GUEST_INTERRUPT_MASK = 1 << 1


#: ``int_ctl``: a virtual interrupt is pending (V_IRQ), KVM's interrupt window.
V_IRQ = 1 << 8


class TlbCtl:
    DO_NOTHING = 0
    FLUSH_ALL_ASID = 1
    FLUSH_ASID = 3
    FLUSH_ASID_LOCAL = 7
