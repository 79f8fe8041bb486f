// SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0-only)
//
// Caracal's BPF policy data plane: TC programs on every pod's host-side veth.
//
// - `from_pod` runs on the host side's TC ingress: packets the pod sends (its egress policy).
// - `to_pod` runs on the host side's TC egress: packets to the pod (its ingress policy).
//
// Both look the interface up in the endpoint map first: an interface the agent has not programmed yet has no
// entry and drops everything (fail closed). A packet of a flow the connection tracker knows is passed at once;
// only a flow's first packet is evaluated, against the policy generation the endpoint entry names.
//
// Every map is pinned by name under /sys/fs/bpf/caracal/ (the loader sets the path); names carry a layout
// version (`_v1`), because a pinned map is reused as it is found.
//
// The programs read only the UAPI `__sk_buff` context and packet bytes, a stable ABI, so they need no CO-RE
// relocations and build against the kernel's UAPI headers; they are compiled with BTF (-g) for the loader.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

// What the agent programmed for one interface (key: its ifindex).
struct endpoint {
	__u32 flags;      // EP_*
	__u32 generation; // the policy generation new flows are evaluated against
};

// Verdicts for new flows until the policy tables exist (EP_ALLOW_*), per direction.
#define EP_ALLOW_FROM 1 // new flows the pod starts are allowed
#define EP_ALLOW_TO 2   // new flows toward the pod are allowed

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} caracal_ep_v1 SEC(".maps");

// A flow as first seen, IPv4, by the endpoint whose policy allowed it: the same packet crossing two local
// endpoints (pod to pod on one node) is allowed by each one's policy on its own (one's egress, the other's
// ingress), so each keeps an entry.
struct ct_key {
	__u32 ifindex;
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct ct_value {
	__u64 last_seen_ns;
	__u32 generation; // the policy generation it was allowed under
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} caracal_ct_v1 SEC(".maps");

// Per endpoint and direction: packets allowed and dropped (key: ifindex << 1 | to_pod).
struct counters {
	__u64 allowed;
	__u64 dropped;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 131072);
	__type(key, __u32);
	__type(value, struct counters);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} caracal_counters_v1 SEC(".maps");

static __always_inline void count(__u32 ifindex, int to_pod, int allowed)
{
	__u32 key = ifindex << 1 | (to_pod ? 1 : 0);
	struct counters *c = bpf_map_lookup_elem(&caracal_counters_v1, &key);
	if (!c) {
		struct counters zero = {};
		bpf_map_update_elem(&caracal_counters_v1, &key, &zero, BPF_NOEXIST);
		c = bpf_map_lookup_elem(&caracal_counters_v1, &key);
		if (!c)
			return;
	}
	if (allowed)
		c->allowed++;
	else
		c->dropped++;
}

static __always_inline int verdict(__u32 ifindex, int to_pod, int allowed)
{
	count(ifindex, to_pod, allowed);
	return allowed ? TC_ACT_OK : TC_ACT_SHOT;
}

static __always_inline int handle(struct __sk_buff *skb, int to_pod)
{
	__u32 ifindex = skb->ifindex;
	struct endpoint *ep = bpf_map_lookup_elem(&caracal_ep_v1, &ifindex);
	if (!ep)
		return verdict(ifindex, to_pod, 0); // not programmed yet: fail closed

	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return verdict(ifindex, to_pod, 0);
	if (eth->h_proto == bpf_htons(ETH_P_ARP))
		return TC_ACT_OK; // neighbour resolution is not policy
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return verdict(ifindex, to_pod, 0); // IPv6 arrives with the policy tables
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end || ip->ihl < 5)
		return verdict(ifindex, to_pod, 0);

	struct ct_key key = {
		.ifindex = ifindex,
		.saddr = ip->saddr,
		.daddr = ip->daddr,
		.proto = ip->protocol,
	};
	void *l4 = (void *)ip + ip->ihl * 4;
	if (ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP) {
		// Both headers start with the two ports.
		struct udphdr *ports = l4;
		if ((void *)(ports + 1) > data_end)
			return verdict(ifindex, to_pod, 0);
		key.sport = ports->source;
		key.dport = ports->dest;
	}

	__u64 now = bpf_ktime_get_ns();
	// A packet of a known flow, either way round.
	struct ct_value *ct = bpf_map_lookup_elem(&caracal_ct_v1, &key);
	if (!ct) {
		struct ct_key reply = {
			.ifindex = ifindex,
			.saddr = key.daddr,
			.daddr = key.saddr,
			.sport = key.dport,
			.dport = key.sport,
			.proto = key.proto,
		};
		ct = bpf_map_lookup_elem(&caracal_ct_v1, &reply);
	}
	if (ct) {
		ct->last_seen_ns = now;
		return verdict(ifindex, to_pod, 1);
	}

	// A new flow: evaluated against the endpoint's policy.
	int allowed = (ep->flags & (to_pod ? EP_ALLOW_TO : EP_ALLOW_FROM)) != 0;
	if (allowed) {
		struct ct_value v = {
			.last_seen_ns = now,
			.generation = ep->generation,
		};
		bpf_map_update_elem(&caracal_ct_v1, &key, &v, BPF_ANY);
	}
	return verdict(ifindex, to_pod, allowed);
}

SEC("classifier/from_pod")
int from_pod(struct __sk_buff *skb)
{
	return handle(skb, 0);
}

SEC("classifier/to_pod")
int to_pod(struct __sk_buff *skb)
{
	return handle(skb, 1);
}
