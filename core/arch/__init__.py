"""Pure layouts and constants, defined once: GHCB, VMSA, VMCB, exit codes, MSRs.

Nothing here has state or behaviour beyond encoding; every other layer imports its
structure offsets and names from this package.
"""

from sevsim.arch.exits import GhcbErr, GhcbResp, SvmExit, VmgExit, exit_name
from sevsim.arch.ghcb import GHCB, GHCB_SAVE_AREA, Ghcb
from sevsim.arch.ghcb_msr import GhcbMsr
from sevsim.arch.layout import Field, Layout
from sevsim.arch.vmcb import VMCB_CONTROL, EventInj, NestedCtl
from sevsim.arch.vmsa import VMCB_SEG, VMSA, Segment

__all__ = [
    "GHCB",
    "GHCB_SAVE_AREA",
    "VMCB_CONTROL",
    "VMCB_SEG",
    "VMSA",
    "EventInj",
    "Field",
    "Ghcb",
    "GhcbErr",
    "GhcbMsr",
    "GhcbResp",
    "Layout",
    "NestedCtl",
    "Segment",
    "SvmExit",
    "VmgExit",
    "exit_name",
]
