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

#ifndef offsetof
#define offsetof(type, field) __builtin_offsetof(type, field)
#endif

#define CHUNK_WORDS 64
#define CHUNK_BITS (CHUNK_WORDS * 64)
#define MAX_CHUNKS 8
// Chunks visited plus passes taken in one evaluation; beyond it the packet is dropped (fail closed).
#define MAX_STEPS 24

struct bits {
	__u64 w[CHUNK_WORDS];
};

// What the agent programmed for one interface (key: its ifindex).
#define EP_HOST_DROP 1 // what the pod sends its own host is dropped after its egress policy
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
	__u8 syn; // a TCP SYN without ACK: a connection being opened
	__u8 tcp_flags; // TCP: the header's flags byte (TCP_*); 0 for other protocols
};

// TCP flags (the 13th byte of the header).
#define TCP_FIN 0x01
#define TCP_RST 0x04

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
	struct pkt p; // the packet being evaluated (here rather than on the programs' stack, which is short)
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

// A flow a Service translates has two entries (docs/bpf.md, "Services"): NAT_FWD under the tuple the client
// sent (to the Service), whose packets get the backend as destination; NAT_REV under the translated tuple,
// whose replies (the entry's key turned round) get the Service as source again, and, when the forward
// direction's source was translated too (hairpin, NodePort to another node), `orig` as destination.
#define NAT_NONE 0
#define NAT_FWD 1
#define NAT_REV 2
// With NAT_FWD: also the source becomes the forward packet's destination (a NodePort's node address), so
// the backend's replies come back through this node.
#define NAT_SNAT_NODE 4
// With NAT_FWD: also the source becomes HAIRPIN_SRC (a pod reaching itself through its own Service).
#define NAT_SNAT_HAIRPIN 8
// A flow the kernel's own tracker translates (seeded at a switch from a kube-proxy-era connection): its
// packets keep going through the stack, whose tracker undoes the translation, never straight to a local pod.
#define CT_STACK 1
// TCP closing (docs/bpf.md, "Closed connections"): a FIN seen in the direction of the entry's key, in the
// other direction, and a reset. Both FINs, or a reset, shorten the entry's life to CT_FINS_NS / CT_RST_NS;
// the agent's sweeper removes entries past their life (see ct_closing).
#define CT_FIN_FWD 2
#define CT_FIN_REV 4
#define CT_RST 8
// With CT_RST: the reset was the endpoint's own pod's (it ended its connection), so the entries live only
// CT_RST_OWN_NS: at thousands of connections a second that a client resets, 10 s of them outgrow the map,
// whose LRU then evicts the newest flows'. A reset arriving at the pod keeps the kernel's 10 s.
#define CT_RST_OWN 16

struct ct_value {
	__u64 last_seen_ns;
	__u32 table; // the policy table it was allowed by (0: traffic of the host, which policy does not cover)
	__u8 nat;    // NAT_*
	__u8 flags;  // CT_*
	__u16 nat_port; // NAT_FWD: the backend's port; NAT_REV: the Service's (host order)
	__be32 nat_addr; // NAT_FWD: the backend; NAT_REV: the Service's address
	__be32 orig_addr; // NAT_REV with a translated source: the client, as replies must reach it (0: none)
	__u16 orig_port;
	__u16 pad2;
	__u32 pad3;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 524288);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} caracal_ct_v3 SEC(".maps");

// Services (docs/bpf.md, "Services"): a frontend (a ClusterIP, or a node address for a NodePort, with the
// port and protocol) names its current backend set; a set is immutable once written, and a change writes a
// new set and then flips the frontend to it, as policy tables are.
struct svc_key {
	__be32 addr;
	__u16 port; // host order
	__u8 proto;
	__u8 pad;
};

#define SVC_AFFINITY 1 // sessionAffinity: ClientIP

struct svc_value {
	__u32 set;      // the backend set's id
	__u16 count;    // its backends (0: no serving endpoint: connections are refused)
	__u16 flags;    // SVC_*
	__u32 affinity_s; // sessionAffinityConfig.clientIP.timeoutSeconds
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct svc_key);
	__type(value, struct svc_value);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} caracal_svc_v1 SEC(".maps");

struct backend_key {
	__u32 set;
	__u32 index;
};

struct backend {
	__be32 addr;
	__u16 port; // host order
	__u16 flags; // BACKEND_*
};

#define BACKEND_REMOTE 1 // not on this node
#define BACKEND_NODE 2 // one of this node's own addresses (a host-network backend here)

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct backend_key);
	__type(value, struct backend);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} caracal_backend_v1 SEC(".maps");

// A set's members by address (value: its index), so an affinity entry is used only while its backend serves.
struct member_key {
	__u32 set;
	__be32 addr;
	__u16 port;
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct member_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} caracal_member_v1 SEC(".maps");

// sessionAffinity: ClientIP: the backend a client last used, per frontend.
struct affinity_key {
	struct svc_key svc;
	__be32 client;
};

