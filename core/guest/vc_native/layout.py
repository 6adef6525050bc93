"""Where the native #VC handler lives and what it keeps in its private state page.

The state page is a layout table like the GHCB's: the builder fills it, tests read
it, and the assembly reaches its fields as ``STATE_<field>`` through the generated
prelude, so the offsets are written down once, here.
"""

from __future__ import annotations

from sevsim.arch.layout import Layout

#: Where the tests and the demo put the handler: inside the first 2 MiB, past the code.
VC_HANDLER_ADDRESS = 0x40000
#: The code must fit below the state page.
CODE_LIMIT = 0x2000
#: The private state page, relative to the handler's address.
STATE_OFFSET = 0x2000
#: Bytes the handler occupies (code, padding, state page).
HANDLER_SIZE = STATE_OFFSET + 0x1000

# fmt: off
VC_STATE = Layout.build("vc_state", 0x1000, [
    ("vc_count", 0x00, "u64"),        # #VCs taken
    ("last_exit_code", 0x08, "u64"),  # the last #VC's error code
    ("last_rip", 0x10, "u64"),        # ... and the RIP it was taken at
    ("dr7", 0x18, "u64"),             # DR7 as the guest last wrote it
    ("failed_info1", 0x20, "u64"),    # sw_exit_info_1 of a failed VMGEXIT
    ("failed_info2", 0x28, "u64"),    # ... and its sw_exit_info_2
    ("in_vc", 0x30, "u64"),           # 1 while a #VC is being handled
    ("reserved_0x38", 0x38, "u8[4040]"),
])
# fmt: on

STATE_VC_COUNT = VC_STATE.offset("vc_count")
STATE_LAST_EXIT_CODE = VC_STATE.offset("last_exit_code")
STATE_LAST_RIP = VC_STATE.offset("last_rip")
STATE_DR7 = VC_STATE.offset("dr7")
STATE_FAILED_INFO1 = VC_STATE.offset("failed_info1")
STATE_FAILED_INFO2 = VC_STATE.offset("failed_info2")
#: Non-zero while the handler is handling a #VC: a #VC that finds it set is nested.
STATE_IN_VC = VC_STATE.offset("in_vc")

#: GHCB protocol version written in each request (KVM does not read it).
PROTOCOL_VERSION = 1
