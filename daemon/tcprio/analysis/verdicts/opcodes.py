"""BPF instruction encoding (include/uapi/linux/bpf.h) and the registers the analysis knows."""

U64 = (1 << 64) - 1
U32 = 0xFFFFFFFF

# Instruction classes, operations, sizes and modes (include/uapi/linux/bpf.h).
LD, LDX, ST, STX, ALU, JMP, JMP32, ALU64 = range(8)
OP_ADD, OP_SUB, OP_MUL, OP_DIV, OP_OR, OP_AND, OP_LSH, OP_RSH = range(0x00, 0x80, 0x10)
OP_NEG, OP_MOD, OP_XOR, OP_MOV, OP_ARSH, OP_END = range(0x80, 0xE0, 0x10)
J_JA, J_JEQ, J_JGT, J_JGE, J_JSET, J_JNE, J_JSGT, J_JSGE = range(0x00, 0x80, 0x10)
J_CALL, J_EXIT, J_JLT, J_JLE, J_JSLT, J_JSLE, J_JCOND = range(0x80, 0xF0, 0x10)
SRC_X = 0x08
SIZE_BYTES = {0x00: 4, 0x08: 2, 0x10: 1, 0x18: 8}
MODE_IMM, MODE_ABS, MODE_IND, MODE_MEM, MODE_MEMSX = 0x00, 0x20, 0x40, 0x60, 0x80
MODE_ATOMIC = 0xC0
LD_IMM64 = LD | MODE_IMM | 0x18
ST_NOSPEC = ST | 0xC0  # speculation barrier: does nothing to the state

PSEUDO_MAP_FD, PSEUDO_MAP_VALUE, PSEUDO_BTF_ID, PSEUDO_FUNC = 1, 2, 3, 4
PSEUDO_CALL, PSEUDO_KFUNC_CALL = 1, 2
BPF_FUNC_TAIL_CALL = 12

ATOMIC_FETCH = 0x01
ATOMIC_OPS = frozenset({OP_ADD, OP_OR, OP_AND, OP_XOR})
ATOMIC_XCHG, ATOMIC_CMPXCHG = 0xE0 | ATOMIC_FETCH, 0xF0 | ATOMIC_FETCH
ATOMIC_LOAD_ACQ, ATOMIC_STORE_REL = 0x100, 0x110

CONDITIONAL_JUMPS = frozenset(
    {J_JEQ, J_JGT, J_JGE, J_JSET, J_JNE, J_JSGT, J_JSGE, J_JLT, J_JLE, J_JSLT, J_JSLE}
)

AX = 11  # the verifier's scratch register, seen in rewritten code (may_goto, ...)
WRITABLE = frozenset({*range(10), AX})