struct affinity {
	struct backend b;
	__u64 last_ns;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct affinity_key);
	__type(value, struct affinity);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} caracal_affinity_v1 SEC(".maps");

// The source a pod's packets to itself through its own Service get (a packet from its own address would
// be dropped by the pod as a martian): link-local, never a pod's or a node's.
#define HAIRPIN_SRC bpf_htonl(0xa9fe0102) // 169.254.1.2


// Idle flows are forgotten as the kernel's connection tracker forgets them (its default timeouts for
// established TCP, UDP streams and ICMP), so a flow idle longer is evaluated again like a new one.
#define CT_TCP_NS (5ULL * 24 * 3600 * 1000000000ULL)
#define CT_UDP_NS (120ULL * 1000000000ULL)
#define CT_OTHER_NS (30ULL * 1000000000ULL)
// A TCP flow after both FINs (Calico's TCPFinsSeen default), and after a reset (the kernel's CLOSE state).
#define CT_FINS_NS (30ULL * 1000000000ULL)
#define CT_RST_NS (10ULL * 1000000000ULL)
#define CT_RST_OWN_NS (1ULL * 1000000000ULL)

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
		if (!match_chunk(s, k->table, chunk, a->fields, &s->p))
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
	__builtin_memcpy(&s->p, p, sizeof(s->p));
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
		if (p->proto == IPPROTO_TCP) {
			// The flags byte (13th of the header): SYN 0x02, ACK 0x10.
			__u8 *flags = (__u8 *)l4 + 13;
			if ((void *)(flags + 1) > data_end)
				return 0;
			p->syn = (*flags & 0x12) == 0x02;
			p->tcp_flags = *flags;
		}
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

static __always_inline __u64 idle_limit(__u8 proto, __u8 flags)
{
	if (proto == IPPROTO_TCP) {
		if (flags & CT_RST_OWN)
			return CT_RST_OWN_NS;
		if (flags & CT_RST)
			return CT_RST_NS;
		if ((flags & (CT_FIN_FWD | CT_FIN_REV)) == (CT_FIN_FWD | CT_FIN_REV))
			return CT_FINS_NS;
		return CT_TCP_NS;
	}
	if (proto == IPPROTO_UDP)
		return CT_UDP_NS;
	return CT_OTHER_NS;
}

