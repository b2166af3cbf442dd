// Endpoint programs shaped like a CNI's per-pod datapath (Cilium's bpf_lxc): two entry points
// (from-container on the node side's ingress, to-container on its egress) and a graph of stages
// reached by tail calls through one per-endpoint prog array. Nothing here is a vendor's code;
// it has the shapes the verdict analysis meets on real nodes:
// - stages of a few thousand instructions (header parsing, unrolled policy and conntrack
//   lookups, checksum rewrites) chained by tail calls, with a drop-notification stage;
// - verdicts from constants (TC_ACT_OK / TC_ACT_SHOT), from helpers (bpf_redirect,
//   bpf_redirect_neigh after bpf_fib_lookup), from the stack (a spilled verdict reloaded) and
//   from skb->cb (set before a tail call, returned by the drop-notification stage);
// - per-endpoint constants: each endpoint's copy is this bytecode with the ENDPOINT_* magic
//   values replaced and its own prog array (see tests/endpoint_programs.py).
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/pkt_cls.h>

// Replaced in each endpoint's copy: keep them unique and never compute with them in C.
#define ENDPOINT_ID 0x7e510001
#define ENDPOINT_IDENTITY 0x7e520002
#define ENDPOINT_IPV4 0x7e530003
#define ENDPOINT_IFINDEX 0x7e540004
#define ENDPOINT_MAC_LOW 0x7e550005

#define CALL_DROP_NOTIFY 1
#define CALL_IPV4_FROM_LXC 2
#define CALL_IPV4_CT_EGRESS 3
#define CALL_IPV4_POLICY_EGRESS 4
#define CALL_IPV4_NAT_EGRESS 5
#define CALL_IPV4_FWD 6
#define CALL_ARP 7
#define CALL_IPV6_FROM_LXC 8
#define CALL_IPV4_TO_LXC 9
#define CALL_IPV4_CT_INGRESS 10
#define CALL_IPV4_POLICY_INGRESS 11
#define CALL_IPV4_NAT_INGRESS 12
#define CALL_IPV6_TO_LXC 13
#define CALL_TRACE 14
#define CALL_IPV4_LB_EGRESS 15
#define CALL_IPV4_LB_INGRESS 16
#define CALL_IPV6_POLICY_EGRESS 17
#define CALL_IPV6_POLICY_INGRESS 18
#define CALL_HOST_FW_EGRESS 19
#define CALL_HOST_FW_INGRESS 20
#define CALL_ENCAP 21

#define DROP_INVALID 130
#define DROP_POLICY 133
#define DROP_CT 135
#define DROP_UNKNOWN_L3 136
#define DROP_FIB 169
#define DROP_MISSED_TAIL_CALL 151

#define CB_DROP_REASON 0
#define CB_VERDICT 1
#define CB_SRC_IDENTITY 2
#define CB_CT_STATE 3

// BCC declares bpf_redirect_neigh with three arguments; the kernel's helper takes four.
static long (*redirect_neigh)(u32 ifindex, void *params, int plen, u64 flags) =
    (void *)BPF_FUNC_redirect_neigh;

#define POLICY_SLOTS 24
#define CT_PROBES 12
#define LB_BACKENDS 16
#define IPV6_EXT_HEADERS 8

struct ct_key {
    u32 saddr;
    u32 daddr;
    u16 sport;
    u16 dport;
    u8 proto;
    u8 dir;
    u16 pad;
};

struct ct_entry {
    u64 packets;
    u64 bytes;
    u32 flags;
    u32 rev_nat;
};

struct policy_key {
    u32 identity;
    u16 dport;
    u8 proto;
    u8 dir;
};

struct policy_entry {
    u32 deny;
    u32 proxy_port;
    u64 packets;
};

BPF_PROG_ARRAY(calls, 32);
BPF_HASH(ct4, struct ct_key, struct ct_entry, 4096);
BPF_HASH(policy, struct policy_key, struct policy_entry, 1024);
struct lb_key {
    u32 address;
    u16 port;
    u16 slot;
};

