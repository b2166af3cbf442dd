// tcprio's live verdict probe: counts the return codes of cls_bpf classifiers on real traffic.
// Compiled at run time with BCC (python3-bpfcc) by daemon/tcprio/live_probe.py.
//
// Three ways to hook, one counting map. Which one runs depends on what the kernel allows:
//  - verdict_fexit_classify: fexit on the kernel's cls_bpf_classify() (BPF_PROG_TYPE_TRACING).
//  - verdict_kprobe_entry + verdict_kretprobe: kprobe / kretprobe on cls_bpf_classify()
//    (BPF_PROG_TYPE_KPROBE; loads without kprobe support, attaching needs CONFIG_KPROBES).
//    The pair counts exactly what the fexit program counts.
//  - verdict_fexit_prog: fexit on one classifier program itself (attach_prog_fd = the target),
//    loaded once per target with the target's program id written over TARGET_PROG_ID_MARK.
//
// What is counted.
//  - cls_bpf_classify() modes: the value cls_bpf_classify() hands back to tcf_classify() for one
//    tcf_proto, that is one (chain, priority, protocol) of one hook. That value covers ALL the
//    cls_bpf filters (handles) at that priority, run in list order:
//      * direct-action: the first program whose result cls_bpf_exec_opcode() keeps (TC_ACT_OK 0,
//        SHOT 2, STOLEN 4, TRAP 8, REDIRECT 7) ends the list and is returned as is; any other
//        raw value (-1, TC_ACT_PIPE 3, 42 ...) is mapped to TC_ACT_UNSPEC and the next program
//        runs. -1 counted here means "every program at this priority let the packet go on".
//      * not direct-action: a program result of 0 (no match) goes on to the next program;
//        otherwise the filter's actions run and their result is returned (no actions:
//        TC_ACT_OK 0); a negative action result goes on too.
//    The raw return value of one program (42, TC_ACT_PIPE ...) is NOT visible in these modes.
//  - verdict_fexit_prog: the raw return value of the target program, per packet it ran on,
//    wherever it runs (clsact filter, tcx link, act_bpf, BPF_PROG_TEST_RUN). No priority
//    (the program does not know where it hangs); user space adds it from its inventory.
//
// The key: network namespace inode (skb->dev->nd_net.net->ns.inum), ifindex (skb->dev), the
// tcf_proto priority (tp->prio >> 16) and chain (tp->chain->index), the program id (fexit_prog
// only), the return value and where: ingress or egress of a clsact / ingress qdisc
// (skb->tc_at_ingress, when tp->chain->block->q->handle is ffff: or the block is shared), or
// "other" (a classful qdisc's filter).
//
// Kernel structure offsets come from the running kernel's BTF (/sys/kernel/btf/vmlinux) as -D
// flags: the headers BCC compiles against are not this kernel's, so no struct from them is used.
#include <uapi/linux/bpf.h>
#include <uapi/linux/ptrace.h>

#if !defined(OFF_SKB_DEV) || !defined(OFF_SKB_TC_FLAGS) || !defined(MASK_TC_AT_INGRESS) ||  \
    !defined(OFF_DEV_IFINDEX) || !defined(OFF_DEV_NET) || !defined(OFF_NET_INUM) ||         \
    !defined(OFF_TP_PRIO) || !defined(OFF_TP_CHAIN) || !defined(OFF_CHAIN_INDEX) ||         \
    !defined(OFF_CHAIN_BLOCK) || !defined(OFF_BLOCK_Q) || !defined(OFF_QDISC_HANDLE)
#error "verdict_probe.c needs the kernel offsets from live_probe.py (-DOFF_SKB_DEV=... etc.)"
#endif

#define WHERE_EGRESS 0
#define WHERE_INGRESS 1
#define WHERE_OTHER 2
#define CLSACT_HANDLE 0xFFFF0000  // clsact and ingress qdiscs are both ffff:
#define TARGET_PROG_ID_MARK 0x5EC1D0A1  // replaced by the target's program id at load
#define STASH_DEPTH 8  // nested cls_bpf_classify() on one CPU (XMIT_RECURSION_LIMIT is 8)
#define MAX_KEYS 16384

struct verdict_key {
    u32 netns_inode;
    u32 ifindex;
    u32 prio;     // 0 in fexit_prog mode
    u32 chain;    // tc chain index; 0 in fexit_prog mode
    u32 prog_id;  // 0 in the cls_bpf_classify() modes
    s32 retval;
    u32 where;    // WHERE_*
};

// Missed counts, per CPU: [0] the count map was full, [1] kprobe entry and return did not pair.
#define MISS_MAP_FULL 0
#define MISS_STASH 1

struct classify_args {
    u64 skb;
    u64 tp;
};

// kprobe -> kretprobe hand-over. cls_bpf_classify() runs with bottom halves disabled, on one CPU,
// start to end; it can nest on that CPU (a program that transmits a clone), never interleave.
struct classify_stash {
    u32 depth;
    u32 pad;
    struct classify_args frames[STASH_DEPTH];
};

BPF_PERCPU_HASH(verdict_counts, struct verdict_key, u64, MAX_KEYS);
BPF_PERCPU_ARRAY(verdict_misses, u64, 2);
BPF_PERCPU_ARRAY(verdict_stash, struct classify_stash, 1);

// Makes clang forget what it knows of a value's range, so that the bounds check written right
// before an array index is emitted on that very register (the verifier needs to see it there).
#define forget_range(var) asm volatile("" : "+r"(var))