// Whether `p`, sent by the pod, is addressed to the host itself (defaultEndpointToHostAction applies). A
// global function: the lookup's parameters are on a stack of their own.
__noinline int to_host(struct __sk_buff *skb, const struct pkt *p)
{
	if (!skb || !p)
		return 0;
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

// The tracker's entry for `k`'s flow, either way round (`*reversed` says which); `k` is as it was on return.
static __always_inline struct ct_value *ct_find(struct ct_key *k, int *reversed)
{
	*reversed = 0;
	struct ct_value *ct = bpf_map_lookup_elem(&caracal_ct_v3, k);
	if (!ct) {
		ct_reverse(k);
		ct = bpf_map_lookup_elem(&caracal_ct_v3, k);
		ct_reverse(k);
		*reversed = ct != 0;
	}
	return ct;
}

static __always_inline struct ct_value *ct_lookup(struct ct_key *k)
{
	int reversed;
	return ct_find(k, &reversed);
}

// A TCP FIN or reset on a tracked flow (`ct`, found under `k` or, when `reversed`, under `k` turned round;
// `own`: the endpoint's pod sent the packet). A FIN marks its direction; a reset marks the flow (CT_RST), which
// shortens its entries' life to CT_RST_NS; the pod's next packet on the flow other than a reset clears the mark
// (its connection is alive: the reset was not its connection's). Nothing is deleted here: a reset can arrive
// out of order, after a new connection on the same tuple has replaced the entries (a client that reset a
// connection and opened the next one from the same port on another CPU), and deleting would take the new
// connection's entries; a forged reset arriving at the pod must not end a flow either. The sweeper removes
// what is past its life. A Service's flow has two entries; both get the same marks, so neither outlives or
// dies before the other. `k` is changed.
static __always_inline void ct_closing(struct ct_key *k, struct ct_value *ct, int reversed, __u8 tcp_flags,
				       int own)
{
	__u8 set = 0, clear = 0;
	if (tcp_flags & TCP_RST) {
		set = own ? CT_RST | CT_RST_OWN : CT_RST;
	} else {
		if (own)
			clear = CT_RST | CT_RST_OWN;
		if (tcp_flags & TCP_FIN)
			set = reversed ? CT_FIN_REV : CT_FIN_FWD;
	}
	__u8 before = ct->flags;
	ct->flags = (before | set) & ~clear;
	if (ct->flags == before || !(ct->nat & (NAT_FWD | NAT_REV)))
		return;
	// The other entry of a Service's pair.
	__u8 nat = ct->nat;
	__be32 nat_addr = ct->nat_addr, orig_addr = ct->orig_addr;
	__u16 nat_port = ct->nat_port, orig_port = ct->orig_port;
	if (reversed)
		ct_reverse(k);
	if (nat & NAT_FWD) {
		// The reverse entry: the translated tuple, with the source translated too where it is (a pod's flow
		// to itself; a NodePort's to another node, whose new source is the node address the client sent to).
		if (nat & NAT_SNAT_HAIRPIN) {
			__be32 src = HAIRPIN_SRC;
			__builtin_memcpy(&k->src[12], &src, 4);
		} else if (nat & NAT_SNAT_NODE) {
			__builtin_memcpy(&k->src[12], &k->dst[12], 4);
		}
		__builtin_memcpy(&k->dst[12], &nat_addr, 4);
		k->dport = nat_port;
	} else {
		// The forward entry: the tuple the client sent to the Service.
		if (orig_addr) {
			__builtin_memcpy(&k->src[12], &orig_addr, 4);
			k->sport = orig_port;
		}
		__builtin_memcpy(&k->dst[12], &nat_addr, 4);
		k->dport = nat_port;
	}
	struct ct_value *pair = bpf_map_lookup_elem(&caracal_ct_v3, k);
	if (pair)
		pair->flags = (pair->flags | set) & ~clear;
}

// Rewrites one side (0: source, 1: destination) of an IPv4 TCP or UDP packet to `addr`:`port` (port in host
// order), with the IP and L4 checksums (a UDP checksum of 0 stays "none"). Returns 0 when the packet is not
// one (nothing is changed then).
static __always_inline int rewrite(struct __sk_buff *skb, int side, __be32 addr, __u16 port)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;
	if ((void *)(ip + 1) > data_end)
		return 0;
	__u8 proto = ip->protocol;
	__u32 l4 = ETH_HLEN + (ip->ihl & 0xf) * 4;
	__be32 old_addr = side ? ip->daddr : ip->saddr;
	__u32 addr_off = ETH_HLEN + (side ? offsetof(struct iphdr, daddr) : offsetof(struct iphdr, saddr));
	__u32 csum_off;
	__u64 mangled = 0;
	if (proto == IPPROTO_TCP) {
		csum_off = l4 + offsetof(struct tcphdr, check);
	} else if (proto == IPPROTO_UDP) {
		csum_off = l4 + offsetof(struct udphdr, check);
		mangled = BPF_F_MARK_MANGLED_0;
	} else {
		return 0;
	}
	__u32 port_off = l4 + (side ? 2 : 0);
	__be16 old_port;
	if (bpf_skb_load_bytes(skb, port_off, &old_port, 2) < 0)
		return 0;
	__be16 new_port = bpf_htons(port);
	if (old_addr != addr) {
		bpf_l4_csum_replace(skb, csum_off, old_addr, addr, BPF_F_PSEUDO_HDR | mangled | 4);
		bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), old_addr, addr, 4);
		bpf_skb_store_bytes(skb, addr_off, &addr, 4, 0);
	}
	if (old_port != new_port) {
		bpf_l4_csum_replace(skb, csum_off, old_port, new_port, mangled | 2);
		bpf_skb_store_bytes(skb, port_off, &new_port, 2, 0);
	}
	return 1;
}

// Swaps the Ethernet addresses: a packet a pod sent to its gateway, turned back to the pod.
static __always_inline void swap_macs(struct __sk_buff *skb)
{
	__u8 macs[12];
	if (bpf_skb_load_bytes(skb, 0, macs, 12) < 0)
		return;
	bpf_skb_store_bytes(skb, 0, &macs[6], 6, 0);
	bpf_skb_store_bytes(skb, 6, &macs[0], 6, 0);
}

// Sends a packet that came from a pod straight back to it.
static __always_inline long back_to_pod(struct __sk_buff *skb)
{
	swap_macs(skb);
	return bpf_redirect(skb->ifindex, 0);
}

// Sends a packet whose source is now this node's address out where the routes say, with the neighbour
// resolved by the kernel: it must not go through the IP stack's input, which drops a packet arriving with
// one of the node's own addresses as its source.
static __always_inline int route_out(struct __sk_buff *skb, __be32 src, __be32 dst, __u8 proto)
{
	struct bpf_fib_lookup fib = {};
	fib.family = 2; // AF_INET
	fib.ifindex = skb->ifindex;
	fib.l4_protocol = proto;
	fib.ipv4_src = src;
	fib.ipv4_dst = dst;
	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_SKIP_NEIGH);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return TC_ACT_SHOT;
	return bpf_redirect_neigh(fib.ifindex, 0, 0, 0);
}

