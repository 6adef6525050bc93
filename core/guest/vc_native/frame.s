# The #VC handler's stack frame (no code).
#
# The hardware pushes the interrupt frame (error code = the exit code, then RIP, CS,
# RFLAGS, RSP, SS); the handler's save area sits FRAME bytes below it and RBP points
# at its start for the whole handler: the interrupted GPRs indexed by their x86
# register number (slot 4 holds the interrupted RSP, so a decoded [rsp + ...] operand
# reads like any other base), then the decoder's locals.

.equ FRAME,     0x100           # bytes between RBP and the hardware frame
.equ F_ERR,     FRAME + 0x00    # error code: the SVM exit code
.equ F_RIP,     FRAME + 0x08    # the faulting instruction
.equ F_CS,      FRAME + 0x10
.equ F_RFLAGS,  FRAME + 0x18
.equ F_RSP,     FRAME + 0x20
.equ F_SS,      FRAME + 0x28

# The interrupted GPRs: [rbp + SLOT_reg], or [rbp + number * 8].
.equ SLOT_rax,  0x00
.equ SLOT_rcx,  0x08
.equ SLOT_rdx,  0x10
.equ SLOT_rbx,  0x18
.equ SLOT_rsp,  0x20
.equ SLOT_rbp,  0x28
.equ SLOT_rsi,  0x30
.equ SLOT_rdi,  0x38
.equ SLOT_r8,   0x40
.equ SLOT_r9,   0x48
.equ SLOT_r10,  0x50
.equ SLOT_r11,  0x58
.equ SLOT_r12,  0x60
.equ SLOT_r13,  0x68
.equ SLOT_r14,  0x70
.equ SLOT_r15,  0x78

# Locals.
.equ L_RIP,     0x80    # address of the faulting instruction
.equ L_REG,     0x88    # ModRM reg field (with REX.R)
.equ L_EA,      0x90    # effective address
.equ L_RIPREL,  0x98    # 1 if the operand is RIP-relative
.equ L_SIZE,    0xa0    # memory access / IO element size
.equ L_DSIZE,   0xa8    # destination register size of an MMIO read
.equ L_EXT,     0xb0    # MMIO read: 0 plain, 1 zero-extend, 2 sign-extend
.equ L_WRITE,   0xb8    # MMIO: 0 read, 1 write a register, 2 write an immediate
.equ L_IMM,     0xc0    # the immediate of C6/C7
.equ L_TMP,     0xc8    # 10 bytes for SIDT/SGDT
.equ L_NEWSP,   0xd8    # exception forwarding: the stack pointer to RET from
.equ L_CHUNK,   0xe0    # string IO: elements in this VMGEXIT
.equ L_STEP,    0xe8    # string IO: +size or -size (DF)
.equ L_DR7,     0xf0    # DR7 write: the value to remember once the hypervisor took it

# While decoding: R12 walks the instruction, R13 holds these prefix flags, R14 the
# REX byte (0 if none).
.equ PFX_OPSIZE, 1      # 66
.equ PFX_ADDR32, 2      # 67
.equ PFX_REP,    4      # F3 or F2
.equ PFX_FS,     8      # 64
.equ PFX_GS,     16     # 65
.equ PFX_NO_SEGMENT, 0xff & ~(PFX_FS | PFX_GS)
