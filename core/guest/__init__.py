"""Guest software: what runs inside an SEV-ES guest, and the tools that build it.

It talks to the hypervisor only as a real guest can (guest memory, the GHCB MSR and
VMGEXIT), which is why it imports no hypervisor layer: :mod:`.image` builds a small
64-bit guest (page tables with the C-bit, GDT, TSS, IDT), :mod:`.asm` assembles guest
code, :mod:`.vc_native` is a #VC handler in assembly that runs in the guest,
:mod:`.vc` the same handler modeled in Python (with :mod:`.decode` for the faulting
instruction), and :mod:`.demo` and ``manifests/`` are the bundled guests.
"""