// A Service's backend for a new flow from `client` to frontend `sk`: the one its affinity names while that
// one still serves and the affinity has not expired, otherwise one at random (remembered when the Service has
// affinity). Returns 0 when the set is missing a backend (the agent is rewriting it): the packet is dropped.
static __always_inline int pick(const struct svc_key *sk, const struct svc_value *sv, __be32 client, __u64 now,
				 struct backend *out)
{
	struct affinity_key ak = {.client = client};
	__builtin_memcpy(&ak.svc, sk, sizeof(ak.svc));
	if (sv->flags & SVC_AFFINITY) {
		struct affinity *a = bpf_map_lookup_elem(&caracal_affinity_v1, &ak);
		if (a && now - a->last_ns < (__u64)sv->affinity_s * 1000000000ULL) {
			struct member_key mk = {.set = sv->set, .addr = a->b.addr, .port = a->b.port};
			if (bpf_map_lookup_elem(&caracal_member_v1, &mk)) {
				__builtin_memcpy(out, &a->b, sizeof(*out));
				a->last_ns = now;
				return 1;
			}
		}
	}
	struct backend_key bk = {.set = sv->set, .index = bpf_get_prandom_u32() % sv->count};
	struct backend *b = bpf_map_lookup_elem(&caracal_backend_v1, &bk);
	if (!b)
		return 0;
	__builtin_memcpy(out, b, sizeof(*out));
	if (sv->flags & SVC_AFFINITY) {
		struct affinity a = {.last_ns = now};
		__builtin_memcpy(&a.b, b, sizeof(a.b));
		bpf_map_update_elem(&caracal_affinity_v1, &ak, &a, BPF_ANY);
	}
	return 1;
}

// Records a flow in the tracker: `nat` and the two translations as NAT_ARG gives them (0: none). A global
// function, so the entry is built on a stack of its own.
__noinline int ct_add(const struct ct_key *key, __u32 table, __u32 nat, __u64 to, __u64 orig)
{
	if (!key)
		return 0;
	struct ct_value v = {
		.last_seen_ns = bpf_ktime_get_ns(),
		.table = table,
		.nat = nat,
		.nat_addr = to >> 16,
		.nat_port = to & 0xffff,
		.orig_addr = orig >> 16,
		.orig_port = orig & 0xffff,
	};
	long rc = bpf_map_update_elem(&caracal_ct_v3, key, &v, BPF_ANY);
	// Looked up once at once: the LRU map takes the entries nobody has looked up yet first when it must
	// make room, and a new flow's reverse entry is first looked up only when the reply comes.
	bpf_map_lookup_elem(&caracal_ct_v3, key);
	// The same two sockets seen the other way round are this flow: an entry an earlier flow left under the
	// reversed tuple on this interface would be found first for this flow's replies (ct_find looks the
	// packet's own tuple up before the reversed one), and pass a Service's reply untranslated. It goes.
	struct ct_key r;
	__builtin_memcpy(&r, key, sizeof(r));
	ct_reverse(&r);
	bpf_map_delete_elem(&caracal_ct_v3, &r);
	return rc;
}

#define SVC_NONE 0
#define SVC_PICKED 1
#define SVC_REFUSE 2

// Whether frontend `sk` is a Service's and, if so, the backend of a new flow from `client` (SVC_PICKED), or
// that there is none to give (SVC_REFUSE). A global function: its stack is not added to the policy walk's.
__noinline int svc_choose(const struct svc_key *sk, __be32 client, struct backend *out)
{
	if (!sk || !out)
		return SVC_NONE;
	struct svc_value *sv = bpf_map_lookup_elem(&caracal_svc_v1, sk);
	if (!sv)
		return SVC_NONE;
	if (!sv->count || !pick(sk, sv, client, bpf_ktime_get_ns(), out))
		return SVC_REFUSE;
	return SVC_PICKED;
}

// The mark of a packet the programs made for a pod (a refusal): its to_pod program passes it as it is.
#define REFUSAL_MARK 0xca7ac001

static __always_inline __u16 csum_fold(__s64 sum)
{
	__u32 x = (__u32)sum;
	x = (x & 0xffff) + (x >> 16);
	x = (x & 0xffff) + (x >> 16);
	return (__u16)~x;
}

// Refuses a pod's new connection to a Service with no serving endpoint as kube-proxy's REJECT does: the
// packet becomes an ICMP port unreachable from the Service, quoting it, sent straight back to the pod (whose
// TCP connect fails with "connection refused" and whose UDP socket sees the error). An IPv4 header with
// options is dropped instead. A global function, with its buffers on its own stack.
__noinline int refuse(struct __sk_buff *skb)
{
	if (!skb)
		return TC_ACT_SHOT;
	// The quote: the IP header and the first 8 bytes after it.
	__u8 quote[28];
	if (bpf_skb_load_bytes(skb, ETH_HLEN, quote, sizeof(quote)) < 0 || quote[0] != 0x45)
		return TC_ACT_SHOT;
	if (bpf_skb_change_tail(skb, ETH_HLEN + 20 + 8 + sizeof(quote), 0) < 0)
		return TC_ACT_SHOT;
	struct {
		struct iphdr ip;
		__u8 icmp[8];
		__u8 quote[28];
	} out = {};
	out.ip.version = 4;
	out.ip.ihl = 5;
	out.ip.tot_len = bpf_htons(sizeof(out));
	out.ip.ttl = 64;
	out.ip.protocol = IPPROTO_ICMP;
	__builtin_memcpy(&out.ip.saddr, &quote[16], 4); // the Service
	__builtin_memcpy(&out.ip.daddr, &quote[12], 4); // the pod
	out.icmp[0] = 3; // destination unreachable
	out.icmp[1] = 3; // port unreachable
	__builtin_memcpy(out.quote, quote, sizeof(quote));
	__u16 icmp_sum = csum_fold(bpf_csum_diff(0, 0, (__be32 *)out.icmp, 8 + sizeof(quote), 0));
	__builtin_memcpy(&out.icmp[2], &icmp_sum, 2);
	out.ip.check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&out.ip, sizeof(out.ip), 0));
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &out, sizeof(out), 0) < 0)
		return TC_ACT_SHOT;
	skb->mark = REFUSAL_MARK;
	return back_to_pod(skb);
}

