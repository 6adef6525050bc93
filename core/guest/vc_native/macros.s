# Macros (no code). RDI points at the GHCB throughout the handler.

# Store \reg in the GHCB's save-area field \field and mark it valid (ghcb_set_<field>).
.macro ghcb_set field, reg
    mov [rdi + GHCB_\field], \reg
    ghcb_valid \field
.endm

# Mark the save-area field \field valid (its value is already in place).
.macro ghcb_valid field
    or byte ptr [rdi + GHCB_\field\()_VALID_BYTE], GHCB_\field\()_VALID_MASK
.endm

# Jump to the VMM-error exit unless every named field came back valid, as Linux
# checks ghcb_<field>_is_valid() before it reads a result.
.macro ghcb_require fields:vararg
    .irp field, \fields
    ghcb_require_one \field
    .endr
.endm

.macro ghcb_require_one field
    test byte ptr [rdi + GHCB_\field\()_VALID_BYTE], GHCB_\field\()_VALID_MASK
    jz vc_vmm_error
.endm

# Save the named GPRs in their slots at [\base] / load them back from there.
.macro gprs_store base, regs:vararg
    .irp reg, \regs
    mov [\base + SLOT_\reg], \reg
    .endr
.endm

.macro gprs_load base, regs:vararg
    .irp reg, \regs
    mov \reg, [\base + SLOT_\reg]
    .endr
.endm