struct lb_backend {
    u32 address;
    u16 port;
    u16 flags;
};

BPF_ARRAY(metrics, u64, 512);
BPF_HASH(lb4, struct lb_key, struct lb_backend, 1024);

static __always_inline void count_metric(u32 slot)
{
    u64 *value = metrics.lookup(&slot);
    if (value)
        __sync_fetch_and_add(value, 1);
}

// Like a CNI's send_drop_notify: the reason and the verdict go in skb->cb, the notification
// stage returns the verdict; when the tail call fails the caller drops by itself.
static __always_inline int send_drop(struct __sk_buff *skb, u32 reason)
{
    skb->cb[CB_DROP_REASON] = reason;
    skb->cb[CB_VERDICT] = TC_ACT_SHOT;
    calls.call(skb, CALL_DROP_NOTIFY);
    return TC_ACT_SHOT;
}

static __always_inline int next_stage(struct __sk_buff *skb, u32 slot)
{
    calls.call(skb, slot);
    return send_drop(skb, DROP_MISSED_TAIL_CALL);
}

static __always_inline int load_ipv4(struct __sk_buff *skb, struct iphdr *ip)
{
    return bpf_skb_load_bytes(skb, ETH_HLEN, ip, sizeof(*ip));
}

// Unrolled lookups of the endpoint's policy for a few ports around the destination port: a
// large, branchy body like a policy stage's.
static __always_inline int policy_denies(u32 identity, u16 dport, u8 proto, u8 dir)
{
    int denied = 0;
#pragma unroll
    for (int i = 0; i < POLICY_SLOTS; i++) {
        struct policy_key key = {};
        key.identity = identity;
        key.dport = dport + i;
        key.proto = proto;
        key.dir = dir;
        struct policy_entry *entry = policy.lookup(&key);
        if (entry) {
            __sync_fetch_and_add(&entry->packets, 1);
            if (entry->deny)
                denied++;
            if (entry->proxy_port)
                count_metric(64 + i);
        } else {
            count_metric(96 + i);
        }
    }
    return denied;
}

static __always_inline int conntrack_state(struct iphdr *ip, u16 sport, u16 dport, u8 dir)
{
    int state = 0;
#pragma unroll
    for (int i = 0; i < CT_PROBES; i++) {
        struct ct_key key = {};
        key.saddr = ip->saddr;
        key.daddr = ip->daddr;
        key.sport = sport + i;
        key.dport = dport;
        key.proto = ip->protocol;
        key.dir = dir;
        struct ct_entry *entry = ct4.lookup(&key);
        if (entry) {
            __sync_fetch_and_add(&entry->packets, 1);
            if (entry->flags & 1)
                state |= 1 << i;
            if (entry->rev_nat)
                state |= 0x100;
        }
    }
    return state;
}

static __always_inline int ports(struct __sk_buff *skb, struct iphdr *ip, u16 *sport, u16 *dport)
{
    u16 buf[2] = {};
    if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
        return 0;
    if (bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(*ip), buf, sizeof(buf)) < 0)
        return -1;
    *sport = buf[0];
    *dport = buf[1];
    return 0;
}

// --- entry points ----------------------------------------------------------------------------

int from_container(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;

    count_metric(0);
    if (data + sizeof(*eth) > data_end)
        return send_drop(skb, DROP_INVALID);
    skb->cb[CB_SRC_IDENTITY] = ENDPOINT_IDENTITY;
    switch (eth->h_proto) {
    case htons(ETH_P_IP):
        return next_stage(skb, CALL_IPV4_FROM_LXC);
    case htons(ETH_P_IPV6):
        return next_stage(skb, CALL_IPV6_FROM_LXC);
    case htons(ETH_P_ARP):
        return next_stage(skb, CALL_ARP);
    default:
        return send_drop(skb, DROP_UNKNOWN_L3);
    }
}