// A translation's address and port in one argument (global functions take at most five): addr << 16 | port.
#define NAT_ARG(addr, port) ((__u64)(addr) << 16 | (port))

// The forward translation of a flow a Service translates (its NAT_FWD entry's, `nat` its flags): the backend
// (`to`) as destination, and the source too when the entry says so. A pod's packet to itself goes straight
// back to the pod. A global function: its stack is its own, not added to the policy walk's.
__noinline int translate_fwd(struct __sk_buff *skb, __u64 to, __u32 nat, __be32 node_addr)
{
	if (!skb)
		return TC_ACT_SHOT;
	__be32 addr = to >> 16;
	if (!rewrite(skb, 1, addr, to & 0xffff))
		return TC_ACT_SHOT;
	if (!(nat & (NAT_SNAT_HAIRPIN | NAT_SNAT_NODE)))
		return TC_ACT_OK;
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;
	if ((void *)(ip + 1) > data_end)
		return TC_ACT_SHOT;
	__u8 proto = ip->protocol;
	__be16 sp;
	if (bpf_skb_load_bytes(skb, ETH_HLEN + (ip->ihl & 0xf) * 4, &sp, 2) < 0)
		return TC_ACT_SHOT;
	if (nat & NAT_SNAT_HAIRPIN) {
		if (!rewrite(skb, 0, HAIRPIN_SRC, bpf_ntohs(sp)))
			return TC_ACT_SHOT;
		return back_to_pod(skb);
	}
	if (!rewrite(skb, 0, node_addr, bpf_ntohs(sp)))
		return TC_ACT_SHOT;
	return route_out(skb, node_addr, addr, proto);
}

#define REV_FROM_POD 1
#define REV_HOST 2

// The reverse translation (a reply found under a NAT_REV entry turned round): the Service (`svc`) as source,
// and the client (`orig`, when not 0) as destination when the forward direction's source was translated.
// Where the reply must turn back (a pod's reply to itself, arriving from the pod; a NodePort reply arriving
// from another node), it is sent on from here. A global function, as translate_fwd.
__noinline int translate_rev(struct __sk_buff *skb, __u64 svc, __u64 orig, __u32 where)
{
	if (!skb)
		return TC_ACT_SHOT;
	if (!rewrite(skb, 0, svc >> 16, svc & 0xffff))
		return TC_ACT_SHOT;
	if (!(orig >> 16))
		return TC_ACT_OK;
	if (!rewrite(skb, 1, orig >> 16, orig & 0xffff))
		return TC_ACT_SHOT;
	if (where & REV_FROM_POD) {
		return back_to_pod(skb);
	}
	if (where & REV_HOST) {
		void *data = (void *)(long)skb->data;
		void *data_end = (void *)(long)skb->data_end;
		struct iphdr *ip = data + ETH_HLEN;
		if ((void *)(ip + 1) > data_end)
			return TC_ACT_SHOT;
		return route_out(skb, svc >> 16, orig >> 16, ip->protocol);
	}
	return TC_ACT_OK;
}

// Records a new flow a Service translates: the forward entry under `key` (the tuple sent to frontend `sk`),
// then the reverse one under the translated tuple, whose source is `new_src` when the forward direction's
// source is translated too (0: kept). `key` is left as the translated tuple.
static __always_inline void track_service_flow(struct ct_key *key, __u32 table, __u32 fwd_nat,
					       const struct backend *b, const struct svc_key *sk, __be32 new_src)
{
	ct_add(key, table, fwd_nat, NAT_ARG(b->addr, b->port), 0);
	__u64 orig = 0;
	if (new_src) {
		__be32 src;
		__builtin_memcpy(&src, &key->src[12], 4);
		orig = NAT_ARG(src, key->sport);
		__builtin_memcpy(&key->src[12], &new_src, 4);
	}
	__builtin_memcpy(&key->dst[12], &b->addr, 4);
	key->dport = b->port;
	ct_add(key, table, NAT_REV, NAT_ARG(sk->addr, sk->port), orig);
}

