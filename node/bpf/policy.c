// SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0-only)
//
// Caracal's BPF policy data plane: TC programs on every pod's host-side veth.
//
// - `from_pod` runs on the host side's TC ingress: packets the pod sends (its egress policy).
// - `to_pod` runs on the host side's TC egress: packets to the pod (its ingress policy).
//
// Both look the interface up in the endpoint map first: an interface the agent has not programmed yet has no
// entry and drops everything (fail closed). A packet of a flow the connection tracker knows is passed at once;
// only a flow's first packet is evaluated, against the policy table the endpoint entry names for the direction.
//
// Policy is data (docs/bpf.md, "Policy as data"): an endpoint's tiers, flattened into one first-match list of
// entries, are compiled by the agent into per-field lookups, each giving the bitmap of the entries that accept
// the packet's value of that field. The program ANDs the bitmaps of the fields the entries constrain and takes
// the first set bit: Allow, Deny, or Pass (go on from the entry the pass map names). Bitmaps come in chunks of
// CHUNK_BITS entries; a table is immutable once written, and an edit writes a new table and then flips the
// endpoint entry to it, so a new flow sees the old policy or the new one, never a mix.
//
// Every map is pinned by name under /sys/fs/bpf/caracal/ (the loader sets the path); names carry a layout
// version (`_v2`), because a pinned map is reused as it is found.
//
// The programs read only the UAPI `__sk_buff` context and packet bytes, a stable ABI, so they need no CO-RE
// relocations and build against the kernel's UAPI headers; they are compiled with BTF (-g) for the loader.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define CHUNK_WORDS 64
#define CHUNK_BITS (CHUNK_WORDS * 64)
#define MAX_CHUNKS 8
// Chunks visited plus passes taken in one evaluation; beyond it the packet is dropped (fail closed).
#define MAX_STEPS 24

struct bits {
	__u64 w[CHUNK_WORDS];
};

// What the agent programmed for one interface (key: its ifindex).
struct endpoint {
	__u32 flags;
	__u32 table[2]; // [0]: what the pod sends (egress policy); [1]: what it receives (ingress policy)
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} caracal_ep_v2 SEC(".maps");

// Field bits: which lookups a chunk's entries need (a field none of them constrains is not looked up).
#define F_PROTO 1
#define F_ICMP 2
#define F_SADDR 4
#define F_DADDR 8
#define F_SPORT 16
#define F_DPORT 32
#define F_SERVICE 64

// A compiled table (key: its id).
struct table {
	__u32 entries;
	__u32 chunks;
	__u64 hash; // the agent's content hash, to recognise the table after a restart
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct table);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} caracal_table_v2 SEC(".maps");

struct chunk_key {
	__u32 table;
	__u32 chunk;
};

// Per chunk: the fields its entries constrain (F_*), which entries allow and which pass (the rest deny).
struct actions {
	__u32 fields;
	__u32 pad;
	struct bits allow;
	struct bits pass;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct chunk_key);
	__type(value, struct actions);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} caracal_actions_v2 SEC(".maps");

// A Pass entry's target: the entry evaluation continues from (the next tier's first).
struct pass_key {
	__u32 table;
	__u32 entry;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct pass_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} caracal_pass_v2 SEC(".maps");

// Exact-match fields.
#define K_PROTO 1         // a: IP version, b: protocol (or OTHER)
#define K_ICMP 2          // a: type (or OTHER, or NOT_ICMP), b: code (or OTHER: a code no entry names)
#define K_PORTLESS 3      // side: entries that accept a packet without ports on that side
#define K_NAMED 4         // side: side << 1 | not; addr, proto, a: port
#define K_SERVICE 5       // addr, proto, a: port of a destination `services` match
#define K_SERVICE_OTHER 6 // entries accepting a destination no `services` match names
#define OTHER 256
#define NOT_ICMP 257

struct match_key {
	__u32 table;
	__u8 chunk;
	__u8 kind;
	__u8 proto;
	__u8 side;
	__u16 a;
	__u16 b;
	__u8 addr[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1048576);
	__type(key, struct match_key);
	__type(value, struct bits);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} caracal_match_v2 SEC(".maps");