int to_container(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;

    count_metric(1);
    if (data + sizeof(*eth) > data_end)
        return send_drop(skb, DROP_INVALID);
    if (skb->ifindex != ENDPOINT_IFINDEX)
        count_metric(2);
    switch (eth->h_proto) {
    case htons(ETH_P_IP):
        return next_stage(skb, CALL_IPV4_TO_LXC);
    case htons(ETH_P_IPV6):
        return next_stage(skb, CALL_IPV6_TO_LXC);
    default:
        return TC_ACT_OK;  // ARP and the rest go to the pod untouched
    }
}

// --- stages ----------------------------------------------------------------------------------

int drop_notify(struct __sk_buff *skb)
{
    u32 reason = skb->cb[CB_DROP_REASON];
    count_metric(128 + (reason & 0x7f));
    calls.call(skb, CALL_TRACE);
    return skb->cb[CB_VERDICT];  // what the dropping stage decided
}

int trace_stage(struct __sk_buff *skb)
{
    count_metric(3);
    return skb->cb[CB_VERDICT];
}

int ipv4_from_lxc(struct __sk_buff *skb)
{
    struct iphdr ip = {};
    if (load_ipv4(skb, &ip) < 0)
        return send_drop(skb, DROP_INVALID);
    if (ip.version != 4 || ip.ihl < 5)
        return send_drop(skb, DROP_INVALID);
    if (ip.saddr != ENDPOINT_IPV4)
        return send_drop(skb, DROP_POLICY);  // source address spoofing
    if (ip.ttl <= 1)
        return send_drop(skb, DROP_INVALID);
    count_metric(4);
    return next_stage(skb, CALL_IPV4_LB_EGRESS);
}

static __always_inline int ct_stage(struct __sk_buff *skb, u8 dir, u32 next)
{
    struct iphdr ip = {};
    u16 sport = 0, dport = 0;
    if (load_ipv4(skb, &ip) < 0 || ports(skb, &ip, &sport, &dport) < 0)
        return send_drop(skb, DROP_INVALID);
    int state = conntrack_state(&ip, sport, dport, dir);
    state |= conntrack_state(&ip, dport, sport, dir ^ 1) << 9;
    skb->cb[CB_CT_STATE] = state;
    if (state & 0x100)
        count_metric(5 + dir);
    return next_stage(skb, next);
}

int ipv4_ct_egress(struct __sk_buff *skb) { return ct_stage(skb, 0, CALL_IPV4_POLICY_EGRESS); }
int ipv4_ct_ingress(struct __sk_buff *skb) { return ct_stage(skb, 1, CALL_IPV4_POLICY_INGRESS); }

static __always_inline int policy_stage(struct __sk_buff *skb, u8 dir, u32 next)
{
    struct iphdr ip = {};
    u16 sport = 0, dport = 0;
    if (load_ipv4(skb, &ip) < 0 || ports(skb, &ip, &sport, &dport) < 0)
        return send_drop(skb, DROP_INVALID);
    u32 identity = dir ? skb->cb[CB_SRC_IDENTITY] : ENDPOINT_IDENTITY;
    int denied = policy_denies(identity, dport, ip.protocol, dir);
    denied += policy_denies(0, dport, ip.protocol, dir);  // the "world" identity
    if (skb->cb[CB_CT_STATE] & 1)
        denied = 0;  // established: policy was checked on the first packet
    if (denied)
        return send_drop(skb, DROP_POLICY);
    return next_stage(skb, next);
}

int ipv4_policy_egress(struct __sk_buff *skb) { return policy_stage(skb, 0, CALL_IPV4_NAT_EGRESS); }
int ipv4_policy_ingress(struct __sk_buff *skb) { return policy_stage(skb, 1, CALL_HOST_FW_INGRESS); }