static __always_inline int handle(struct __sk_buff *skb, int to_pod, int *stack_only)
{
	__u32 ifindex = skb->ifindex;
	// A refusal this node's programs made for the pod (see refuse).
	if (to_pod && skb->mark == REFUSAL_MARK) {
		skb->mark = 0;
		return TC_ACT_OK;
	}
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
		return verdict(ifindex, to_pod, ct && now - ct->last_seen_ns < idle_limit(key.proto, ct->flags));
	}
	key.sport = p.has_ports ? p.sport : p.echo_id;
	key.dport = p.has_ports ? p.dport : p.echo_id;
	key.proto = p.proto;
	__builtin_memcpy(key.src, p.src, 16);
	__builtin_memcpy(key.dst, p.dst, 16);
	// A packet of a known flow, either way round; translated when a Service's flow. Not a known flow: a TCP
	// SYN (a connection opened again on a tuple an ended one left in the tracker), and, from the pod, a packet
	// on the translated tuple of a Service's flow (the pod talking to that backend directly from the same
	// port): each starts afresh and its entries replace the stale ones.
	int reversed;
	ct = ct_find(&key, &reversed);
	// (A SYN arriving at the pod under a reverse entry is its own Service's hairpin, just translated.)
	if (ct && ((p.syn && !(to_pod && ct->nat == NAT_REV && !reversed)) || (!to_pod && ct->nat == NAT_REV && !reversed)))
		ct = 0;
	if (ct && now - ct->last_seen_ns < idle_limit(p.proto, ct->flags)) {
		ct->last_seen_ns = now;
		*stack_only = ct->flags & CT_STACK;
		count(ifindex, to_pod, 1);
		__u8 nat = ct->nat;
		__u64 to = NAT_ARG(ct->nat_addr, ct->nat_port);
		__u64 orig = NAT_ARG(ct->orig_addr, ct->orig_port);
		if (p.tcp_flags & (TCP_FIN | TCP_RST) || (!to_pod && (ct->flags & CT_RST)))
			ct_closing(&key, ct, reversed, p.tcp_flags, !to_pod);
		if ((nat & NAT_FWD) && !reversed)
			return translate_fwd(skb, to, nat, 0);
		if (nat == NAT_REV && reversed)
			return translate_rev(skb, to, orig, to_pod ? 0 : REV_FROM_POD);
		return TC_ACT_OK;
	}

	// A new flow. To a Service (from the pod, IPv4 TCP or UDP): a backend is chosen, and policy judges the
	// packet as it will arrive, with the backend as its destination.
	int service = 0;
	struct svc_key sk = {.port = p.dport, .proto = p.proto};
	struct backend b = {};
	if (!to_pod && p.version == 4 && (p.proto == IPPROTO_TCP || p.proto == IPPROTO_UDP)) {
		__builtin_memcpy(&sk.addr, &p.dst[12], 4);
		__be32 client;
		__builtin_memcpy(&client, &p.src[12], 4);
		int chosen = svc_choose(&sk, client, &b);
		// No serving endpoint: refused.
		if (chosen == SVC_REFUSE) {
			count(ifindex, to_pod, 0);
			return refuse(skb);
		}
		if (chosen == SVC_PICKED) {
			service = b.addr == client ? 2 : 1; // 2: the pod itself (hairpin)
			__builtin_memcpy(&p.dst[12], &b.addr, 4);
			p.dport = b.port;
		}
	}
	// The host's own traffic to the pod passes; everything else is evaluated against the endpoint's policy
	// for the direction; a pod's flow to itself through its Service against both of its own (it leaves and
	// enters the pod); a pod's flow to its own host then meets defaultEndpointToHostAction (Drop: the flag).
	__u32 table = 0;
	int allowed;
	if (to_pod && skb->ingress_ifindex == 0) {
		allowed = 1;
	} else {
		table = ep->table[to_pod ? 1 : 0];
		allowed = decide(table, &p);
		if (allowed && service == 2)
			allowed = decide(ep->table[1], &p);
		if (allowed && !to_pod && !service && (ep->flags & EP_HOST_DROP) && to_host(skb, &p))
			allowed = 0;
	}
	if (!allowed)
		return verdict(ifindex, to_pod, 0);
	if (!service) {
		ct_add(&key, table, NAT_NONE, 0, 0);
		return verdict(ifindex, to_pod, 1);
	}
	// The forward entry under the tuple the pod sent, the reverse one under the translated tuple.
	__u32 fwd_nat = NAT_FWD | (service == 2 ? NAT_SNAT_HAIRPIN : 0);
	track_service_flow(&key, table, fwd_nat, &b, &sk, service == 2 ? HAIRPIN_SRC : 0);
	count(ifindex, to_pod, 1);
	return translate_fwd(skb, NAT_ARG(b.addr, b.port), fwd_nat, 0);
}