// Address regions, by longest match: tcs = table << 8 | chunk << 1 | side; IPv4 as ::ffff:a.b.c.d.
struct addr_key {
	__u32 prefixlen;
	__u32 tcs;
	__u8 addr[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1048576);
	__type(key, struct addr_key);
	__type(value, struct bits);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} caracal_addrs_v2 SEC(".maps");

// Port intervals as prefixes of the 16-bit port (network order): tcs = table << 8 | chunk << 2 | side << 1 |
// not, `not` = the entries whose `notPorts` hold the port.
struct port_key {
	__u32 prefixlen;
	__u32 tcs;
	__u8 port[2];
	__u8 pad[2];
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1048576);
	__type(key, struct port_key);
	__type(value, struct bits);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} caracal_ports_v2 SEC(".maps");

// Per CPU: the running AND of a chunk's field bitmaps, one side's port bitmap being assembled, and what the
// scan of `acc` found. (The scan's result goes through here rather than registers: read back from a map, it
// is not a constant per loop exit, so the verifier checks what follows once instead of once per word.)
struct scratch {
	struct bits acc;
	struct bits port;
	__u64 hit;       // the first matching word, masked; 0: none in the chunk
	__u64 hit_allow; // that word of the allow bitmap
	__u64 hit_pass;  // of the pass bitmap
	__u32 hit_word;
	__u32 start;   // the walk's first entry still to consider
	__u32 matched; // the chunk whose field bitmaps `acc` holds (MAX_CHUNKS: none)
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} caracal_scratch SEC(".maps");

// A flow as first seen, by the endpoint whose policy allowed it: the same packet crossing two local
// endpoints (pod to pod on one node) is allowed by each one's policy on its own (one's egress, the other's
// ingress), so each keeps an entry. Addresses as in addr_key; ICMP echo keeps its identifier in both ports.
struct ct_key {
	__u32 ifindex;
	__u8 src[16];
	__u8 dst[16];
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct ct_value {
	__u64 last_seen_ns;
	__u32 table; // the policy table it was allowed by (0: traffic of the host, which policy does not cover)
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} caracal_ct_v2 SEC(".maps");

// Idle flows are forgotten as the kernel's connection tracker forgets them (its default timeouts for
// established TCP, UDP streams and ICMP), so a flow idle longer is evaluated again like a new one.
#define CT_TCP_NS (5ULL * 24 * 3600 * 1000000000ULL)
#define CT_UDP_NS (120ULL * 1000000000ULL)
#define CT_OTHER_NS (30ULL * 1000000000ULL)

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
} caracal_counters_v2 SEC(".maps");