static __always_inline void miss(int slot)
{
    u64 *n = verdict_misses.lookup(&slot);
    if (n)
        *n += 1;
}

static __always_inline u64 read_ptr(u64 addr)
{
    u64 value = 0;
    bpf_probe_read_kernel(&value, sizeof(value), (void *)addr);
    return value;
}

static __always_inline u32 read_u32(u64 addr)
{
    u32 value = 0;
    bpf_probe_read_kernel(&value, sizeof(value), (void *)addr);
    return value;
}

static __always_inline u32 skb_direction(u64 skb)
{
    u8 flags = 0;
    bpf_probe_read_kernel(&flags, sizeof(flags), (void *)(skb + OFF_SKB_TC_FLAGS));
    return (flags & MASK_TC_AT_INGRESS) ? WHERE_INGRESS : WHERE_EGRESS;
}

static __always_inline void fill_device(struct verdict_key *key, u64 skb)
{
    u64 dev = read_ptr(skb + OFF_SKB_DEV);
    if (!dev)
        return;
    key->ifindex = read_u32(dev + OFF_DEV_IFINDEX);
    u64 net = read_ptr(dev + OFF_DEV_NET);
    if (net)
        key->netns_inode = read_u32(net + OFF_NET_INUM);
}

// The qdisc of the filter's block: clsact / ingress (handle ffff:) or a shared block (no qdisc,
// only clsact and ingress share blocks) give a direction; a classful qdisc's filters do not.
static __always_inline u32 block_where(u64 skb, u64 block)
{
    u64 q = block ? read_ptr(block + OFF_BLOCK_Q) : 0;
    if (q && read_u32(q + OFF_QDISC_HANDLE) != CLSACT_HANDLE)
        return WHERE_OTHER;
    return block ? skb_direction(skb) : WHERE_OTHER;
}

static __always_inline void count(struct verdict_key *key)
{
    u64 zero = 0;
    u64 *n = verdict_counts.lookup_or_try_init(key, &zero);
    if (n)
        *n += 1;  // per-CPU value: no atomic needed
    else
        miss(MISS_MAP_FULL);
}

static __always_inline void count_classify(u64 skb, u64 tp, s32 retval)
{
    struct verdict_key key = {};
    fill_device(&key, skb);
    key.prio = read_u32(tp + OFF_TP_PRIO) >> 16;
    u64 chain = read_ptr(tp + OFF_TP_CHAIN);
    u64 block = 0;
    if (chain) {
        key.chain = read_u32(chain + OFF_CHAIN_INDEX);
        block = read_ptr(chain + OFF_CHAIN_BLOCK);
    }
    key.where = block_where(skb, block);
    key.retval = retval;
    count(&key);
}

// --- fexit on cls_bpf_classify(skb, tp, res) ------------------------------------------------
int verdict_fexit_classify(u64 *ctx)
{
    u64 skb = 0, tp = 0, ret = 0;
    if (bpf_get_func_arg(ctx, 0, &skb) || bpf_get_func_arg(ctx, 1, &tp) ||
        bpf_get_func_ret(ctx, &ret) || !skb || !tp)
        return 0;
    count_classify(skb, tp, (s32)ret);
    return 0;
}

// --- kprobe + kretprobe on cls_bpf_classify ---------------------------------------------------
int verdict_kprobe_entry(struct pt_regs *ctx)
{
    int zero = 0;
    struct classify_stash *stash = verdict_stash.lookup(&zero);
    if (!stash)
        return 0;
    u32 depth = stash->depth;
    if (depth >= STASH_DEPTH) {
        // Deeper than transmit recursion allows: returns were missed (kretprobe instances ran
        // out). Start over rather than stop counting on this CPU.
        miss(MISS_STASH);
        depth = 0;
    }
    forget_range(depth);
    if (depth >= STASH_DEPTH)
        return 0;
    struct classify_args *frame = &stash->frames[depth];
    frame->skb = PT_REGS_PARM1(ctx);
    frame->tp = PT_REGS_PARM2(ctx);
    stash->depth = depth + 1;
    return 0;
}

// Attached before the entry probe, so that a call already running finds an empty stash.
int verdict_kretprobe(struct pt_regs *ctx)
{
    int zero = 0;
    struct classify_stash *stash = verdict_stash.lookup(&zero);
    if (!stash)
        return 0;
    u32 depth = stash->depth;
    if (depth == 0 || depth > STASH_DEPTH) {  // a return without its entry
        miss(MISS_STASH);
        return 0;
    }
    depth -= 1;
    stash->depth = depth;
    forget_range(depth);
    if (depth >= STASH_DEPTH)
        return 0;
    struct classify_args args = stash->frames[depth];
    if (args.skb && args.tp)
        count_classify(args.skb, args.tp, (s32)PT_REGS_RC(ctx));
    return 0;
}

// --- fexit on one classifier program: int prog(struct __sk_buff *skb) -------------------------
// The program's argument is the kernel's struct sk_buff (struct __sk_buff is only its view).
int verdict_fexit_prog(u64 *ctx)
{
    u64 skb = 0, ret = 0;
    if (bpf_get_func_arg(ctx, 0, &skb) || bpf_get_func_ret(ctx, &ret) || !skb)
        return 0;
    struct verdict_key key = {};
    fill_device(&key, skb);
    key.prog_id = TARGET_PROG_ID_MARK;
    key.where = skb_direction(skb);
    key.retval = (s32)ret;
    count(&key);
    return 0;
}