// The node's own interface (the one with its address): NodePorts. A packet to one of its NodePorts gets a
// backend as destination (and the node's address as source when the backend is on another node, so the
// replies come back here); the replies are translated back on their way out. Everything else passes: the
// node's traffic is not pod policy.
static __always_inline int handle_host(struct __sk_buff *skb, int egress)
{
	struct pkt p = {};
	struct ct_key key = {.ifindex = skb->ifindex};
	if (parse(skb, &p, &key) != 1 || key.pad[0] || p.version != 4 ||
	    (p.proto != IPPROTO_TCP && p.proto != IPPROTO_UDP))
		return TC_ACT_OK;
	__u64 now = bpf_ktime_get_ns();
	key.sport = p.sport;
	key.dport = p.dport;
	key.proto = p.proto;
	__builtin_memcpy(key.src, p.src, 16);
	__builtin_memcpy(key.dst, p.dst, 16);
	int reversed;
	struct ct_value *ct = ct_find(&key, &reversed);
	// A SYN to a NodePort opens a new connection even where an ended one left its entries.
	if (ct && p.syn && !egress)
		ct = 0;
	if (ct && now - ct->last_seen_ns < idle_limit(p.proto, ct->flags)) {
		ct->last_seen_ns = now;
		// Nothing here is a pod's own packet: a reset only shortens the entries' life.
		if (p.tcp_flags & (TCP_FIN | TCP_RST))
			ct_closing(&key, ct, reversed, p.tcp_flags, 0);
		if (!egress && (ct->nat & NAT_FWD) && !reversed) {
			__be32 node;
			__builtin_memcpy(&node, &p.dst[12], 4);
			return translate_fwd(skb, NAT_ARG(ct->nat_addr, ct->nat_port), ct->nat, node);
		}
		// A reply: from a local backend on its way out (source only), or from another node's backend
		// arriving here (source and destination, then sent back out).
		if (ct->nat == NAT_REV && reversed && egress == !ct->orig_addr)
			return translate_rev(skb, NAT_ARG(ct->nat_addr, ct->nat_port),
					     NAT_ARG(ct->orig_addr, ct->orig_port), REV_HOST);
		return TC_ACT_OK;
	}
	if (egress)
		return TC_ACT_OK;
	struct svc_key sk = {.port = p.dport, .proto = p.proto};
	__builtin_memcpy(&sk.addr, &p.dst[12], 4);
	__be32 client;
	__builtin_memcpy(&client, &p.src[12], 4);
	struct backend b = {};
	int chosen = svc_choose(&sk, client, &b);
	if (chosen == SVC_NONE)
		return TC_ACT_OK;
	if (chosen == SVC_REFUSE)
		return TC_ACT_SHOT;
	int remote = b.flags & BACKEND_REMOTE;
	__u32 fwd_nat = NAT_FWD | (remote ? NAT_SNAT_NODE : 0);
	track_service_flow(&key, 0, fwd_nat, &b, &sk, remote ? sk.addr : 0);
	return translate_fwd(skb, NAT_ARG(b.addr, b.port), fwd_nat, sk.addr);
}

// Delivers a packet its pod's program passed straight to the interface of the local pod it is addressed to,
// past the node's IP stack: the kernel's routes and neighbours decide where (a FIB lookup, as forwarding
// would), the time to live drops by one as forwarding would drop it, and the packet leaves through the
// receiving pod's interface, whose to_pod program judges it as it judges every packet the pod receives.
// Anything else (the node itself, another node, outside the cluster, a packet that needs the stack: an expired
// time to live, one larger than the route's MTU) goes on into the stack as before. What the stack would add on
// the way between two local pods (its connection tracker and the node's forward rules) is what is skipped: in
// BPF mode policy and Services are these programs'. A global function: its lookup is on a stack of its own.
__noinline int to_local_pod(struct __sk_buff *skb)
{
	if (!skb)
		return TC_ACT_OK;
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return TC_ACT_OK;
	struct bpf_fib_lookup fib = {};
	fib.ifindex = skb->ifindex;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > data_end || ip->ttl <= 1)
			return TC_ACT_OK;
		fib.family = 2; // AF_INET
		fib.tos = ip->tos;
		fib.l4_protocol = ip->protocol;
		fib.tot_len = bpf_ntohs(ip->tot_len);
		fib.ipv4_src = ip->saddr;
		fib.ipv4_dst = ip->daddr;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end || ip6->hop_limit <= 1)
			return TC_ACT_OK;
		fib.family = 10; // AF_INET6
		fib.l4_protocol = ip6->nexthdr;
		fib.tot_len = sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
		__builtin_memcpy(fib.ipv6_src, &ip6->saddr, 16);
		__builtin_memcpy(fib.ipv6_dst, &ip6->daddr, 16);
	} else {
		return TC_ACT_OK;
	}
	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return TC_ACT_OK;
	__u32 out = fib.ifindex;
	if (out == skb->ifindex || !bpf_map_lookup_elem(&caracal_ep_v2, &out))
		return TC_ACT_OK;
	// Forwarded: one hop less to live.
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return TC_ACT_OK;
	if (fib.family == 2) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > data_end)
			return TC_ACT_OK;
		__be16 old = *(__be16 *)&ip->ttl;
		ip->ttl--;
		bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), old, *(__be16 *)&ip->ttl, 2);
	} else {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end)
			return TC_ACT_OK;
		ip6->hop_limit--;
	}
	// The pod's address not resolved yet: the kernel resolves it (and sets the Ethernet addresses).
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return bpf_redirect_neigh(out, 0, 0, 0);
	bpf_skb_store_bytes(skb, 0, fib.dmac, 6, 0);
	bpf_skb_store_bytes(skb, 6, fib.smac, 6, 0);
	return bpf_redirect(out, 0);
}