static __always_inline void count(__u32 ifindex, int to_pod, int allowed)
{
	__u32 key = ifindex << 1 | (to_pod ? 1 : 0);
	struct counters *c = bpf_map_lookup_elem(&caracal_counters_v2, &key);
	if (!c) {
		struct counters zero = {};
		bpf_map_update_elem(&caracal_counters_v2, &key, &zero, BPF_NOEXIST);
		c = bpf_map_lookup_elem(&caracal_counters_v2, &key);
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

// The first bytes of an ICMP or ICMPv6 header (<linux/icmp.h> pulls in libc headers).
struct icmp_head {
	__u8 type;
	__u8 code;
	__u16 checksum;
	__u16 echo_id; // echo request and reply only
	__u16 echo_seq;
};

#define ICMP_ECHOREPLY 0
#define ICMP_ECHO 8
#define ICMPV6_ECHO_REQUEST 128
#define ICMPV6_ECHO_REPLY 129

// An ICMP or ICMPv6 echo request or reply: the tracker keys it by its identifier.
static __always_inline int icmp_echo(__u8 version, __u8 type)
{
	if (version == 4)
		return type == ICMP_ECHO || type == ICMP_ECHOREPLY;
	return type == ICMPV6_ECHO_REQUEST || type == ICMPV6_ECHO_REPLY;
}

// An IPv4 address as the maps key it: mapped into IPv6 (::ffff:a.b.c.d); `out` starts zeroed.
static __always_inline void v4_mapped(__u8 *out, const __be32 *addr)
{
	out[10] = 0xff;
	out[11] = 0xff;
	__builtin_memcpy(&out[12], addr, 4);
}

// ICMP errors quote the packet they are about (its IP header and first 8 bytes), as the kernel's tracker
// reads them: destination unreachable (fragmentation needed among them), source quench, redirect, time
// exceeded, parameter problem; ICMPv6 destination unreachable, packet too big, time exceeded, parameter
// problem.
static __always_inline int icmp_error(__u8 version, __u8 type)
{
	if (version == 4)
		return type == 3 || type == 4 || type == 5 || type == 11 || type == 12;
	return type >= 1 && type <= 4;
}

// What policy looks at in a packet.
struct pkt {
	__u8 src[16];
	__u8 dst[16];
	__u16 sport; // host order
	__u16 dport;
	__u8 version;
	__u8 proto;
	__u8 has_ports;
	__u8 is_icmp;
	__u8 icmp_type;
	__u8 icmp_code;
	__u16 echo_id;
};

static __always_inline void and_into(struct bits *acc, const struct bits *b)
{
	for (int i = 0; i < CHUNK_WORDS; i++)
		acc->w[i] &= b->w[i];
}

static __always_inline int first_bit(__u64 x)
{
	int n = 0;
	if (!(x & 0xffffffffULL)) {
		n += 32;
		x >>= 32;
	}
	if (!(x & 0xffffULL)) {
		n += 16;
		x >>= 16;
	}
	if (!(x & 0xffULL)) {
		n += 8;
		x >>= 8;
	}
	if (!(x & 0xfULL)) {
		n += 4;
		x >>= 4;
	}
	if (!(x & 0x3ULL)) {
		n += 2;
		x >>= 2;
	}
	if (!(x & 0x1ULL))
		n += 1;
	return n;
}

// ANDs one side's port condition into s->acc: (ranges | named) & ~(not ranges | not named). Returns 0 when a
// lookup the compiler guaranteed is missing (the packet is then dropped).
static __always_inline int port_side(struct scratch *s, __u32 table, __u32 chunk, int side, const struct pkt *p)
{
	struct match_key mk = {.table = table, .chunk = chunk, .side = side};
	if (!p->has_ports) {
		mk.kind = K_PORTLESS;
		struct bits *b = bpf_map_lookup_elem(&caracal_match_v2, &mk);
		if (!b)
			return 0;
		and_into(&s->acc, b);
		return 1;
	}
	__u16 port = side ? p->dport : p->sport;
	struct port_key pk = {
		.prefixlen = 32 + 16,
		.tcs = table << 8 | chunk << 2 | side << 1,
		.port = {port >> 8, port & 0xff},
	};
	struct bits *ok = bpf_map_lookup_elem(&caracal_ports_v2, &pk);
	if (!ok)
		return 0;
	for (int i = 0; i < CHUNK_WORDS; i++)
		s->port.w[i] = ok->w[i];
	mk.kind = K_NAMED;
	mk.proto = p->proto;
	mk.a = port;
	// Named ports: keyed by the packet's address on this side, and address-less (all zero) on the side the
	// endpoint itself is on, where the table holds only the endpoint's own ports (only that side has such keys).
	struct match_key own = mk;
	__builtin_memcpy(mk.addr, side ? p->dst : p->src, 16);
	mk.side = side << 1;
	own.side = side << 1;
	struct bits *named = bpf_map_lookup_elem(&caracal_match_v2, &mk);
	if (named)
		for (int i = 0; i < CHUNK_WORDS; i++)
			s->port.w[i] |= named->w[i];
	named = bpf_map_lookup_elem(&caracal_match_v2, &own);
	if (named)
		for (int i = 0; i < CHUNK_WORDS; i++)
			s->port.w[i] |= named->w[i];
	pk.tcs |= 1;
	struct bits *not = bpf_map_lookup_elem(&caracal_ports_v2, &pk);
	if (not)
		for (int i = 0; i < CHUNK_WORDS; i++)
			s->port.w[i] &= ~not->w[i];
	mk.side = side << 1 | 1;
	own.side = side << 1 | 1;
	struct bits *not_named = bpf_map_lookup_elem(&caracal_match_v2, &mk);
	if (not_named)
		for (int i = 0; i < CHUNK_WORDS; i++)
			s->port.w[i] &= ~not_named->w[i];
	not_named = bpf_map_lookup_elem(&caracal_match_v2, &own);
	if (not_named)
		for (int i = 0; i < CHUNK_WORDS; i++)
			s->port.w[i] &= ~not_named->w[i];
	and_into(&s->acc, &s->port);
	return 1;
}

// ANDs into s->acc the bitmaps of every field `fields` names. Returns 0 when a lookup the compiler
// guaranteed is missing. (A global function: the verifier checks it once, on its own, whatever the path that
// calls it.)
__noinline int match_chunk(struct scratch *s, __u32 table, __u32 chunk, __u32 fields, const struct pkt *p)
{
	if (!s || !p)
		return 0;
	for (int i = 0; i < CHUNK_WORDS; i++)
		s->acc.w[i] = ~0ULL;
	struct match_key mk = {.table = table, .chunk = chunk};
	struct bits *b;
	if (fields & F_PROTO) {
		mk.kind = K_PROTO;
		mk.a = p->version;
		mk.b = p->proto;
		b = bpf_map_lookup_elem(&caracal_match_v2, &mk);
		if (!b) {
			mk.b = OTHER;
			b = bpf_map_lookup_elem(&caracal_match_v2, &mk);
		}
		if (!b)
			return 0;
		and_into(&s->acc, b);
		mk.b = 0;
	}
	if (fields & F_ICMP) {
		mk.kind = K_ICMP;
		if (p->is_icmp) {
			mk.a = p->icmp_type;
			mk.b = p->icmp_code;
			b = bpf_map_lookup_elem(&caracal_match_v2, &mk);
			if (!b) {
				mk.b = OTHER;
				b = bpf_map_lookup_elem(&caracal_match_v2, &mk);
			}
			if (!b) {
				mk.a = OTHER;
				b = bpf_map_lookup_elem(&caracal_match_v2, &mk);
			}
		} else {
			mk.a = NOT_ICMP;
			mk.b = 0;
			b = bpf_map_lookup_elem(&caracal_match_v2, &mk);
		}
		if (!b)
			return 0;
		and_into(&s->acc, b);
	}
	for (int side = 0; side < 2; side++) {
		if (!(fields & (side ? F_DADDR : F_SADDR)))
			continue;
		struct addr_key ak = {
			.prefixlen = 32 + 128,
			.tcs = table << 8 | chunk << 1 | side,
		};
		__builtin_memcpy(ak.addr, side ? p->dst : p->src, 16);
		b = bpf_map_lookup_elem(&caracal_addrs_v2, &ak);
		if (!b)
			return 0;
		and_into(&s->acc, b);
	}
	if ((fields & F_SPORT) && !port_side(s, table, chunk, 0, p))
		return 0;
	if ((fields & F_DPORT) && !port_side(s, table, chunk, 1, p))
		return 0;
	if (fields & F_SERVICE) {
		struct match_key sk = {.table = table, .chunk = chunk, .kind = K_SERVICE_OTHER};
		b = 0;
		if (p->has_ports) {
			sk.kind = K_SERVICE;
			sk.proto = p->proto;
			sk.a = p->dport;
			__builtin_memcpy(sk.addr, p->dst, 16);
			b = bpf_map_lookup_elem(&caracal_match_v2, &sk);
			sk.kind = K_SERVICE_OTHER;
			sk.proto = 0;
			sk.a = 0;
			__builtin_memset(sk.addr, 0, 16);
		}
		if (!b)
			b = bpf_map_lookup_elem(&caracal_match_v2, &sk);
		if (!b)
			return 0;
		and_into(&s->acc, b);
	}
	return 1;
}

// One evaluation in progress (bpf_loop's context: the verifier checks a step once, not once per iteration).
// Its position is kept in the scratch map, not here: on the stack it would be a known constant per
// iteration, which the verifier would follow through every iteration instead of checking one step.
struct walk {
	struct pkt p;
	__u32 table;
	__u32 chunks;
	int allowed;
};

// Finds the first word of s->acc with a bit at or after `from` and records it (s->hit and the actions' words
// beside it; s->hit is 0 when there is none). A global function, checked once.
__noinline int scan(struct scratch *s, const struct actions *a, __u32 from)
{
	if (!s || !a)
		return 0;
	int w0 = from / 64;
	s->hit = 0;
	for (int w = 0; w < CHUNK_WORDS; w++) {
		if (w < w0)
			continue;
		__u64 x = s->acc.w[w];
		if (w == w0)
			x &= ~0ULL << (from % 64);
		if (x) {
			s->hit = x;
			s->hit_word = w;
			s->hit_allow = a->allow.w[w];
			s->hit_pass = a->pass.w[w];
			break;
		}
	}
	return 0;
}

// One step: the first entry at or after `start` that matches, then its action. Returns 1 when decided.
static long step(__u64 index, void *ctx)
{
	struct walk *k = ctx;
	__u32 zero = 0;
	struct scratch *s = bpf_map_lookup_elem(&caracal_scratch, &zero);
	if (!s)
		return 1;
	__u32 chunk = s->start / CHUNK_BITS;
	if (chunk >= k->chunks || chunk >= MAX_CHUNKS)
		return 1; // ran off the end (the final Allow matches everything: a broken table): deny
	struct chunk_key ck = {.table = k->table, .chunk = chunk};
	struct actions *a = bpf_map_lookup_elem(&caracal_actions_v2, &ck);
	if (!a)
		return 1;
	if (chunk != s->matched) {
		if (!match_chunk(s, k->table, chunk, a->fields, &k->p))
			return 1;
		s->matched = chunk;
	}
	scan(s, a, s->start % CHUNK_BITS);
	__u64 x = s->hit;
	if (!x) {
		s->start = (chunk + 1) * CHUNK_BITS;
		return 0;
	}
	__u64 bit = x & -x;
	if (s->hit_allow & bit) {
		k->allowed = 1;
		return 1;
	}
	if (!(s->hit_pass & bit))
		return 1;
	struct pass_key pk = {.table = k->table, .entry = chunk * CHUNK_BITS + s->hit_word * 64 + first_bit(x)};
	__u32 *to = bpf_map_lookup_elem(&caracal_pass_v2, &pk);
	if (!to || *to <= pk.entry)
		return 1;
	s->start = *to;
	return 0;
}

// The verdict of table `table_id` for packet `p`: 1 allow, 0 deny. Anything missing denies.
static __always_inline int decide(__u32 table_id, const struct pkt *p)
{
	struct table *t = bpf_map_lookup_elem(&caracal_table_v2, &table_id);
	if (!t)
		return 0;
	__u32 zero = 0;
	struct scratch *s = bpf_map_lookup_elem(&caracal_scratch, &zero);
	if (!s)
		return 0;
	s->start = 0;
	s->matched = MAX_CHUNKS;
	struct walk k = {
		.table = table_id,
		.chunks = t->chunks,
	};
	__builtin_memcpy(&k.p, p, sizeof(k.p));
	bpf_loop(MAX_STEPS, step, &k, 0);
	return k.allowed;
}

// Reads the packet an ICMP error quotes, `off` bytes into the packet, into `q` as the tracker keys it.
// Returns 1 when it is a flow the tracker keys (TCP, UDP, SCTP, an ICMP echo), else 0. A global function:
// verified once, with a stack frame of its own rather than in the programs' (the verifier allows 512 bytes
// across a chain of calls).
__noinline int parse_quoted(struct __sk_buff *skb, __u32 off, __u32 version, struct ct_key *q)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	if (!q)
		return 0;
	// The quote starts right after the ICMP header, within the first 128 bytes; masked, the verifier knows it.
	void *inner = data + (off & 0x7f);
	void *l4;
	if (version == 4) {
		struct iphdr *ip = inner;
		if ((void *)(ip + 1) > data_end || ip->ihl < 5)
			return 0;
		q->proto = ip->protocol;
		v4_mapped(q->src, &ip->saddr);
		v4_mapped(q->dst, &ip->daddr);
		l4 = inner + ip->ihl * 4;
	} else {
		struct ipv6hdr *ip6 = inner;
		if ((void *)(ip6 + 1) > data_end)
			return 0;
		q->proto = ip6->nexthdr;
		__builtin_memcpy(q->src, &ip6->saddr, 16);
		__builtin_memcpy(q->dst, &ip6->daddr, 16);
		l4 = ip6 + 1;
	}
	if (q->proto == IPPROTO_TCP || q->proto == IPPROTO_UDP || q->proto == IPPROTO_SCTP) {
		struct udphdr *ports = l4;
		if ((void *)(ports + 1) > data_end)
			return 0;
		q->sport = bpf_ntohs(ports->source);
		q->dport = bpf_ntohs(ports->dest);
		return 1;
	}
	if ((version == 4 && q->proto == IPPROTO_ICMP) || (version == 6 && q->proto == IPPROTO_ICMPV6)) {
		struct icmp_head *icmp = l4;
		if ((void *)(icmp + 1) > data_end)
			return 0;
		if (icmp_echo(version, icmp->type)) {
			q->sport = icmp->echo_id;
			q->dport = icmp->echo_id;
			return 1;
		}
	}
	return 0;
}

// Parses the packet into `p`, and for an ICMP error the flow it quotes into `q`, flagged by q->pad[0] (the
// programs' one flow key on the stack serves for both: see handle). Returns 0 for what is not IP or is
// truncated; 2 for neighbour discovery (ARP, ICMPv6 router and neighbour messages), which is not policy.
static __always_inline int parse(struct __sk_buff *skb, struct pkt *p, struct ct_key *q)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return 0;
	void *l4;
	if (eth->h_proto == bpf_htons(ETH_P_ARP))
		return 2;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > data_end || ip->ihl < 5)
			return 0;
		p->version = 4;
		p->proto = ip->protocol;
		v4_mapped(p->src, &ip->saddr);
		v4_mapped(p->dst, &ip->daddr);
		// A fragment after the first has no L4 header: policy sees it without ports.
		if (ip->frag_off & bpf_htons(0x1fff))
			return 1;
		l4 = (void *)ip + ip->ihl * 4;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end)
			return 0;
		p->version = 6;
		p->proto = ip6->nexthdr;
		__builtin_memcpy(p->src, &ip6->saddr, 16);
		__builtin_memcpy(p->dst, &ip6->daddr, 16);
		l4 = ip6 + 1;
	} else {
		return 0;
	}
	if (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP || p->proto == IPPROTO_SCTP) {
		// All three headers start with the two ports.
		struct udphdr *ports = l4;
		if ((void *)(ports + 1) > data_end)
			return 0;
		p->has_ports = 1;
		p->sport = bpf_ntohs(ports->source);
		p->dport = bpf_ntohs(ports->dest);
	} else if ((p->version == 4 && p->proto == IPPROTO_ICMP) || (p->version == 6 && p->proto == IPPROTO_ICMPV6)) {
		struct icmp_head *icmp = l4;
		if ((void *)(icmp + 1) > data_end)
			return 0;
		p->is_icmp = 1;
		p->icmp_type = icmp->type;
		p->icmp_code = icmp->code;
		if (p->version == 6 && icmp->type >= 133 && icmp->type <= 137)
			return 2;
		if (icmp_echo(p->version, icmp->type))
			p->echo_id = icmp->echo_id;
		if (icmp_error(p->version, icmp->type))
			q->pad[0] = parse_quoted(skb, (__u32)((void *)(icmp + 1) - data), p->version, q);
	}
	return 1;
}

