"""``struct vmcb_seg`` and ``struct sev_es_save_area`` (the VMSA), from Linux's svm.h.

The VMSA is the only home of an SEV-ES guest's register state between runs; the
hardware keeps it encrypted in a 4 KiB page whose first 1648 bytes follow this table.
"""

from __future__ import annotations

from attrs import frozen

from sevsim.arch.layout import Layout

VMSA_PAGE_SIZE = 4096

VMCB_SEG = Layout.build(
    "vmcb_seg",
    16,
    [("selector", 0x0, "u16"), ("attrib", 0x2, "u16"), ("limit", 0x4, "u32"), ("base", 0x8, "u64")],
)

SEGMENT_NAMES = ("es", "cs", "ss", "ds", "fs", "gs", "gdtr", "ldtr", "idtr", "tr")

# fmt: off
VMSA = Layout.build("sev_es_save_area", 1648, [
    *[(name, 16 * i, "vmcb_seg") for i, name in enumerate(SEGMENT_NAMES)],
    ("pl0_ssp", 0xa0, "u64"), ("pl1_ssp", 0xa8, "u64"), ("pl2_ssp", 0xb0, "u64"),
    ("pl3_ssp", 0xb8, "u64"), ("u_cet", 0xc0, "u64"),
    ("reserved_0xc8", 0xc8, "u8[2]"), ("vmpl", 0xca, "u8"), ("cpl", 0xcb, "u8"),
    ("reserved_0xcc", 0xcc, "u8[4]"), ("efer", 0xd0, "u64"),
    ("reserved_0xd8", 0xd8, "u8[104]"),
    ("xss", 0x140, "u64"), ("cr4", 0x148, "u64"), ("cr3", 0x150, "u64"), ("cr0", 0x158, "u64"),
    ("dr7", 0x160, "u64"), ("dr6", 0x168, "u64"), ("rflags", 0x170, "u64"), ("rip", 0x178, "u64"),
    ("dr0", 0x180, "u64"), ("dr1", 0x188, "u64"), ("dr2", 0x190, "u64"), ("dr3", 0x198, "u64"),
    ("dr0_addr_mask", 0x1a0, "u64"), ("dr1_addr_mask", 0x1a8, "u64"),
    ("dr2_addr_mask", 0x1b0, "u64"), ("dr3_addr_mask", 0x1b8, "u64"),
    ("reserved_0x1c0", 0x1c0, "u8[24]"),
    ("rsp", 0x1d8, "u64"), ("s_cet", 0x1e0, "u64"), ("ssp", 0x1e8, "u64"),
    ("isst_addr", 0x1f0, "u64"), ("rax", 0x1f8, "u64"),
    ("star", 0x200, "u64"), ("lstar", 0x208, "u64"), ("cstar", 0x210, "u64"),
    ("sfmask", 0x218, "u64"), ("kernel_gs_base", 0x220, "u64"), ("sysenter_cs", 0x228, "u64"),
    ("sysenter_esp", 0x230, "u64"), ("sysenter_eip", 0x238, "u64"), ("cr2", 0x240, "u64"),
    ("reserved_0x248", 0x248, "u8[32]"),
    ("g_pat", 0x268, "u64"), ("dbgctl", 0x270, "u64"), ("br_from", 0x278, "u64"),
    ("br_to", 0x280, "u64"), ("last_excp_from", 0x288, "u64"), ("last_excp_to", 0x290, "u64"),
    ("reserved_0x298", 0x298, "u8[80]"),
    ("pkru", 0x2e8, "u32"), ("tsc_aux", 0x2ec, "u32"),
    ("tsc_scale", 0x2f0, "u64"), ("tsc_offset", 0x2f8, "u64"),
    ("reserved_0x300", 0x300, "u8[8]"),
    ("rcx", 0x308, "u64"), ("rdx", 0x310, "u64"), ("rbx", 0x318, "u64"),
    ("reserved_0x320", 0x320, "u64"),
    ("rbp", 0x328, "u64"), ("rsi", 0x330, "u64"), ("rdi", 0x338, "u64"),
    ("r8", 0x340, "u64"), ("r9", 0x348, "u64"), ("r10", 0x350, "u64"), ("r11", 0x358, "u64"),
    ("r12", 0x360, "u64"), ("r13", 0x368, "u64"), ("r14", 0x370, "u64"), ("r15", 0x378, "u64"),
    ("reserved_0x380", 0x380, "u8[16]"),
    ("guest_exit_info_1", 0x390, "u64"), ("guest_exit_info_2", 0x398, "u64"),
    ("guest_exit_int_info", 0x3a0, "u64"), ("guest_nrip", 0x3a8, "u64"),
    ("sev_features", 0x3b0, "u64"), ("vintr_ctrl", 0x3b8, "u64"),
    ("guest_exit_code", 0x3c0, "u64"), ("virtual_tom", 0x3c8, "u64"),
    ("tlb_id", 0x3d0, "u64"), ("pcpu_id", 0x3d8, "u64"), ("event_inj", 0x3e0, "u64"),
    ("xcr0", 0x3e8, "u64"), ("reserved_0x3f0", 0x3f0, "u8[16]"),
    ("x87_dp", 0x400, "u64"), ("mxcsr", 0x408, "u32"), ("x87_ftw", 0x40c, "u16"),
    ("x87_fsw", 0x40e, "u16"), ("x87_fcw", 0x410, "u16"), ("x87_fop", 0x412, "u16"),
    ("x87_ds", 0x414, "u16"), ("x87_cs", 0x416, "u16"), ("x87_rip", 0x418, "u64"),
    ("fpreg_x87", 0x420, "u8[80]"), ("fpreg_xmm", 0x470, "u8[256]"),
    ("fpreg_ymm", 0x570, "u8[256]"),
], nested={"vmcb_seg": VMCB_SEG})
# fmt: on

#: The general-purpose registers a VMSA holds, in the order KVM's ``sev_es_sync_vmsa`` copies them.
GPR_NAMES = (
    "rax", "rbx", "rcx", "rdx", "rsp", "rbp", "rsi", "rdi",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)  # fmt: skip


@frozen
class Segment:
    """A ``vmcb_seg``: selector, attributes in VMCB (packed) form, limit, base."""

    selector: int = 0
    attrib: int = 0
    limit: int = 0
    base: int = 0

    def pack(self) -> bytes:
        fields = {"selector": self.selector, "attrib": self.attrib, "limit": self.limit}
        return bytes(VMCB_SEG.pack({**fields, "base": self.base}))

    @classmethod
    def unpack(cls, data: bytes) -> Segment:
        return cls(**VMCB_SEG.unpack(data))