// Connect-time load balancing (docs/bpf.md, "Connect-time load balancing"): a TCP socket of a network
// namespace this node's agent registered (its pods', its own host's) that connects to a Service's frontend
// is given a backend at connect(): the socket's destination is rewritten before the kernel routes anything,
// so the flow's packets carry the backend from the first SYN and need no rewrite, no translation entries and
// no reverse translation (Calico's bpfConnectTimeLoadBalancing: TCP). getpeername() still answers the
// Service. What is not done here falls to the TC programs, which translate per packet: UDP, a Service with no
// serving endpoint (refused there), a pod reaching itself (the hairpin, with its source translation and its
// own ingress policy), and every namespace not registered (pods wired before the registration existed, and
// in the lab the other nodes' namespaces, which share this kernel).
#define CTLB_HOST 1 // the node's own namespace (not a pod's)

struct ctlb_ns {
	__be32 addr; // the pod's IPv4 address (the node's, with CTLB_HOST): the client, for sessionAffinity
	__u32 flags; // CTLB_*
	__u32 ifindex; // the pod's host-side interface (0 with CTLB_HOST): the agent's bookkeeping
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64); // the namespace's cookie
	__type(value, struct ctlb_ns);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} caracal_ctlb_ns_v1 SEC(".maps");

// What a socket connect() translated (key: its cookie), for getpeername(). Socket cookies are never reused;
// a closed socket's entry is left for the LRU to take.
struct ctlb_sock {
	__be32 svc_addr;
	__be32 be_addr;
	__u16 svc_port; // network order, as in bpf_sock_addr
	__u16 be_port;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, __u64);
	__type(value, struct ctlb_sock);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} caracal_ctlb_sock_v1 SEC(".maps");

// The sock_addr programs' verdict: go on with the call (0 would fail it with EPERM).
#define SOCK_PROCEED 1

SEC("cgroup/connect4")
int ctlb_connect4(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return SOCK_PROCEED;
	__u64 ns = bpf_get_netns_cookie(ctx);
	struct ctlb_ns *me = bpf_map_lookup_elem(&caracal_ctlb_ns_v1, &ns);
	if (!me)
		return SOCK_PROCEED;
	struct svc_key sk = {.addr = ctx->user_ip4, .port = bpf_ntohs(ctx->user_port), .proto = IPPROTO_TCP};
	struct svc_value *sv = bpf_map_lookup_elem(&caracal_svc_v1, &sk);
	if (!sv || !sv->count)
		return SOCK_PROCEED;
	struct backend b = {};
	if (!pick(&sk, sv, me->addr, bpf_ktime_get_ns(), &b))
		return SOCK_PROCEED;
	// A pod's connection to itself, or to its own node (which defaultEndpointToHostAction would judge as the
	// pod's traffic to its host, not as a Service's): left to the TC programs.
	if (!(me->flags & CTLB_HOST) && (b.addr == me->addr || (b.flags & BACKEND_NODE)))
		return SOCK_PROCEED;
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct ctlb_sock s = {
		.svc_addr = sk.addr,
		.svc_port = ctx->user_port,
		.be_addr = b.addr,
		.be_port = bpf_htons(b.port),
	};
	bpf_map_update_elem(&caracal_ctlb_sock_v1, &cookie, &s, BPF_ANY);
	ctx->user_ip4 = b.addr;
	ctx->user_port = bpf_htons(b.port);
	return SOCK_PROCEED;
}

// getpeername() of a socket connect() translated answers the Service it was asked to connect to.
SEC("cgroup/getpeername4")
int ctlb_getpeername4(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct ctlb_sock *s = bpf_map_lookup_elem(&caracal_ctlb_sock_v1, &cookie);
	if (s && ctx->user_ip4 == s->be_addr && ctx->user_port == s->be_port) {
		ctx->user_ip4 = s->svc_addr;
		ctx->user_port = s->svc_port;
	}
	return SOCK_PROCEED;
}

SEC("classifier/from_pod")
int from_pod(struct __sk_buff *skb)
{
	int stack_only = 0;
	int rc = handle(skb, 0, &stack_only);
	return rc == TC_ACT_OK && !stack_only ? to_local_pod(skb) : rc;
}

SEC("classifier/to_pod")
int to_pod(struct __sk_buff *skb)
{
	int stack_only = 0;
	return handle(skb, 1, &stack_only);
}

SEC("classifier/host_ingress")
int host_ingress(struct __sk_buff *skb)
{
	return handle_host(skb, 0);
}

SEC("classifier/host_egress")
int host_egress(struct __sk_buff *skb)
{
	return handle_host(skb, 1);
}