static __always_inline __u64 idle_limit(__u8 proto)
{
	if (proto == IPPROTO_TCP)
		return CT_TCP_NS;
	if (proto == IPPROTO_UDP)
		return CT_UDP_NS;
	return CT_OTHER_NS;
}

// Whether `p`, sent by the pod, is addressed to the host itself: the host's own traffic with its pods is
// outside pod policy, as in the iptables backend, whose policy is in the forward path only.
static __always_inline int to_host(struct __sk_buff *skb, const struct pkt *p)
{
	struct bpf_fib_lookup fib = {};
	fib.ifindex = skb->ifindex;
	fib.l4_protocol = p->proto;
	fib.sport = bpf_htons(p->sport);
	fib.dport = bpf_htons(p->dport);
	if (p->version == 4) {
		fib.family = 2; // AF_INET
		__builtin_memcpy(&fib.ipv4_src, &p->src[12], 4);
		__builtin_memcpy(&fib.ipv4_dst, &p->dst[12], 4);
	} else {
		fib.family = 10; // AF_INET6
		__builtin_memcpy(fib.ipv6_src, p->src, 16);
		__builtin_memcpy(fib.ipv6_dst, p->dst, 16);
	}
	return bpf_fib_lookup(skb, &fib, sizeof(fib), 0) == BPF_FIB_LKUP_RET_NOT_FWDED;
}