static __always_inline int nat_stage(struct __sk_buff *skb, u8 dir, u32 next)
{
    struct iphdr ip = {};
    if (load_ipv4(skb, &ip) < 0)
        return send_drop(skb, DROP_INVALID);
    u32 old_addr = dir ? ip.daddr : ip.saddr;
    u32 new_addr = old_addr;
    if (skb->cb[CB_CT_STATE] & 0x100)
        new_addr = ENDPOINT_IPV4;
    if (new_addr != old_addr) {
        u32 off = ETH_HLEN + (dir ? offsetof(struct iphdr, daddr) : offsetof(struct iphdr, saddr));
        if (bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), old_addr,
                                new_addr, sizeof(new_addr)) < 0)
            return send_drop(skb, DROP_INVALID);
        if (bpf_skb_store_bytes(skb, off, &new_addr, sizeof(new_addr), 0) < 0)
            return send_drop(skb, DROP_INVALID);
    }
    if (!next)
        return TC_ACT_OK;
    return next_stage(skb, next);
}

int ipv4_nat_egress(struct __sk_buff *skb) { return nat_stage(skb, 0, CALL_IPV4_FWD); }
int ipv4_nat_ingress(struct __sk_buff *skb) { return nat_stage(skb, 1, 0); }

int ipv4_fwd(struct __sk_buff *skb)
{
    struct iphdr ip = {};
    struct bpf_fib_lookup fib = {};
    if (load_ipv4(skb, &ip) < 0)
        return send_drop(skb, DROP_INVALID);
    fib.family = 2;  // AF_INET
    fib.ipv4_src = ip.saddr;
    fib.ipv4_dst = ip.daddr;
    fib.ifindex = skb->ifindex;
    int rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
    if (rc == BPF_FIB_LKUP_RET_SUCCESS)
        return redirect_neigh(fib.ifindex, NULL, 0, 0);
    if (rc == BPF_FIB_LKUP_RET_NO_NEIGH || rc == BPF_FIB_LKUP_RET_FWD_DISABLED)
        return TC_ACT_OK;  // let the stack route it
    if (rc == BPF_FIB_LKUP_RET_NOT_FWDED)
        return next_stage(skb, CALL_ENCAP);  // another node's pod: through the tunnel
    return send_drop(skb, DROP_FIB);
}

int ipv4_to_lxc(struct __sk_buff *skb)
{
    struct iphdr ip = {};
    if (load_ipv4(skb, &ip) < 0)
        return send_drop(skb, DROP_INVALID);
    if (ip.daddr != ENDPOINT_IPV4)
        return TC_ACT_OK;  // not for this endpoint: leave it to the stack
    count_metric(7);
    return next_stage(skb, CALL_IPV4_LB_INGRESS);
}

int arp_stage(struct __sk_buff *skb)
{
    u32 target = 0;
    if (bpf_skb_load_bytes(skb, ETH_HLEN + 24, &target, sizeof(target)) < 0)
        return send_drop(skb, DROP_INVALID);
    if (target == ENDPOINT_IPV4)
        return TC_ACT_OK;
    return bpf_redirect(ENDPOINT_IFINDEX, 0);
}

// An IPv6 header chain walked header by header (unrolled), the verdict kept in a stack slot.
static __always_inline int ipv6_walk(struct __sk_buff *skb, u32 next)
{
    u8 header[2] = {};
    u32 offset = ETH_HLEN + 40;
    if (bpf_skb_load_bytes(skb, ETH_HLEN + 6, header, 1) < 0)
        return send_drop(skb, DROP_INVALID);
    volatile int verdict = TC_ACT_OK;  // spilled, then reloaded by the exit
#pragma unroll
    for (int i = 0; i < IPV6_EXT_HEADERS; i++) {
        u8 type = header[0];
        if (type != 0 && type != 43 && type != 60)
            break;  // not an extension header: the walk is over
        if (bpf_skb_load_bytes(skb, offset, header, sizeof(header)) < 0)
            return send_drop(skb, DROP_INVALID);
        offset += (header[1] + 1) * 8;
        if (type == 0)
            verdict = TC_ACT_SHOT;  // hop-by-hop options are not forwarded
        count_metric(16 + i);
    }
    if (verdict != TC_ACT_OK)
        return verdict;
    if (!next)
        return TC_ACT_OK;
    return next_stage(skb, next);
}

int ipv6_from_lxc(struct __sk_buff *skb) { return ipv6_walk(skb, CALL_IPV6_POLICY_EGRESS); }
int ipv6_to_lxc(struct __sk_buff *skb) { return ipv6_walk(skb, CALL_IPV6_POLICY_INGRESS); }

