// Classifiers that behave like the ones found on real nodes, for tcprio's tests and self-test.
// Compiled at run time with BCC (python3-bpfcc). Every function is a sched_cls program; its name
// (truncated by the kernel to 15 characters) is the program name that tcprio reports.
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

// Tail-call table: slot 0 is filled by the test with a program that returns a verdict.
BPF_PROG_ARRAY(verdict_jmp, 4);

// Each program bumps its own counter so that tests can see it ran on real traffic.
BPF_ARRAY(seen, u64, 16);

static __always_inline void count(int slot)
{
    u64 *n = seen.lookup(&slot);
    if (n)
        __sync_fetch_and_add(n, 1);
}

// --- terminal: end the clsact chain ------------------------------------------------------------
int term_ok(struct __sk_buff *skb) { count(0); return TC_ACT_OK; }
int term_shot(struct __sk_buff *skb) { count(1); return TC_ACT_SHOT; }
// bpf_redirect() returns TC_ACT_REDIRECT, or TC_ACT_SHOT for bad flags. The target is the
// packet's own interface: the redirect keeps the test traffic inside the test namespace.
int term_redirect(struct __sk_buff *skb) { count(2); return bpf_redirect(skb->ifindex, 0); }

// --- transparent: let the next classifier run ------------------------------------------------
int pass_unspec(struct __sk_buff *skb) { count(3); return TC_ACT_UNSPEC; }
int pass_pipe(struct __sk_buff *skb) { count(4); return TC_ACT_PIPE; }  // 3: continues too
int pass_42(struct __sk_buff *skb) { count(5); return 42; }  // any unknown value continues

// --- decides by packet: IPv6 is dropped, everything else continues --------------------------
int by_packet(struct __sk_buff *skb)
{
    count(6);
    if (skb->protocol == 0xDD86)  // htons(ETH_P_IPV6)
        return TC_ACT_SHOT;
    return TC_ACT_UNSPEC;
}

// --- BPF-to-BPF call: the verdict comes back from a sub-program ---------------------------
// BCC loads one function at a time and leaves a call to another function unresolved. The same
// body is therefore also compiled as a program of its own (decide_by_length_sub); the tests link
// its code behind bpf2bpf_call and fix the call's offset (see tests/bpf_programs.py).
// The helper call keeps skb a real pointer argument: without it clang would pass skb->len instead
// and the two copies would disagree on their arguments.
#define DECIDE_BY_LENGTH_BODY                               \
    u8 first = 0;                                           \
    if (bpf_skb_load_bytes(skb, 0, &first, 1) < 0)          \
        return TC_ACT_UNSPEC;                               \
    if (skb->len > 1000)                                    \
        return TC_ACT_OK;                                   \
    return TC_ACT_UNSPEC;

static noinline int decide_by_length(struct __sk_buff *skb) { DECIDE_BY_LENGTH_BODY }
int decide_by_length_sub(struct __sk_buff *skb) { DECIDE_BY_LENGTH_BODY }

int bpf2bpf_call(struct __sk_buff *skb)
{
    count(7);
    return decide_by_length(skb);
}

// --- tail call: the verdict comes from the program in verdict_jmp[0] -------------------------
int tail_entry(struct __sk_buff *skb)
{
    count(8);
    verdict_jmp.call(skb, 0);
    return TC_ACT_UNSPEC;  // slot empty: continue
}

int tail_target_ok(struct __sk_buff *skb) { count(9); return TC_ACT_OK; }

// --- not direct-action: the return value is a class id, 0 means "no match" -------------------
int classid_match(struct __sk_buff *skb) { count(10); return 0x10001; }
int classid_none(struct __sk_buff *skb) { count(11); return 0; }

// --- observers: what Datadog's, Retina's or Beyla's classifiers do --------------------------
int classifier_egress(struct __sk_buff *skb) { count(12); return TC_ACT_UNSPEC; }
int classifier_ingress(struct __sk_buff *skb) { count(13); return TC_ACT_UNSPEC; }