// Turns a flow key round (the reply direction), in place: no second key on the stack, which the verifier
// limits to 512 bytes across the calls.
static __always_inline void ct_reverse(struct ct_key *k)
{
	__u32 *s = (__u32 *)k->src;
	__u32 *d = (__u32 *)k->dst;
#pragma unroll
	for (int i = 0; i < 4; i++) {
		__u32 t = s[i];
		s[i] = d[i];
		d[i] = t;
	}
	__u16 t = k->sport;
	k->sport = k->dport;
	k->dport = t;
}

// The tracker's entry for `k`'s flow, either way round; `k` is as it was on return.
static __always_inline struct ct_value *ct_lookup(struct ct_key *k)
{
	struct ct_value *ct = bpf_map_lookup_elem(&caracal_ct_v2, k);
	if (!ct) {
		ct_reverse(k);
		ct = bpf_map_lookup_elem(&caracal_ct_v2, k);
		ct_reverse(k);
	}
	return ct;
}

static __always_inline int handle(struct __sk_buff *skb, int to_pod)
{
	__u32 ifindex = skb->ifindex;
	struct endpoint *ep = bpf_map_lookup_elem(&caracal_ep_v2, &ifindex);
	if (!ep)
		return verdict(ifindex, to_pod, 0); // not programmed yet: fail closed

	struct pkt p = {};
	// First the flow an ICMP error quotes, if any; then the packet's own.
	struct ct_key key = {.ifindex = ifindex};
	int parsed = parse(skb, &p, &key);
	if (parsed == 2)
		return TC_ACT_OK;
	if (!parsed)
		return verdict(ifindex, to_pod, 0);
	__u64 now = bpf_ktime_get_ns();
	struct ct_value *ct;
	// An ICMP error about a flow this endpoint's policy allowed passes (RELATED, as the iptables backend
	// accepts it): the quoted packet is one of the flow's, either way round. An error about no known flow is
	// dropped, as the kernel's tracker calls it INVALID and the iptables backend drops that before policy.
	if (key.pad[0]) {
		key.pad[0] = 0;
		ct = ct_lookup(&key);
		return verdict(ifindex, to_pod, ct && now - ct->last_seen_ns < idle_limit(key.proto));
	}
	key.sport = p.has_ports ? p.sport : p.echo_id;
	key.dport = p.has_ports ? p.dport : p.echo_id;
	key.proto = p.proto;
	__builtin_memcpy(key.src, p.src, 16);
	__builtin_memcpy(key.dst, p.dst, 16);
	// A packet of a known flow, either way round.
	ct = ct_lookup(&key);
	if (ct && now - ct->last_seen_ns < idle_limit(p.proto)) {
		ct->last_seen_ns = now;
		return verdict(ifindex, to_pod, 1);
	}

	// A new flow: the host's own, or evaluated against the endpoint's policy for the direction.
	__u32 table = 0;
	int allowed;
	if (to_pod ? skb->ingress_ifindex == 0 : to_host(skb, &p)) {
		allowed = 1;
	} else {
		table = ep->table[to_pod ? 1 : 0];
		allowed = decide(table, &p);
	}
	if (allowed) {
		struct ct_value v = {
			.last_seen_ns = now,
			.table = table,
		};
		bpf_map_update_elem(&caracal_ct_v2, &key, &v, BPF_ANY);
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