static __always_inline int ipv6_policy(struct __sk_buff *skb, u8 dir, u32 next)
{
    u16 dport = 0;
    if (bpf_skb_load_bytes(skb, ETH_HLEN + 42, &dport, sizeof(dport)) < 0)
        return send_drop(skb, DROP_INVALID);
    u32 identity = dir ? skb->cb[CB_SRC_IDENTITY] : ENDPOINT_IDENTITY;
    if (policy_denies(identity, dport, IPPROTO_TCP, dir | 2))
        return send_drop(skb, DROP_POLICY);
    if (!next)
        return TC_ACT_OK;
    return next_stage(skb, next);
}

int ipv6_policy_egress(struct __sk_buff *skb) { return ipv6_policy(skb, 0, CALL_HOST_FW_EGRESS); }
int ipv6_policy_ingress(struct __sk_buff *skb) { return ipv6_policy(skb, 1, 0); }

// A service lookup: every backend slot of the destination service, unrolled.
static __always_inline int lb_stage(struct __sk_buff *skb, u8 dir, u32 next)
{
    struct iphdr ip = {};
    u16 sport = 0, dport = 0;
    if (load_ipv4(skb, &ip) < 0 || ports(skb, &ip, &sport, &dport) < 0)
        return send_drop(skb, DROP_INVALID);
    u32 chosen = 0;
#pragma unroll
    for (int i = 0; i < LB_BACKENDS; i++) {
        struct lb_key key = {};
        key.address = dir ? ip.saddr : ip.daddr;
        key.port = dir ? sport : dport;
        key.slot = i;
        struct lb_backend *backend = lb4.lookup(&key);
        if (backend && !chosen && !(backend->flags & 1))
            chosen = backend->address;
    }
    if (chosen) {
        u32 off = ETH_HLEN + offsetof(struct iphdr, daddr);
        if (bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), ip.daddr, chosen,
                                sizeof(chosen)) < 0)
            return send_drop(skb, DROP_INVALID);
        if (bpf_skb_store_bytes(skb, off, &chosen, sizeof(chosen), 0) < 0)
            return send_drop(skb, DROP_INVALID);
    }
    return next_stage(skb, next);
}

int ipv4_lb_egress(struct __sk_buff *skb) { return lb_stage(skb, 0, CALL_IPV4_CT_EGRESS); }
int ipv4_lb_ingress(struct __sk_buff *skb) { return lb_stage(skb, 1, CALL_IPV4_CT_INGRESS); }

// The host firewall: the node's own policy for the endpoint's traffic.
static __always_inline int host_fw(struct __sk_buff *skb, u8 dir, u32 next)
{
    struct iphdr ip = {};
    u16 sport = 0, dport = 0;
    if (load_ipv4(skb, &ip) < 0 || ports(skb, &ip, &sport, &dport) < 0)
        return TC_ACT_OK;  // IPv6 or short: the host firewall only knows IPv4 here
    if (policy_denies(1, dport, ip.protocol, dir | 4))
        return send_drop(skb, DROP_POLICY);
    if (!next)
        return TC_ACT_OK;
    return next_stage(skb, next);
}

int host_fw_egress(struct __sk_buff *skb) { return host_fw(skb, 0, 0); }
int host_fw_ingress(struct __sk_buff *skb) { return host_fw(skb, 1, CALL_IPV4_NAT_INGRESS); }

// Tunnel to another node: an outer header written field by field, then out of the tunnel device.
int encap_stage(struct __sk_buff *skb)
{
    u32 fields[8] = {};
#pragma unroll
    for (int i = 0; i < 8; i++) {
        fields[i] = ENDPOINT_ID + 0 * i;
        if (bpf_skb_store_bytes(skb, ETH_HLEN + 4 * i, &fields[i], 4, 0) < 0)
            return send_drop(skb, DROP_INVALID);
    }
    return bpf_redirect(ENDPOINT_IFINDEX, 0);
}
