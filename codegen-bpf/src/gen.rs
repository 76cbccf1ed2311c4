//! Program generation: one decision table becomes one tc classifier (DESIGN.md §6).
//!
//! The program parses Ethernet, IPv4 (any header length) or IPv6 (skipping hop-by-hop, routing,
//! destination-options and fragment headers, up to [`MAX_EXT_HEADERS`]), and the L4 header; finds
//! the peer's identity: the [`HOSTS_MAP`] hash (endpoints, nodes, /32 and /128 CIDRs), then the
//! [`FQDN_MAP`] hash (addresses learned from DNS, shared by every generation), then the
//! `ipcache` LPM trie (prefixes); a miss is the world. Host entries come first so that an
//! endpoint or node keeps its identity when a name also resolves to it (in Cilium, too, the
//! ipcache entries FQDN learning writes have the `generated` source, which every other source
//! overwrites: pkg/source/source.go `AllowOverwrite`); learned addresses come before the
//! prefixes because their identity already carries the longest CIDR prefix holding them
//! (`cnpc_ir::FqdnIdentity`). It decides with the table;
//! and consults the `ct` map so replies of tracked connections pass. Behaviours fixed here, each
//! tested in the kernel:
//! - frames that are not IP pass (ARP must work; policy is about IP peers);
//! - a packet too short for the headers its type announces is dropped;
//! - a non-first fragment carries no ports, so it cannot be matched against port rules: it is
//!   dropped, and so no fragment of a denied flow gets through unchecked;
//! - an IP protocol other than TCP, UDP, SCTP, ICMP and ICMPv6 gets the table's default;
//! - Proxy hands the connection to the node's L7 proxy, or drops it when no proxy takes it
//!   (see "L7 proxies" below): it never passes unjudged.
//!
//! # Connection tracking
//! As in Cilium (bpf/lib/conntrack.h), policy decides the first packet of a connection and the
//! replies of an allowed connection pass whatever the reverse direction's policy says. Keys are
//! written from the endpoint's side ([`CT_KEY_SIZE`]: local address, peer address, local port,
//! peer port, protocol, family), so the endpoint's egress program and its ingress program name a
//! connection with the same key. An allowed (or proxied) packet of TCP, UDP or SCTP that finds no
//! entry creates one recording which side opened it; a packet the table denies passes only when
//! an entry exists that the *other* side opened, i.e. when it is a reply. Packets in the opening
//! direction are decided by the table every time, so a policy change applies to established
//! connections at once. ICMP is not tracked: an echo reply is decided by the table.
//!
//! Conntrack is consulted for every tracked packet, also the allowed packets of established
//! connections in the opening direction, and this is kept on purpose. Skipping it for packets
//! that cannot open a TCP connection (no SYN) was measured (the lookup is about 30 ns of a
//! packet's 60–90) and rejected, because the lookup is what keeps these promises:
//! - an allowed packet that finds no entry creates one and reports a new connection, whatever
//!   its flags, as Cilium does (bpf/lib/conntrack.h, `ct_lookup4` answers CT_NEW for any packet
//!   without an entry and bpf/bpf_lxc.c creates the entry with `ct_create4`; a TCP entry seen
//!   without SYN only gets the long lifetime sooner). Entries go missing while connections
//!   live: the LRU map evicts under pressure, and connections opened before the programs were
//!   attached never had one. Created only on SYN, such a connection would never get its entry
//!   back, and its replies would be dropped from then on wherever the reverse table denies them
//!   (a policy change on an open connection included); a lookup on every packet also keeps a
//!   live connection's entry recent in the LRU;
//! - a connection handed to the proxy ([`CT_FLAG_PROXIED`]) goes on to the proxy whatever the
//!   table says now. No condition the loader can state proves that no such entry exists for a
//!   program: entries outlive generations, the identities and programs of an address change,
//!   and the Proxy tail flags a connection opened directly before it knows the handoff works.
//!
//! # Peers by address
//! [`generate`] looks every peer up as above. [`generate_inlined`] (opt-in: the loader passes
//! the ipcache's host addresses, [`HostAddresses`]) first looks for the peer's address among
//! the addresses of the identities the table's rows name, and only a miss takes the lookup
//! (the slow path: every other peer, the world, prefixes, learned names, addresses added after
//! generation). Three forms, by the number of addresses:
//! - up to [`INLINE_MAX_ADDRESSES`] per family the addresses are compared in code (a
//!   binary-search tree of 32-bit compares over the address's words; a hit sets the identity
//!   and goes on to the decision);
//! - beyond, when they fall in at most [`INLINE_MAX_WINDOWS`] dense **address windows** per
//!   family (pod CIDRs are dense: 10,000 pods of a /16 take one window), a slot array
//!   indexed by the address's place in its window. Code compares the window: for IPv4 the
//!   address (host order) minus the window's base, unsigned, below its length; for IPv6 the
//!   first three 32-bit words equal, then the same on the last word. The slot (`adw_*`,
//!   ARRAY, value `u32 identity, u32 class`, identity 0 for an address not held, which takes
//!   the lookup) gives the identity and class, and a class array (`adc_*`, ARRAY, one record
//!   per class) up to [`WINDOW_CLASS_ENTRIES`] of the class's port segments (protocol, range,
//!   verdict, row; segments are disjoint, as [`DecisionTable::lookup`]'s first match makes
//!   them), compared in code: a hit is the verdict, a miss the default when the record holds
//!   every segment of the class, and otherwise the table's usual decision with the identity.
//!   An ARRAY lookup costs no hashing: the verifier replaces the helper call by a bounds check
//!   and an add (kernel/bpf/arraymap.c `array_map_gen_lookup`, called from
//!   kernel/bpf/verifier.c `do_misc_fixups` for JITed programs), where a hash lookup hashes the
//!   24-byte key (about 25-30 ns measured). The windows are the fewest that hold the
//!   addresses in at most [`Inline::max_window_slots`] slots and at most
//!   [`WINDOW_SLOTS_PER_ADDRESS`] slots per address (an array is allocated whole, 8 bytes a
//!   slot: kernel/bpf/arraymap.c `array_map_alloc`; at that density it takes fewer bytes than
//!   the address map's records would), cut at the widest gaps between addresses;
//! - otherwise their single-port rows go into an address map (`adr_*`, HASH, key `u32 family,
//!   u8[16] address, u8 protocol, u8 zero, be16 port`, value `u32 verdict, u32 row, u32
//!   identity`, at most [`Inline::max_map_records`] records), whose hit is the verdict itself
//!   and whose miss (a range, a default, another peer) takes the lookup and the table's usual
//!   decision.
//!
//! Only host entries are held: the host map is read first, so an address found there has that
//! identity whatever the fqdn map and the prefixes say, and holding it changes no answer. Each
//! form gives an address held exactly that identity (a window's slot is the address's own: the
//! window check refuses every other address, and each held address has one slot) and decides
//! it as the table does for that identity: the class is the one the decision would find (the
//! first holding the identity), and a verdict found in a slot, a class record or the address
//! map is the one the table's first matching row gives. Everything after the identity
//! (conntrack, proxies, events, which carry the identity the address has) is the same code.
//!
//! The program is thus valid for the host entries it was generated from
//! ([`Generated::inlined`]): when an address it holds changes identity or leaves the host map,
//! the program must be generated again and replace the old one; until then it decides that
//! address as it would have with the old host map, as a program of the previous generation
//! does until it is replaced. An address added for an identity a row names needs nothing: it
//! misses and takes the lookup, which finds it.
//!
//! # L7 proxies
//! Designed after Cilium's bpf/lib/proxy.h (`__ctx_redirect_to_proxy`, `assign_socket_tcp`) and
//! its hairpin for the ingress side (bpf/lib/proxy_hairpin.h); ports and marks are the
//! contract of `cnpc_ir::proxy::contract`. No NAT: the proxy accepts the connection with its
//! original addresses (a transparent socket) and reads the destination from the accepted
//! socket's local address.
//! - **Egress** programs run at tc ingress of the endpoint's host-side veth, where
//!   `bpf_sk_assign` is allowed. A Proxy verdict sets `skb->mark` to [`TO_PROXY_MARK`] (the
//!   loader routes that mark to a local table, which delivers the packet to the assigned
//!   socket), looks up the socket of the packet's own tuple (`bpf_skc_lookup_tcp`, an
//!   established proxy connection; a LISTEN or TIME_WAIT socket found that way is released and
//!   skipped), then the egress proxy's listener (`bpf_sk_lookup_tcp` with destination port
//!   [`contract::EGRESS_PROXY_PORT`]; a wildcard listener matches any address), assigns it and
//!   releases the reference.
//! - **UDP at egress** (DNS) is handed over the same way to the DNS proxy's UDP socket, as
//!   Cilium's `assign_socket_udp` (bpf/lib/proxy.h) does: `bpf_sk_lookup_udp` with the packet's
//!   addresses and destination port [`contract::EGRESS_PROXY_PORT`] (an unconnected socket
//!   bound to the wildcard address on that port matches), `bpf_sk_assign`, `bpf_sk_release`.
//!   There is no lookup of the packet's own tuple first: the proxy takes every datagram on that
//!   one socket, and reads each one's original destination with IP_RECVORIGDSTADDR; the own
//!   tuple could instead find a node socket on the original port (a DNS server of the node) and
//!   hand the pod's query to it. The flow is recorded with [`CT_FLAG_PROXIED`] as a TCP
//!   connection is, so its later datagrams keep going to the proxy, and the answer, which the
//!   proxy sends from the original destination's address and port, passes the pod's ingress
//!   program as a reply. UDP at ingress is not proxied (DNS rules exist only on egress).
//! - **Ingress** programs run at tc egress of the veth, where `bpf_sk_assign` is refused
//!   (-EOPNOTSUPP). A Proxy verdict sets the mark, or'ed with the peer's identity when it fits
//!   [`contract::MARK_IDENTITY_MASK`] (0 otherwise: the ingress proxy reads the source identity
//!   from the accepted socket's mark), and redirects the packet
//!   (`bpf_redirect(ifindex, BPF_F_INGRESS)`, TC_ACT_REDIRECT) to the receive path of the
//!   loader's proxy device, named by the [`PROXY_CONFIG_MAP`] map; there
//!   [`proxy_device_program`] assigns it to the listener on [`contract::INGRESS_PROXY_PORT`].
//! - **Fail closed**: no proxy socket, a failed assignment, or no proxy device (ifindex 0)
//!   drops the packet and emits a drop event (verdict 1, the Proxy row). TCP is proxied in
//!   both directions and UDP at egress; a Proxy verdict on UDP at ingress, SCTP or anything
//!   else drops without a handoff. The mark is set either way: it says the table proxies the
//!   packet.
//! - **Conntrack**: a connection is recorded only once the proxy has its first packet, with
//!   [`CT_FLAG_PROXIED`] in the value's flags word. A packet in the opening direction whose
//!   entry has the flag goes to the proxy whatever the table says now (every tracked program
//!   checks it, also one whose table has no Proxy row), so a new generation never splices a
//!   live proxied connection back onto the direct path; the proxy judges each request against
//!   the current generation. A connection opened directly that a new table proxies gets the
//!   flag and is handed over too (the proxy's stack resets it: it never accepted it). Replies
//!   (entries the other side opened) pass as for any connection.
//! - **Traffic from the proxies** leaves from the node's address with the socket mark
//!   `FROM_EGRESS_PROXY | source identity` or `FROM_INGRESS_PROXY | source identity`. Ingress
//!   programs read it before the ipcache: `FROM_INGRESS_PROXY` is the endpoint's own ingress
//!   proxy, which judged the connection already: it passes without the table and is recorded
//!   (opened by ingress) so the endpoint's replies pass; `FROM_EGRESS_PROXY` is decided by the
//!   table with the identity from `mark & MARK_IDENTITY_MASK` instead of the ipcache (which
//!   would say host). Egress programs ignore marks.
//! - **Why a pod cannot forge these marks**: a pod's packets reach the host only through its
//!   veth, and `veth_xmit` hands them over with `veth_forward_skb` → `__dev_forward_skb` →
//!   `____dev_forward_skb` (include/linux/netdevice.h), which calls
//!   `skb_scrub_packet(skb, !net_eq(dev_net(dev), dev_net(skb->dev)))`; crossing into another
//!   network namespace (`xnet`), `skb_scrub_packet` (net/core/skbuff.c) sets `skb->mark = 0`.
//!   Marks survive only within one namespace (kernel commit ff70202b2d1a, "dev_forward_skb: do
//!   not scrub skb mark within the same name space"). Within the host namespace, setting
//!   `SO_MARK` takes CAP_NET_ADMIN (or CAP_NET_RAW) there: host-network processes, which
//!   Cilium trusts as the host identity too. Packets from other nodes arrive with no mark.
//!
//! # Events
//! A verdict event ([`EVENT_SIZE`] bytes, layout in [`event`]) goes to the `events` ring buffer for
//! every dropped packet and for every connection a packet opens, as Cilium's policy verdict
//! notifications do; packets of established connections emit nothing, which keeps the fast path
//! free of ring-buffer traffic.
//!
//! # Deciding
//! The generator picks the form of the decision by the table's size ([`Strategy`]): compare
//! chains for a few peers, binary-search trees over identities and port ranges for up to
//! [`TREE_MAX_MEMBERS`] peers and [`TREE_MAX_SEGMENTS`] port segments, and map lookups beyond:
//! (identity, protocol, port) in a hash map for single ports, then an LPM trie whose port prefixes
//! cover each range exactly; keyed by class after an identity-to-class lookup when that takes
//! less than half the bytes ([`map_keys`]): a range is one record per aligned prefix, so keying
//! it by identity multiplies those by the members of its class, while keying by class costs
//! one record per member once. Code size is bounded either way, so no program needs tail calls to
//! stay under the verifier's limits.

use crate::asm::{Asm, Label, Program};
use crate::elf::MapDef;
use crate::insn::*;
use cnpc_ir::proxy::contract;
use cnpc_ir::{DecisionTable, Direction, IpNet, NumericIdentity, Protocol, TableVerdict};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::net::IpAddr;

mod address;
use address::by_address;
pub use address::{
    HostAddresses, Inline, ADDRESS_CLASS_MAP_PREFIX, ADDRESS_MAP_PREFIX, ADDRESS_WINDOW_MAP_PREFIX,
    INLINE_MAX_ADDRESSES, INLINE_MAX_MAP_RECORDS, INLINE_MAX_WINDOWS, INLINE_MAX_WINDOW_SLOTS,
    WINDOW_CLASS_ENTRIES, WINDOW_SLOTS_PER_ADDRESS,
};

pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;
/// What `bpf_redirect` returns when its flags are valid; tc then does the redirect.
pub const TC_ACT_REDIRECT: i32 = 7;
/// `skb->mark` of packets handed to an L7 proxy ([`contract::TO_PROXY_MARK`]).
pub const TO_PROXY_MARK: i32 = contract::TO_PROXY_MARK as i32;
/// The former name of [`TO_PROXY_MARK`].
pub const PROXY_MARK: i32 = TO_PROXY_MARK;
/// IPv6 extension headers skipped before giving up (and dropping).
pub const MAX_EXT_HEADERS: usize = 4;
/// The identity of addresses the ipcache does not know (reserved:world).
pub const WORLD: i32 = 2;

/// Layout of an `ipcache` key: a 32-bit prefix length, then 20 bytes of data: the address family
/// (4 or 6, one 32-bit word) and the address (IPv4 in the first four bytes).
pub const IPCACHE_KEY_SIZE: u32 = 24;
pub const IPCACHE_VALUE_SIZE: u32 = 4;
pub const IPCACHE_MAP: &str = "ipcache";
/// Host addresses (/32 and /128) of endpoints and nodes, the most common ipcache entries, live
/// in a hash map beside the LPM trie: an exact lookup costs a fraction of a trie walk, and a
/// host entry is always the longest prefix for its address, so looking there first changes no
/// answer. A CIDR rule's /32 stays in the trie (its identity is local scope), so an address a
/// DNS answer taught ([`FQDN_MAP`], looked up in between) gets its FQDN identity, which carries
/// that prefix too. Key: the ipcache key without its prefix length (`u32 family, u8[16]
/// address`); value `u32 identity`.
pub const HOSTS_MAP: &str = "ipcache_hosts";
pub const HOSTS_KEY_SIZE: u32 = 20;
/// Addresses learned from DNS answers and their FQDN identities (numbers from
/// `cnpc_ir::FIRST_FQDN_IDENTITY` up): a hash map with the [`HOSTS_MAP`] key layout (`u32
/// family, u8[16] address`) and value `u32 identity`. Unlike the ipcache maps, which belong to
/// a generation, it is shared by every generation, as `ct` is: the loader writes an address
/// when the DNS proxy learns it and the identity stays the same across generations, so a
/// generation switch neither forgets learned addresses nor waits for DNS to repeat them.
/// Looked up after the host entries (an endpoint or node keeps its own identity even when a
/// name resolves to it) and before the prefixes (an address learned for a name is selected by
/// its toFQDNs rules, and its identity carries its longest CIDR prefix too).
///
/// A value with [`FQDN_ZOMBIE`] set is an address whose names' TTLs ended while connections
/// to it remain (Cilium's zombies, pkg/fqdn/namemanager): its identity still decides packets of
/// connections in `ct`; any other packet is decided as if the address had never been learned
/// (its prefix or the world), so toFQDNs rules open nothing new to it and every other rule
/// decides it as before.
pub const FQDN_MAP: &str = "fqdn";
/// Entries of the [`FQDN_MAP`]: learned addresses a node holds at once.
pub const FQDN_MAX_ENTRIES: u32 = 65_536;
/// The zombie bit of an [`FQDN_MAP`] value (identities are below 2^31).
pub const FQDN_ZOMBIE: u32 = 1 << 31;

/// The conntrack map: LRU hash, key `u8[16] local address, u8[16] peer address, be16 local
/// port, be16 peer port, u8 protocol, u8 family (4 or 6), u16 zero`; value `u32 opened by`
/// ([`CT_OPENED_BY_EGRESS`] or [`CT_OPENED_BY_INGRESS`]), `u32 flags` ([`CT_FLAG_PROXIED`]; other
/// bits zero).
pub const CT_MAP: &str = "ct";
pub const CT_KEY_SIZE: u32 = 40;
pub const CT_VALUE_SIZE: u32 = 8;
pub const CT_MAX_ENTRIES: u32 = 65_536;
/// The endpoint opened the connection (its egress program allowed the first packet).
pub const CT_OPENED_BY_EGRESS: u32 = 1;
/// A peer opened the connection (the endpoint's ingress program allowed the first packet).
pub const CT_OPENED_BY_INGRESS: u32 = 2;
/// Flag of a connection handed to an L7 proxy: its packets in the opening direction keep going
/// to the proxy whatever the table says later (see the module doc, "L7 proxies").
pub const CT_FLAG_PROXIED: u32 = 1;

/// The proxy configuration, one entry shared by every program: ARRAY, key `u32 0`, value
/// `u32 proxy device ifindex` (0: no proxy device, so ingress Proxy verdicts drop) and
/// `u32 zero[3]` reserved for later fields. The loader creates, pins and fills it.
pub const PROXY_CONFIG_MAP: &str = "proxy_config";
pub const PROXY_CONFIG_VALUE_SIZE: u32 = 16;
/// Offset of the proxy device's ifindex in the `proxy_config` value.
pub const PROXY_CONFIG_IFINDEX: i16 = 0;
/// The section name of the proxy device's program ([`proxy_device_program`]) in cnpc's ELF
/// objects.
pub const PROXY_DEVICE_SECTION: &str = "classifier/proxy_device";

/// The ring buffer of verdict events.
pub const EVENTS_MAP: &str = "events";
pub const EVENTS_BYTES: u32 = 256 * 1024;
pub const EVENT_SIZE: usize = 56;

/// Field offsets of a verdict event (little-endian):
/// `u32 subject identity, u32 peer identity, u32 row (index into the table's rows; u32::MAX for
/// the default), u16 port (host order; ICMP type), u8 protocol, u8 verdict (0 allowed, 1
/// denied, 2 proxied), u8 direction (0 ingress, 1 egress), u8 family (4 or 6), u16 zero, u32
/// zero, u8[16] subject address, u8[16] peer address` (an IPv4 address in the first four bytes,
/// the rest zero). The addresses let a reader name the pod and the peer of a flow
/// (`cnpc observe`); identities alone stand for many pods.
pub mod event {
    pub const SUBJECT: usize = 0;
    pub const PEER: usize = 4;
    pub const ROW: usize = 8;
    pub const PORT: usize = 12;
    pub const PROTOCOL: usize = 14;
    pub const VERDICT: usize = 15;
    pub const DIRECTION: usize = 16;
    pub const FAMILY: usize = 17;
    pub const SUBJECT_ADDRESS: usize = 24;
    pub const PEER_ADDRESS: usize = 40;
}

/// Peers up to which identities are matched by a compare chain.
pub const CHAIN_MAX_MEMBERS: usize = 8;
/// Peers and port segments up to which the decision is a binary-search tree in code.
pub const TREE_MAX_MEMBERS: usize = 64;
pub const TREE_MAX_SEGMENTS: usize = 256;

// Map types and flags (include/uapi/linux/bpf.h).
pub const BPF_MAP_TYPE_HASH: u32 = 1;
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
pub const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
pub const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
pub const BPF_MAP_TYPE_RINGBUF: u32 = 27;
pub const BPF_F_NO_PREALLOC: u32 = 1;

// Helpers (enum bpf_func_id, include/uapi/linux/bpf.h); check.rs knows their arguments.
const MAP_LOOKUP_ELEM: i32 = 1;
const MAP_UPDATE_ELEM: i32 = 2;
const REDIRECT: i32 = 23;
const SKB_CHANGE_TYPE: i32 = 32;
const SK_LOOKUP_TCP: i32 = 84;
const SK_LOOKUP_UDP: i32 = 85;
const SK_RELEASE: i32 = 86;
const SKC_LOOKUP_TCP: i32 = 99;
const SK_ASSIGN: i32 = 124;
const RINGBUF_OUTPUT: i32 = 130;

// struct __sk_buff offsets (include/uapi/linux/bpf.h).
const SKB_MARK: i16 = 8;
const SKB_DATA: i16 = 76;
const SKB_DATA_END: i16 = 80;
// struct bpf_sock: the TCP state (BPF_TCP_*), readable through a sock_common pointer.
const SOCK_STATE: i16 = 72;
const BPF_TCP_TIME_WAIT: i32 = 6;
const BPF_TCP_LISTEN: i32 = 10;
/// The `netns` argument of the socket lookups: the network namespace of the packet's device.
const BPF_F_CURRENT_NETNS: i32 = -1;
/// `bpf_redirect` flag: deliver on the target device's receive path.
const BPF_F_INGRESS: i32 = 1;
/// `skb->pkt_type` for a frame addressed to this host (include/uapi/linux/if_packet.h).
const PACKET_HOST: i32 = 0;
/// `struct bpf_sock_tuple` sizes: IPv4 (addresses, ports) and IPv6.
const TUPLE_V4: i32 = 12;
const TUPLE_V6: i32 = 36;

// Registers kept across helper calls.
const CTX: Reg = R6;
const DATA: Reg = R7;
const DATA_END: Reg = R8;
const PROTO: Reg = R9;
// Stack slots (offsets from r10).
const KEY: i16 = -24; // ipcache key, 24 bytes
const PORT: i16 = -32; // u32: destination port or ICMP type, host order
const CT: i16 = -72; // conntrack key, 40 bytes
const EVT: i16 = -232; // event, 56 bytes (EVENT_SIZE)
const CTVAL: i16 = -104; // conntrack value, 8 bytes
const RET: i16 = -108; // u32: the return code on the event path
const SCRATCH: i16 = -120; // map keys of the decision, up to 12 bytes
const TUPLE: i16 = -160; // struct bpf_sock_tuple of a socket lookup, 36 bytes
const HANDOFF_NEW: i16 = -164; // u32: the handoff opens a connection (1) or continues one (0)
const ZOMBIE: i16 = -168; // u32: a zombie's fqdn map value, while identity_lookup uses it
/// The key of the address map (24 bytes), built before the decision: TUPLE's bytes are free
/// until a handoff, which comes after it.
const ADDR_KEY: i16 = TUPLE;

/// How a program decides, chosen by the table's size; `cnpc verify` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Strategy {
    /// No rows: the default alone, no peer lookup.
    Constant,
    /// Compare chains over identities and port ranges.
    Branches,
    /// Binary-search trees over identities and port ranges.
    BinarySearch,
    /// Hash-map and LPM-trie lookups of (peer, protocol, port or port prefix), the peer being
    /// its identity or, after an identity-to-class hash lookup, its class ([`MapKeys`]).
    Maps,
    /// Cilium's way, for the datapath benchmark: hash lookups of (identity, port, protocol),
    /// then (identity, any port, protocol), then (identity, any), then (any).
    HashBaseline,
    /// Parses the headers and returns: the benchmark's floor.
    ParseOnly,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Constant => "constant",
            Strategy::Branches => "branches",
            Strategy::BinarySearch => "binary-search",
            Strategy::Maps => "maps",
            Strategy::HashBaseline => "hash-baseline",
            Strategy::ParseOnly => "parse-only",
        }
    }
}

/// A map record: key bytes, value bytes.
pub type Record = (Vec<u8>, Vec<u8>);

/// A map a program reads beside the shared ones, with its contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapImage {
    pub def: MapDef,
    /// (key, value) records, sorted by key.
    pub records: Vec<Record>,
    /// The key and value layouts, for the manifest.
    pub key_layout: &'static str,
    pub value_layout: &'static str,
}

/// A generated program and what it needs.
#[derive(Clone, Debug)]
pub struct Generated {
    pub program: Program,
    pub strategy: Strategy,
    /// Maps of this program's own, named by a hash of their contents (so identical tables still
    /// give identical programs).
    pub maps: Vec<MapImage>,
    /// The host addresses whose identity the program holds in its code or maps instead of
    /// reading the ipcache ([`generate_inlined`]), sorted: while the [`HOSTS_MAP`] gives each
    /// of them this identity, the program decides exactly as one that looks them up. Empty
    /// for programs generated without host addresses.
    pub inlined: Vec<(IpAddr, NumericIdentity)>,
}

/// The maps every program shares.
pub fn shared_maps(ipcache_entries: usize) -> Vec<MapDef> {
    vec![
        MapDef {
            name: IPCACHE_MAP.into(),
            map_type: BPF_MAP_TYPE_LPM_TRIE,
            key_size: IPCACHE_KEY_SIZE,
            value_size: IPCACHE_VALUE_SIZE,
            max_entries: (ipcache_entries as u32).saturating_mul(2).max(65_536),
            flags: BPF_F_NO_PREALLOC,
        },
        MapDef {
            name: HOSTS_MAP.into(),
            map_type: BPF_MAP_TYPE_HASH,
            key_size: HOSTS_KEY_SIZE,
            value_size: IPCACHE_VALUE_SIZE,
            max_entries: (ipcache_entries as u32).saturating_mul(2).max(65_536),
            flags: 0,
        },
        MapDef {
            name: FQDN_MAP.into(),
            map_type: BPF_MAP_TYPE_HASH,
            key_size: HOSTS_KEY_SIZE,
            value_size: IPCACHE_VALUE_SIZE,
            max_entries: FQDN_MAX_ENTRIES,
            flags: 0,
        },
        MapDef {
            name: CT_MAP.into(),
            map_type: BPF_MAP_TYPE_LRU_HASH,
            key_size: CT_KEY_SIZE,
            value_size: CT_VALUE_SIZE,
            max_entries: CT_MAX_ENTRIES,
            flags: 0,
        },
        MapDef {
            name: EVENTS_MAP.into(),
            map_type: BPF_MAP_TYPE_RINGBUF,
            key_size: 0,
            value_size: 0,
            max_entries: EVENTS_BYTES,
            flags: 0,
        },
        MapDef {
            name: PROXY_CONFIG_MAP.into(),
            map_type: BPF_MAP_TYPE_ARRAY,
            key_size: 4,
            value_size: PROXY_CONFIG_VALUE_SIZE,
            max_entries: 1,
            flags: 0,
        },
    ]
}

/// The `proxy_config` record that names the proxy device (`ifindex` 0: none).
pub fn proxy_config_record(ifindex: u32) -> Record {
    let mut value = vec![0u8; PROXY_CONFIG_VALUE_SIZE as usize];
    value[..4].copy_from_slice(&ifindex.to_le_bytes());
    (0u32.to_le_bytes().to_vec(), value)
}

/// Whether the programs of an endpoint whose tables are `tables` (both directions) must track
/// connections: unless every direction allows everything, a reply may need the ct map.
pub fn needs_tracking<'a>(tables: impl IntoIterator<Item = &'a DecisionTable>) -> bool {
    tables
        .into_iter()
        .any(|t| !(t.rows.is_empty() && t.default == TableVerdict::Allow))
}

fn ip_proto(p: Protocol) -> i32 {
    i32::from(p.number())
}

/// Bounds check: `if base + end_off > DATA_END goto fail`.
/// Checks the IPv4 header after the Ethernet header (the fixed header inside the packet,
/// version 4, IHL at least 5) and leaves its length in bytes in `len`; `tmp` is clobbered.
fn ipv4_header_len(a: &mut Asm, len: Reg, tmp: Reg, drop: Label) {
    need(a, DATA, 34, drop);
    a.load(Size::B, len, DATA, 14);
    a.mov(tmp, Src::Reg(len))
        .alu(AluOp::And, tmp, Src::Imm(0xf0))
        .jump_if(Cond::Ne, tmp, Src::Imm(0x40), drop);
    a.alu(AluOp::And, len, Src::Imm(0x0f))
        .jump_if(Cond::Lt, len, Src::Imm(5), drop);
    a.alu(AluOp::Lsh, len, Src::Imm(2));
}

fn need(a: &mut Asm, base: Reg, end_off: i32, fail: Label) {
    a.mov(R2, Src::Reg(base))
        .alu(AluOp::Add, R2, Src::Imm(end_off))
        .jump_if(Cond::Gt, R2, Src::Reg(DATA_END), fail);
}

/// The classifier for `table` (its direction says which address is the peer's), tracking
/// connections when `track` (see [`needs_tracking`]).
pub fn generate(table: &DecisionTable, track: bool) -> Generated {
    build(table, track, strategy_for(table, track))
}

/// [`generate`], deciding the peers at `inline.hosts`' addresses without the ipcache lookup
/// (module doc, "Peers by address"). The program is valid while the [`HOSTS_MAP`] gives every
/// address of [`Generated::inlined`] that identity: when one of them changes identity or leaves
/// the map, the program must be generated again and replace this one.
pub fn generate_inlined(table: &DecisionTable, track: bool, inline: &Inline) -> Generated {
    build_inner(table, track, strategy_for(table, track), None, Some(inline))
}

/// [`build`] with peers decided by address as in [`generate_inlined`] (tests and benchmarks
/// compare forms); [`Strategy::HashBaseline`] and [`Strategy::ParseOnly`] ignore `inline`.
pub fn build_inlined(
    table: &DecisionTable,
    track: bool,
    strategy: Strategy,
    inline: &Inline,
) -> Generated {
    build_inner(table, track, strategy, None, Some(inline))
}

fn strategy_for(table: &DecisionTable, track: bool) -> Strategy {
    // A Proxy default needs the parsed packet to find the proxy's socket: no constant program.
    let proxy_default = matches!(table.default, TableVerdict::Proxy(_));
    if table.rows.is_empty() && !track && !proxy_default {
        Strategy::Constant
    } else {
        choose(table)
    }
}

/// The strategy the generator picks for `table`'s rows.
pub fn choose(table: &DecisionTable) -> Strategy {
    let members: usize = table.classes.iter().map(|c| c.members.len()).sum();
    let segments = segments(table).values().map(Vec::len).max().unwrap_or(0);
    // Immediates are sign-extended 32-bit values: identities from 2^31 up need a map.
    let small_ids = table
        .classes
        .iter()
        .flat_map(|c| &c.members)
        .all(|m| m.0 < 1 << 31);
    if !small_ids || members > TREE_MAX_MEMBERS || segments > TREE_MAX_SEGMENTS {
        Strategy::Maps
    } else if members <= CHAIN_MAX_MEMBERS && segments <= 4 {
        Strategy::Branches
    } else {
        Strategy::BinarySearch
    }
}

/// A port segment of one (class, protocol): `[lo, hi]` decided by row `row` (first match wins,
/// as in [`DecisionTable::lookup`]). Segments of one key are disjoint and sorted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    lo: u16,
    hi: u16,
    row: usize,
}

/// The rows of `table` as disjoint port segments per (class, protocol).
fn segments(table: &DecisionTable) -> BTreeMap<(u32, Protocol), Vec<Segment>> {
    let mut out: BTreeMap<(u32, Protocol), Vec<Segment>> = BTreeMap::new();
    for (i, row) in table.rows.iter().enumerate() {
        let segs = out.entry((row.class, row.protocol)).or_default();
        // The part of the row's range no earlier row of the key covers.
        let mut pieces = vec![(u32::from(row.ports.lo), u32::from(row.ports.hi))];
        for s in segs.iter() {
            let (slo, shi) = (u32::from(s.lo), u32::from(s.hi));
            pieces = pieces
                .into_iter()
                .flat_map(|(lo, hi)| {
                    let mut left = Vec::new();
                    if lo < slo {
                        left.push((lo, hi.min(slo - 1)));
                    }
                    if hi > shi {
                        left.push((lo.max(shi + 1), hi));
                    }
                    if hi < slo || lo > shi {
                        left = vec![(lo, hi)];
                    }
                    left
                })
                .collect();
        }
        segs.extend(pieces.into_iter().map(|(lo, hi)| Segment {
            lo: lo as u16,
            hi: hi as u16,
            row: i,
        }));
        segs.sort_by_key(|s| s.lo);
    }
    out
}

/// Entry points of the verdict code the decision jumps to, with the row index in r3.
/// Only the tails something jumps to are emitted: the kernel rejects unreachable code.
struct Tails {
    allow: Label,
    deny: Label,
    proxy: Label,
    used: std::cell::Cell<[bool; 3]>,
}

impl Tails {
    fn new(a: &mut Asm) -> Tails {
        Tails {
            allow: a.label(),
            deny: a.label(),
            proxy: a.label(),
            used: Default::default(),
        }
    }

    /// The tail of `verdict`, marked used.
    fn of(&self, verdict: &TableVerdict) -> Label {
        let (i, l) = match verdict {
            TableVerdict::Allow => (0, self.allow),
            TableVerdict::Deny => (1, self.deny),
            TableVerdict::Proxy(_) => (2, self.proxy),
        };
        let mut used = self.used.get();
        used[i] = true;
        self.used.set(used);
        l
    }

    /// Jumps to the tail of the verdict read from a map: r1 (0 allow, 1 deny, 2 proxy).
    fn dispatch(&self, a: &mut Asm) {
        a.jump_if(Cond::Eq, R1, Src::Imm(0), self.of(&TableVerdict::Allow));
        a.jump_if(Cond::Eq, R1, Src::Imm(1), self.of(&TableVerdict::Deny));
        a.goto(self.of(&TableVerdict::Proxy(Vec::new())));
    }
}

fn verdict_jump(a: &mut Asm, tails: &Tails, verdict: &TableVerdict, row: Option<usize>) {
    let row = row.map_or(-1, |r| r as i32);
    a.mov(R3, Src::Imm(row));
    a.goto(tails.of(verdict));
}

/// The program for `table` decided the `strategy` way; [`generate`] picks the strategy (and,
/// for maps, how they are keyed: [`map_keys`]).
pub fn build(table: &DecisionTable, track: bool, strategy: Strategy) -> Generated {
    build_inner(table, track, strategy, None, None)
}

/// [`build`] with the maps of [`Strategy::Maps`] keyed the `keys` way whatever their sizes
/// (tests and benchmarks compare the layouts); other strategies ignore `keys`.
pub fn build_keyed(
    table: &DecisionTable,
    track: bool,
    strategy: Strategy,
    keys: MapKeys,
) -> Generated {
    build_inner(table, track, strategy, Some(keys), None)
}

fn build_inner(
    table: &DecisionTable,
    track: bool,
    strategy: Strategy,
    keys: Option<MapKeys>,
    inline: Option<&Inline>,
) -> Generated {
    let strategy = match (strategy, &table.default) {
        // Handing a packet to the proxy takes the parsed packet: see `generate`.
        (Strategy::Constant, TableVerdict::Proxy(_)) => Strategy::Branches,
        (s, _) => s,
    };
    if strategy == Strategy::Constant {
        return Generated {
            program: constant(&table.default),
            strategy,
            maps: Vec::new(),
            inlined: Vec::new(),
        };
    }
    let mut a = Asm::new();
    let egress = table.direction == Direction::Egress;
    let drop = a.label();
    let pass = a.label();
    let ipv4 = a.label();
    let ipv6 = a.label();
    let l4 = a.label();
    let lookup = a.label();

    a.mov(CTX, Src::Reg(R1));
    a.load(Size::W, DATA, CTX, SKB_DATA)
        .load(Size::W, DATA_END, CTX, SKB_DATA_END);
    need(&mut a, DATA, 14, drop);
    a.load(Size::H, R3, DATA, 12);
    a.jump_if(Cond::Eq, R3, Src::Imm(0x0008), ipv4); // 0x0800 read little-endian
    a.jump_if(Cond::Eq, R3, Src::Imm(0xdd86), ipv6); // 0x86dd
    a.goto(pass);

    // IPv4: R4 = L4 header offset from DATA.
    a.bind(ipv4);
    ipv4_header_len(&mut a, R3, R4, drop);
    a.load(Size::B, PROTO, DATA, 23);
    // Fragment offset (13 bits after the flags): non-zero means no L4 header here.
    a.load(Size::H, R4, DATA, 20)
        .push(Insn::ToBe { dst: R4, bits: 16 })
        .alu(AluOp::And, R4, Src::Imm(0x1fff))
        .jump_if(Cond::Ne, R4, Src::Imm(0), drop);
    let (local, peer) = if egress { (26, 30) } else { (30, 26) };
    a.store(Size::W, R10, KEY, Src::Imm(64)); // prefix length: family word + 32 address bits
    a.store(Size::W, R10, KEY + 4, Src::Imm(4));
    a.load(Size::W, R5, DATA, peer)
        .store(Size::W, R10, KEY + 8, Src::Reg(R5))
        .store(Size::W, R10, CT + 16, Src::Reg(R5));
    a.load(Size::W, R5, DATA, local)
        .store(Size::W, R10, CT, Src::Reg(R5));
    for off in [12, 16, 20] {
        a.store(Size::W, R10, KEY + off, Src::Imm(0));
    }
    for off in [4, 8, 12, 20, 24, 28] {
        a.store(Size::W, R10, CT + off, Src::Imm(0));
    }
    a.store(Size::W, R10, CT + 36, Src::Imm(4 << 8)); // family byte; protocol set below
    a.mov(R4, Src::Reg(R3)).alu(AluOp::Add, R4, Src::Imm(14));
    a.goto(l4);

    // IPv6: fixed header, then extension headers.
    a.bind(ipv6);
    need(&mut a, DATA, 54, drop);
    a.load(Size::B, PROTO, DATA, 20);
    let (local, peer) = if egress { (22, 38) } else { (38, 22) };
    a.store(Size::W, R10, KEY, Src::Imm(160)); // family word + 128 address bits
    a.store(Size::W, R10, KEY + 4, Src::Imm(6));
    for w in 0..4 {
        a.load(Size::W, R5, DATA, peer + 4 * w)
            .store(Size::W, R10, KEY + 8 + 4 * w, Src::Reg(R5))
            .store(Size::W, R10, CT + 16 + 4 * w, Src::Reg(R5));
        a.load(Size::W, R5, DATA, local + 4 * w)
            .store(Size::W, R10, CT + 4 * w, Src::Reg(R5));
    }
    a.store(Size::W, R10, CT + 36, Src::Imm(6 << 8));
    a.mov(R4, Src::Imm(54));
    for _ in 0..MAX_EXT_HEADERS {
        let not_ext = a.label();
        let plain = a.label();
        let next = a.label();
        // R3 = pointer to the extension header.
        a.jump_if(Cond::Eq, PROTO, Src::Imm(44), plain); // fragment header: fixed 8 bytes
        a.jump_if(Cond::Eq, PROTO, Src::Imm(0), plain);
        a.jump_if(Cond::Eq, PROTO, Src::Imm(43), plain);
        a.jump_if(Cond::Eq, PROTO, Src::Imm(60), plain);
        a.goto(not_ext);
        a.bind(plain);
        a.mov(R3, Src::Reg(DATA)).alu(AluOp::Add, R3, Src::Reg(R4));
        need(&mut a, R3, 8, drop);
        a.jump_if(Cond::Ne, PROTO, Src::Imm(44), next);
        // Fragment: the offset (13 bits) must be zero, as for IPv4.
        a.load(Size::H, R5, R3, 2)
            .push(Insn::ToBe { dst: R5, bits: 16 })
            .alu(AluOp::And, R5, Src::Imm(0xfff8))
            .jump_if(Cond::Ne, R5, Src::Imm(0), drop);
        a.load(Size::B, PROTO, R3, 0)
            .alu(AluOp::Add, R4, Src::Imm(8));
        a.goto(not_ext);
        a.bind(next);
        a.load(Size::B, R5, R3, 1)
            .alu(AluOp::Add, R5, Src::Imm(1))
            .alu(AluOp::Lsh, R5, Src::Imm(3));
        a.load(Size::B, PROTO, R3, 0)
            .alu(AluOp::Add, R4, Src::Reg(R5));
        a.bind(not_ext);
    }
    // Still an extension header after the last one skipped: give up.
    for ext in [0, 43, 60, 44] {
        a.jump_if(Cond::Eq, PROTO, Src::Imm(ext), drop);
    }

    // L4: R4 = header offset. Ports for TCP/UDP/SCTP, the type for ICMP; 0 otherwise.
    a.bind(l4);
    let ports = a.label();
    let icmp = a.label();
    a.store(Size::W, R10, PORT, Src::Imm(0));
    a.store(Size::W, R10, CT + 32, Src::Imm(0));
    a.store(Size::B, R10, CT + 36, Src::Reg(PROTO));
    for p in [6, 17, 132] {
        a.jump_if(Cond::Eq, PROTO, Src::Imm(p), ports);
    }
    a.jump_if(Cond::Eq, PROTO, Src::Imm(1), icmp);
    a.jump_if(Cond::Eq, PROTO, Src::Imm(58), icmp);
    a.goto(lookup);
    a.bind(ports);
    a.mov(R3, Src::Reg(DATA)).alu(AluOp::Add, R3, Src::Reg(R4));
    need(&mut a, R3, 4, drop);
    // Ports as on the wire for the conntrack key: the endpoint's first.
    let (local_port, peer_port) = if egress { (0, 2) } else { (2, 0) };
    a.load(Size::H, R5, R3, local_port)
        .store(Size::H, R10, CT + 32, Src::Reg(R5));
    a.load(Size::H, R5, R3, peer_port)
        .store(Size::H, R10, CT + 34, Src::Reg(R5));
    a.load(Size::H, R5, R3, 2)
        .push(Insn::ToBe { dst: R5, bits: 16 })
        .store(Size::W, R10, PORT, Src::Reg(R5));
    a.goto(lookup);
    a.bind(icmp);
    a.mov(R3, Src::Reg(DATA)).alu(AluOp::Add, R3, Src::Reg(R4));
    need(&mut a, R3, 1, drop);
    a.load(Size::B, R5, R3, 0)
        .store(Size::W, R10, PORT, Src::Reg(R5));
    a.goto(lookup);

    // Out of line, within short reach of the parser's checks.
    a.bind(drop);
    a.ret(TC_ACT_SHOT);
    a.bind(pass);
    a.ret(TC_ACT_OK);

    // Peer identity: R1 = ipcache[key] or the world.
    a.bind(lookup);
    if strategy == Strategy::ParseOnly {
        a.ret(TC_ACT_OK);
        return Generated {
            // The assembler fails only on unbound labels and over-long jumps; see below.
            program: a.finish().expect("generated code assembles"),
            strategy,
            maps: Vec::new(),
            inlined: Vec::new(),
        };
    }
    let found = a.label();
    let decide = a.label();
    // Ingress: traffic of the node's proxies carries their mark (module doc, "L7 proxies").
    let trusted = (!egress).then(|| a.label());
    if let Some(trusted) = trusted {
        let ipcache = a.label();
        a.load(Size::W, R1, CTX, SKB_MARK);
        a.mov(R2, Src::Reg(R1))
            .alu(AluOp::And, R2, Src::Imm(contract::MARK_MAGIC_MASK as i32));
        a.jump_if(
            Cond::Eq,
            R2,
            Src::Imm(contract::FROM_INGRESS_PROXY as i32),
            trusted,
        );
        a.jump_if(
            Cond::Ne,
            R2,
            Src::Imm(contract::FROM_EGRESS_PROXY as i32),
            ipcache,
        );
        a.alu(
            AluOp::And,
            R1,
            Src::Imm(contract::MARK_IDENTITY_MASK as i32),
        );
        a.goto(decide);
        a.bind(ipcache);
    }
    let tails = Tails::new(&mut a);
    let mut maps = Vec::new();
    let mut inlined = Vec::new();
    if let (Some(inline), false) = (inline, strategy == Strategy::HashBaseline) {
        let (m, peers) = by_address(&mut a, table, inline, &tails, decide);
        maps.extend(m);
        inlined = peers;
    }
    identity_lookup(&mut a, found, decide);
    a.mov(R1, Src::Imm(WORLD)).goto(decide);
    a.bind(found);
    a.load(Size::W, R1, R0, 0);
    a.bind(decide);
    // A zombie's value (identity_lookup) carries FQDN_ZOMBIE.
    a.alu(AluOp::And, R1, Src::Imm(!FQDN_ZOMBIE as i32));
    a.store(Size::W, R10, EVT + event::PEER as i16, Src::Reg(R1));
    // R1 = identity, R2 = port, PROTO = protocol.
    a.load(Size::W, R2, R10, PORT);
    maps.extend(match strategy {
        Strategy::HashBaseline => baseline_decision(&mut a, table, &tails),
        _ => decision(&mut a, table, strategy, keys, &tails),
    });
    verdict_tails(&mut a, &tails, egress, track, trusted);
    Generated {
        // The assembler fails only on an unbound label (every label above is bound) or a jump
        // longer than 32,767 slots: code size is bounded by TREE_MAX_MEMBERS,
        // TREE_MAX_SEGMENTS and INLINE_MAX_ADDRESSES, far below that.
        program: a.finish().expect("generated code assembles"),
        strategy,
        maps,
        inlined,
    }
}

/// Looks up the address of the ipcache key at KEY: the host map, then the addresses learned
/// from DNS, then the prefixes; jumps to `found` with r0 at the identity, falls through on a
/// miss. A learned address marked [`FQDN_ZOMBIE`] counts only for a packet of a connection
/// `ct` has (the CT key is built by then); any other packet goes on to the prefixes, as if the
/// address had never been learned: its names expired, so toFQDNs rules no longer open
/// connections to it, while CIDR and entity rules still decide it as before it was learned.
/// A zombie that counts jumps to `known` with r1 = its value, bit included (the caller masks
/// it off).
fn identity_lookup(a: &mut Asm, found: Label, known: Label) {
    let lookup = |a: &mut Asm, map: &str, key: i16| {
        a.ld_map(R1, map);
        a.mov(R2, Src::Reg(R10))
            .alu(AluOp::Add, R2, Src::Imm(i32::from(key)));
        a.call(MAP_LOOKUP_ELEM);
    };
    lookup(a, HOSTS_MAP, KEY + 4);
    a.jump_if(Cond::Ne, R0, Src::Imm(0), found);
    let prefixes = a.label();
    let zombie = a.label();
    lookup(a, FQDN_MAP, KEY + 4);
    a.jump_if(Cond::Eq, R0, Src::Imm(0), prefixes);
    a.load(Size::W, R1, R0, 0);
    a.jump_if(Cond::Set, R1, Src::Imm(FQDN_ZOMBIE as i32), zombie);
    a.goto(found);
    a.bind(zombie);
    a.store(Size::W, R10, ZOMBIE, Src::Reg(R1));
    lookup(a, CT_MAP, CT);
    a.jump_if(Cond::Eq, R0, Src::Imm(0), prefixes);
    a.load(Size::W, R1, R10, ZOMBIE);
    a.goto(known);
    a.bind(prefixes);
    lookup(a, IPCACHE_MAP, KEY);
    a.jump_if(Cond::Ne, R0, Src::Imm(0), found);
}

/// What happens after the decision: the conntrack check, the handoff to a proxy, events, the
/// return code. r3 holds the row index on entry. `trusted`, in ingress programs, is where
/// traffic of the endpoint's own ingress proxy goes (bound here).
fn verdict_tails(a: &mut Asm, tails: &Tails, egress: bool, track: bool, trusted: Option<Label>) {
    let opened_here = if egress {
        CT_OPENED_BY_EGRESS
    } else {
        CT_OPENED_BY_INGRESS
    } as i32;
    let emit = a.label();
    let ok = a.label();
    // The handoff to the proxy: `existing` marks a packet of a connection the proxy already has
    // (found by the allow and deny tails), `handoff` takes a marked packet with HANDOFF_NEW set;
    // `refused` drops and reports.
    let existing = a.label();
    let handoff = a.label();
    let refused = a.label();
    let ct_lookup = |a: &mut Asm| {
        a.ld_map(R1, CT_MAP);
        a.mov(R2, Src::Reg(R10))
            .alu(AluOp::Add, R2, Src::Imm(i32::from(CT)));
        a.call(MAP_LOOKUP_ELEM);
    };
    let ct_create = |a: &mut Asm, opened_by: i32, flags: u32| {
        a.store(Size::W, R10, CTVAL, Src::Imm(opened_by)).store(
            Size::W,
            R10,
            CTVAL + 4,
            Src::Imm(flags as i32),
        );
        a.ld_map(R1, CT_MAP);
        a.mov(R2, Src::Reg(R10))
            .alu(AluOp::Add, R2, Src::Imm(i32::from(CT)));
        a.mov(R3, Src::Reg(R10))
            .alu(AluOp::Add, R3, Src::Imm(i32::from(CTVAL)));
        a.mov(R4, Src::Imm(0)); // BPF_ANY
        a.call(MAP_UPDATE_ELEM);
    };
    let untracked = |a: &mut Asm, target: Label| {
        let tracked = a.label();
        for p in [6, 17, 132] {
            a.jump_if(Cond::Eq, PROTO, Src::Imm(p), tracked);
        }
        a.goto(target);
        a.bind(tracked);
    };
    // With r0 at a ct entry: a reply (the other side opened it) passes; a connection this side
    // opened and handed to the proxy goes on to the proxy; anything else goes to `otherwise`.
    let established = |a: &mut Asm, otherwise: Label| {
        a.load(Size::W, R1, R0, 0)
            .jump_if(Cond::Ne, R1, Src::Imm(opened_here), ok);
        a.load(Size::W, R1, R0, 4).jump_if(
            Cond::Set,
            R1,
            Src::Imm(CT_FLAG_PROXIED as i32),
            existing,
        );
        a.goto(otherwise);
    };

    let [allow_used, deny_used, proxy_used] = tails.used.get();
    // Every tracked program checks the proxied flag, whatever its table: a connection handed to
    // the proxy stays there when a new generation's table no longer says Proxy.
    let existing_used = track && (allow_used || deny_used);
    let handoff_used = proxy_used || existing_used;
    let ok_used = allow_used || (track && (deny_used || proxy_used)) || trusted.is_some();

    // Denied: a reply of a connection the other side opened passes; anything else is dropped.
    if deny_used {
        a.bind(tails.deny);
        let dropped = a.label();
        a.store(Size::W, R10, EVT + event::ROW as i16, Src::Reg(R3));
        a.store(Size::B, R10, EVT + event::VERDICT as i16, Src::Imm(1));
        if track {
            untracked(a, dropped);
            ct_lookup(a);
            a.jump_if(Cond::Eq, R0, Src::Imm(0), dropped);
            established(a, dropped);
        }
        a.bind(dropped);
        a.store(Size::W, R10, RET, Src::Imm(TC_ACT_SHOT));
        a.goto(emit);
    }

    // Proxied: replies pass; the first packet and the rest of the connection go to the proxy.
    if proxy_used {
        a.bind(tails.proxy);
        a.store(Size::W, R10, EVT + event::ROW as i16, Src::Reg(R3));
        a.store(Size::B, R10, EVT + event::VERDICT as i16, Src::Imm(2));
        // The mark says the table proxies the packet, whatever becomes of it (as Cilium marks
        // before it looks for the proxy's socket).
        proxy_mark(a, egress);
        // TCP (HTTP, DNS over TCP) is handed over in both directions, UDP (DNS) at egress
        // only: DNS rules exist only on egress, and no ingress proxy takes UDP. Anything else
        // a Proxy row covers (SCTP, UDP at ingress) is dropped, never passed unjudged.
        if egress {
            let handed = a.label();
            a.jump_if(Cond::Eq, PROTO, Src::Imm(6), handed);
            a.jump_if(Cond::Ne, PROTO, Src::Imm(17), refused);
            a.bind(handed);
        } else {
            a.jump_if(Cond::Ne, PROTO, Src::Imm(6), refused);
        }
        if track {
            let new = a.label();
            ct_lookup(a);
            a.jump_if(Cond::Eq, R0, Src::Imm(0), new);
            a.load(Size::W, R1, R0, 0)
                .jump_if(Cond::Ne, R1, Src::Imm(opened_here), ok);
            // Opened before the table said Proxy: the proxy takes it from now on (its stack
            // resets a connection it never accepted; that is the price of enforcing L7 rules
            // on it).
            a.load(Size::W, R1, R0, 4)
                .alu(AluOp::Or, R1, Src::Imm(CT_FLAG_PROXIED as i32))
                .store(Size::W, R0, 4, Src::Reg(R1));
            a.store(Size::W, R10, HANDOFF_NEW, Src::Imm(0));
            a.goto(handoff);
            a.bind(new);
            a.store(Size::W, R10, HANDOFF_NEW, Src::Imm(1));
        }
        a.goto(handoff);
    }

    // Allowed: a packet that opens a connection records it and emits an event.
    if allow_used {
        a.bind(tails.allow);
        a.store(Size::W, R10, EVT + event::ROW as i16, Src::Reg(R3));
        a.store(Size::B, R10, EVT + event::VERDICT as i16, Src::Imm(0));
        if track {
            let create = a.label();
            untracked(a, ok);
            ct_lookup(a);
            a.jump_if(Cond::Eq, R0, Src::Imm(0), create);
            established(a, ok);
            a.bind(create);
            ct_create(a, opened_here, 0);
            a.store(Size::W, R10, RET, Src::Imm(TC_ACT_OK));
            a.goto(emit);
        } else {
            a.goto(ok);
        }
    }

    // Traffic of the endpoint's own ingress proxy, which judged the connection: it passes and
    // is recorded, so the endpoint's replies pass. No event: the connection's first leg (peer
    // to proxy) was reported when it was handed over, and the proxy reports its requests.
    if let Some(trusted) = trusted {
        a.bind(trusted);
        if track {
            untracked(a, ok);
            ct_lookup(a);
            a.jump_if(Cond::Ne, R0, Src::Imm(0), ok);
            ct_create(a, CT_OPENED_BY_INGRESS as i32, 0);
        }
        a.goto(ok);
    }

    if existing_used {
        a.bind(existing);
        a.store(Size::W, R10, HANDOFF_NEW, Src::Imm(0));
        proxy_mark(a, egress);
    }
    if handoff_used {
        a.bind(handoff);
        if egress {
            egress_handoff(a, refused);
        } else {
            ingress_handoff(a, refused);
        }
        let opens = a.label();
        if track {
            a.load(Size::W, R1, R10, HANDOFF_NEW)
                .jump_if(Cond::Ne, R1, Src::Imm(0), opens);
        }
        a.load(Size::W, R0, R10, RET);
        a.exit();
        if track {
            // Recorded only once the proxy has it: a dropped packet leaves no connection.
            a.bind(opens);
            ct_create(a, opened_here, CT_FLAG_PROXIED);
            a.goto(emit);
        }
        // Fail closed: no proxy to take the connection drops it, and says so.
        a.bind(refused);
        a.store(Size::B, R10, EVT + event::VERDICT as i16, Src::Imm(1));
        a.store(Size::W, R10, RET, Src::Imm(TC_ACT_SHOT));
        a.goto(emit);
    }
    if ok_used {
        a.bind(ok);
        a.ret(TC_ACT_OK);
    }

    // The event: the subject's identity is its own address's in the ipcache (so identities with
    // equal tables can share one program), the rest is on the stack already. Every tail above
    // reaches it: the deny and proxy tails always, the allow tail when tracking.
    if !(deny_used || handoff_used || (allow_used && track)) {
        return;
    }
    a.bind(emit);
    let v6 = a.label();
    let keyed = a.label();
    let subject = a.label();
    a.load(Size::B, R1, R10, CT + 37);
    a.store(Size::B, R10, EVT + event::FAMILY as i16, Src::Reg(R1));
    a.store(Size::W, R10, KEY + 4, Src::Reg(R1));
    a.jump_if(Cond::Eq, R1, Src::Imm(6), v6);
    a.store(Size::W, R10, KEY, Src::Imm(64)).goto(keyed);
    a.bind(v6);
    a.store(Size::W, R10, KEY, Src::Imm(160));
    a.bind(keyed);
    for w in 0..4 {
        a.load(Size::W, R1, R10, CT + 4 * w)
            .store(Size::W, R10, KEY + 8 + 4 * w, Src::Reg(R1));
    }
    let known = a.label();
    identity_lookup(a, known, subject);
    a.mov(R1, Src::Imm(0)).goto(subject);
    a.bind(known);
    a.load(Size::W, R1, R0, 0);
    a.bind(subject);
    a.store(Size::W, R10, EVT + event::SUBJECT as i16, Src::Reg(R1));
    a.load(Size::W, R1, R10, PORT)
        .store(Size::H, R10, EVT + event::PORT as i16, Src::Reg(R1));
    a.store(Size::B, R10, EVT + event::PROTOCOL as i16, Src::Reg(PROTO));
    a.store(
        Size::B,
        R10,
        EVT + event::DIRECTION as i16,
        Src::Imm(i32::from(egress)),
    );
    a.store(Size::H, R10, EVT + 18, Src::Imm(0))
        .store(Size::W, R10, EVT + 20, Src::Imm(0));
    // The CT key holds both addresses from the endpoint's side: local, then peer.
    for w in 0..8 {
        a.load(Size::W, R1, R10, CT + 4 * w).store(
            Size::W,
            R10,
            EVT + event::SUBJECT_ADDRESS as i16 + 4 * w,
            Src::Reg(R1),
        );
    }
    a.ld_map(R1, EVENTS_MAP);
    a.mov(R2, Src::Reg(R10))
        .alu(AluOp::Add, R2, Src::Imm(i32::from(EVT)));
    a.mov(R3, Src::Imm(EVENT_SIZE as i32)).mov(R4, Src::Imm(0));
    a.call(RINGBUF_OUTPUT);
    // A full ring buffer loses the event, never the verdict.
    a.load(Size::W, R0, R10, RET);
    a.exit();
}

/// Sets `skb->mark` for the proxy: [`TO_PROXY_MARK`], on the ingress path or'ed with the peer's
/// identity when it fits the mark's identity bits (0 otherwise): the ingress proxy reads the
/// source's identity from the accepted socket's mark (`cnpc_ir::proxy::contract`).
fn proxy_mark(a: &mut Asm, egress: bool) {
    if egress {
        a.store(Size::W, CTX, SKB_MARK, Src::Imm(TO_PROXY_MARK));
        return;
    }
    let fits = a.label();
    a.load(Size::W, R1, R10, EVT + event::PEER as i16);
    a.jump_if(
        Cond::Le,
        R1,
        Src::Imm(contract::MARK_IDENTITY_MASK as i32),
        fits,
    );
    a.mov(R1, Src::Imm(0));
    a.bind(fits);
    a.alu(AluOp::Or, R1, Src::Imm(TO_PROXY_MARK))
        .store(Size::W, CTX, SKB_MARK, Src::Reg(R1));
}

/// The egress handoff (tc ingress of the endpoint's veth, where `bpf_sk_assign` is allowed):
/// the packet's tuple from the conntrack key (local side first is the packet's source here),
/// then [`sock_assign`] to the egress proxy, TCP or UDP by the packet's protocol; RET =
/// TC_ACT_OK, or `refused`.
fn egress_handoff(a: &mut Asm, refused: Label) {
    let v6 = a.label();
    let built = a.label();
    a.load(Size::B, R1, R10, CT + 37);
    a.jump_if(Cond::Eq, R1, Src::Imm(6), v6);
    // struct bpf_sock_tuple: saddr, daddr, sport, dport (the ct key's ports are in that order).
    for (to, from) in [(0, 0), (4, 16), (8, 32)] {
        a.load(Size::W, R1, R10, CT + from)
            .store(Size::W, R10, TUPLE + to, Src::Reg(R1));
    }
    a.mov(R7, Src::Imm(TUPLE_V4)).goto(built);
    a.bind(v6);
    for w in 0..9 {
        a.load(Size::W, R1, R10, CT + 4 * w)
            .store(Size::W, R10, TUPLE + 4 * w, Src::Reg(R1));
    }
    a.mov(R7, Src::Imm(TUPLE_V6));
    a.bind(built);
    sock_assign(a, contract::EGRESS_PROXY_PORT, true, refused);
    a.store(Size::W, R10, RET, Src::Imm(TC_ACT_OK));
}

/// The ingress handoff (tc egress of the endpoint's veth, where `bpf_sk_assign` is refused):
/// redirect to the receive path of the loader's proxy device, whose program does the
/// assignment ([`proxy_device_program`]); RET = what `bpf_redirect` returned (TC_ACT_REDIRECT),
/// or `refused` when `proxy_config` names no device.
fn ingress_handoff(a: &mut Asm, refused: Label) {
    a.store(Size::W, R10, SCRATCH, Src::Imm(0));
    a.ld_map(R1, PROXY_CONFIG_MAP);
    a.mov(R2, Src::Reg(R10))
        .alu(AluOp::Add, R2, Src::Imm(i32::from(SCRATCH)));
    a.call(MAP_LOOKUP_ELEM);
    a.jump_if(Cond::Eq, R0, Src::Imm(0), refused);
    a.load(Size::W, R1, R0, PROXY_CONFIG_IFINDEX)
        .jump_if(Cond::Eq, R1, Src::Imm(0), refused);
    a.mov(R2, Src::Imm(BPF_F_INGRESS));
    a.call(REDIRECT);
    a.store(Size::W, R10, RET, Src::Reg(R0));
}

/// Assigns the packet to a proxy socket, as Cilium's bpf/lib/proxy.h (`assign_socket_tcp`)
/// does: first the socket of the packet's own tuple (a connection the proxy already accepted;
/// a listener or a TIME_WAIT socket found that way is not one, and is released), then the
/// proxy's listener on `port` (a listener bound to the wildcard address matches any
/// destination address). `bpf_sk_assign` then sets `skb->sk`, and the local route for
/// TO_PROXY_MARK delivers the packet to it. Falls through on success, goes to `fail` when no
/// socket is found or the assignment fails. Expects the tuple at TUPLE, its size in r7 and the
/// context in r6; uses r7 and r8, clobbers r0-r5. Every socket reference is released on every
/// path (the kernel refuses the program otherwise).
///
/// With `udp`, a UDP packet (PROTO 17) goes to the proxy's UDP socket on `port` instead
/// (`bpf_sk_lookup_udp`, as Cilium's `assign_socket_udp`): an unconnected socket bound to the
/// wildcard address on that port matches whatever the packet's addresses, and the DNS proxy
/// reads each datagram's original destination with IP_RECVORIGDSTADDR. Unlike TCP there is no
/// lookup of the packet's own tuple first: the proxy receives every datagram on that one
/// socket, and the own tuple could find a socket of the node on the original port (a DNS
/// server bound to the wildcard address on port 53, say) and hand the pod's query to it,
/// past the proxy.
fn sock_assign(a: &mut Asm, port: u16, udp: bool, fail: Label) {
    let listener = a.label();
    let release = a.label();
    let assign = a.label();
    let v6_port = a.label();
    let lookup = a.label();
    let lookup_args = |a: &mut Asm| {
        a.mov(R1, Src::Reg(CTX));
        a.mov(R2, Src::Reg(R10))
            .alu(AluOp::Add, R2, Src::Imm(i32::from(TUPLE)));
        a.mov(R3, Src::Reg(R7))
            .mov(R4, Src::Imm(BPF_F_CURRENT_NETNS))
            .mov(R5, Src::Imm(0));
    };
    let call_lookup = |a: &mut Asm, helper: i32| {
        lookup_args(a);
        a.call(helper);
    };
    if udp {
        a.jump_if(Cond::Eq, PROTO, Src::Imm(17), listener);
    }
    call_lookup(a, SKC_LOOKUP_TCP);
    a.jump_if(Cond::Eq, R0, Src::Imm(0), listener);
    a.mov(R8, Src::Reg(R0));
    a.load(Size::W, R1, R8, SOCK_STATE);
    a.jump_if(Cond::Eq, R1, Src::Imm(BPF_TCP_LISTEN), release);
    a.jump_if(Cond::Eq, R1, Src::Imm(BPF_TCP_TIME_WAIT), release);
    a.goto(assign);
    a.bind(release);
    a.mov(R1, Src::Reg(R8)).call(SK_RELEASE);
    // The listener: the same tuple with the proxy's port as the destination port.
    a.bind(listener);
    let dport = i32::from(port.swap_bytes()); // network order, as stored little-endian
    a.jump_if(Cond::Eq, R7, Src::Imm(TUPLE_V6), v6_port);
    a.store(Size::H, R10, TUPLE + 10, Src::Imm(dport))
        .goto(lookup);
    a.bind(v6_port);
    a.store(Size::H, R10, TUPLE + 34, Src::Imm(dport));
    a.bind(lookup);
    if udp {
        let tcp = a.label();
        let found = a.label();
        // One set of arguments for either lookup: only the helper differs.
        lookup_args(a);
        a.jump_if(Cond::Ne, PROTO, Src::Imm(17), tcp);
        a.call(SK_LOOKUP_UDP);
        a.goto(found);
        a.bind(tcp);
        a.call(SK_LOOKUP_TCP);
        // Either socket is one reference from here on (released below on every path).
        a.bind(found);
    } else {
        call_lookup(a, SK_LOOKUP_TCP);
    }
    a.jump_if(Cond::Eq, R0, Src::Imm(0), fail);
    a.mov(R8, Src::Reg(R0));
    a.bind(assign);
    a.mov(R1, Src::Reg(CTX))
        .mov(R2, Src::Reg(R8))
        .mov(R3, Src::Imm(0));
    a.call(SK_ASSIGN);
    a.mov(R7, Src::Reg(R0)); // the tuple's size is not needed any more
    a.mov(R1, Src::Reg(R8)).call(SK_RELEASE);
    a.jump_if(Cond::Ne, R7, Src::Imm(0), fail);
}

/// The program of the loader's proxy device (one per node), at its tc ingress: packets an
/// endpoint's ingress program redirected there (they carry TO_PROXY_MARK) are assigned to the
/// ingress proxy ([`sock_assign`] with [`contract::INGRESS_PROXY_PORT`]); anything else is
/// dropped, as is a packet no proxy socket takes.
///
/// The redirected frame still carries the endpoint's MAC address, so `eth_type_trans` marked it
/// PACKET_OTHERHOST on the way in, and `ip_rcv` would drop it: the program makes it PACKET_HOST
/// with `bpf_skb_change_type` (rewriting the destination MAC would need the device's address
/// here; the packet type is all `ip_rcv` looks at). Only TCP arrives here today; IPv6 with
/// extension headers before TCP is dropped (the endpoint's program would have handed over only
/// what it parsed, and proxied traffic has none in practice).
pub fn proxy_device_program() -> Program {
    let mut a = Asm::new();
    let drop = a.label();
    let v4 = a.label();
    let v6 = a.label();
    let parsed = a.label();
    a.mov(CTX, Src::Reg(R1));
    // The identity bits under the mark are the ingress proxy's, not ours.
    a.load(Size::W, R1, CTX, SKB_MARK)
        .alu(AluOp::And, R1, Src::Imm(contract::MARK_MAGIC_MASK as i32))
        .jump_if(Cond::Ne, R1, Src::Imm(TO_PROXY_MARK), drop);
    a.load(Size::W, DATA, CTX, SKB_DATA)
        .load(Size::W, DATA_END, CTX, SKB_DATA_END);
    need(&mut a, DATA, 14, drop);
    a.load(Size::H, R1, DATA, 12);
    a.jump_if(Cond::Eq, R1, Src::Imm(0x0008), v4); // 0x0800 read little-endian
    a.jump_if(Cond::Eq, R1, Src::Imm(0xdd86), v6);
    a.goto(drop);

    a.bind(v4);
    ipv4_header_len(&mut a, R1, R3, drop);
    a.alu(AluOp::Add, R1, Src::Imm(14));
    a.load(Size::B, R3, DATA, 23)
        .jump_if(Cond::Ne, R3, Src::Imm(6), drop);
    a.load(Size::H, R3, DATA, 20)
        .push(Insn::ToBe { dst: R3, bits: 16 })
        .alu(AluOp::And, R3, Src::Imm(0x1fff))
        .jump_if(Cond::Ne, R3, Src::Imm(0), drop);
    for (to, from) in [(0, 26), (4, 30)] {
        a.load(Size::W, R3, DATA, from)
            .store(Size::W, R10, TUPLE + to, Src::Reg(R3));
    }
    a.mov(R3, Src::Reg(DATA)).alu(AluOp::Add, R3, Src::Reg(R1));
    need(&mut a, R3, 4, drop);
    a.load(Size::W, R3, R3, 0)
        .store(Size::W, R10, TUPLE + 8, Src::Reg(R3));
    a.mov(R7, Src::Imm(TUPLE_V4)).goto(parsed);

    a.bind(v6);
    need(&mut a, DATA, 58, drop);
    a.load(Size::B, R3, DATA, 20)
        .jump_if(Cond::Ne, R3, Src::Imm(6), drop);
    // Source, destination, then the TCP ports right after the fixed header.
    for w in 0..9 {
        a.load(Size::W, R3, DATA, 22 + 4 * w)
            .store(Size::W, R10, TUPLE + 4 * w, Src::Reg(R3));
    }
    a.mov(R7, Src::Imm(TUPLE_V6));

    a.bind(parsed);
    a.mov(R1, Src::Reg(CTX)).mov(R2, Src::Imm(PACKET_HOST));
    a.call(SKB_CHANGE_TYPE);
    a.jump_if(Cond::Ne, R0, Src::Imm(0), drop);
    sock_assign(&mut a, contract::INGRESS_PROXY_PORT, false, drop);
    a.ret(TC_ACT_OK);
    a.bind(drop);
    a.ret(TC_ACT_SHOT);
    // Every label above is bound and the program is a few dozen instructions long.
    a.finish().expect("generated code assembles")
}

/// A table without rows, on an endpoint that needs no connection tracking, decides by its
/// default alone (Allow or Deny): no peer lookup, no port parsing. Frames that are not IP still
/// pass.
fn constant(default: &TableVerdict) -> Program {
    let mut a = Asm::new();
    if *default != TableVerdict::Allow {
        let ip = a.label();
        a.load(Size::W, R2, R1, SKB_DATA)
            .load(Size::W, R3, R1, SKB_DATA_END);
        a.mov(R4, Src::Reg(R2))
            .alu(AluOp::Add, R4, Src::Imm(14))
            .jump_if(Cond::Gt, R4, Src::Reg(R3), ip);
        a.load(Size::H, R4, R2, 12);
        a.jump_if(Cond::Eq, R4, Src::Imm(0x0008), ip)
            .jump_if(Cond::Eq, R4, Src::Imm(0xdd86), ip);
        a.ret(TC_ACT_OK);
        a.bind(ip);
        // Only Deny gets here: `build` never makes a Proxy default constant.
        a.ret(TC_ACT_SHOT);
    } else {
        a.ret(TC_ACT_OK);
    }
    a.finish().expect("generated code assembles")
}

/// Emits `if reg == key goto target` for each sorted `(key, target)` as a binary-search tree
/// (or a chain, for few keys); a miss goes to `miss`.
fn search(a: &mut Asm, reg: Reg, keys: &[(u32, Label)], miss: Label) {
    if keys.len() <= 4 {
        for (k, target) in keys {
            a.jump_if(Cond::Eq, reg, Src::Imm(*k as i32), *target);
        }
        a.goto(miss);
        return;
    }
    let mid = keys.len() / 2;
    let upper = a.label();
    a.jump_if(Cond::Ge, reg, Src::Imm(keys[mid].0 as i32), upper);
    search(a, reg, &keys[..mid], miss);
    a.bind(upper);
    search(a, reg, &keys[mid..], miss);
}

/// Emits the port segments of one (class, protocol) as a tree: R2 is the port.
fn port_tree(
    a: &mut Asm,
    table: &DecisionTable,
    segs: &[Segment],
    max: u16,
    tails: &Tails,
    miss: Label,
) {
    if segs.len() <= 3 {
        for s in segs {
            if s.lo == 0 && s.hi == max {
                // Every port: nothing after it is reachable.
                verdict_jump(a, tails, &table.rows[s.row].verdict, Some(s.row));
                return;
            }
            let next = a.label();
            if s.lo > 0 {
                a.jump_if(Cond::Lt, R2, Src::Imm(i32::from(s.lo)), next);
            }
            if s.hi < max {
                a.jump_if(Cond::Gt, R2, Src::Imm(i32::from(s.hi)), next);
            }
            verdict_jump(a, tails, &table.rows[s.row].verdict, Some(s.row));
            a.bind(next);
        }
        a.goto(miss);
        return;
    }
    let mid = segs.len() / 2;
    let (lower, upper) = (a.label(), a.label());
    let s = segs[mid];
    a.jump_if(Cond::Lt, R2, Src::Imm(i32::from(s.lo)), lower);
    a.jump_if(Cond::Gt, R2, Src::Imm(i32::from(s.hi)), upper);
    verdict_jump(a, tails, &table.rows[s.row].verdict, Some(s.row));
    a.bind(lower);
    port_tree(a, table, &segs[..mid], max, tails, miss);
    a.bind(upper);
    port_tree(a, table, &segs[mid + 1..], max, tails, miss);
}

/// Identity to class (members sorted by identity; the first class holding one wins).
fn membership(table: &DecisionTable) -> Vec<(u32, u32)> {
    let mut members: BTreeMap<u32, u32> = BTreeMap::new();
    for (c, class) in table.classes.iter().enumerate() {
        for m in &class.members {
            members.entry(m.0).or_insert(c as u32);
        }
    }
    members.into_iter().collect()
}

/// Members grouped by class, once: scanning all members per (class, protocol) would be
/// quadratic in the large tables that map lookups are for.
fn by_class(members: &[(u32, u32)]) -> BTreeMap<u32, Vec<u32>> {
    let mut out: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for (m, c) in members {
        out.entry(*c).or_default().push(*m);
    }
    out
}

/// A map named by its kind and a hash of its contents.
fn content_name(kind: &str, records: &[Record]) -> String {
    let mut h = Sha256::new();
    for (k, v) in records {
        h.update(k);
        h.update(v);
    }
    let hex: String = h.finalize()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{kind}_{hex}")
}

/// The decision in code (or code and maps); returns the maps it reads.
fn decision(
    a: &mut Asm,
    table: &DecisionTable,
    strategy: Strategy,
    keys: Option<MapKeys>,
    tails: &Tails,
) -> Vec<MapImage> {
    let default = a.label();
    let segments = segments(table);
    let members = membership(table);
    let mut maps = Vec::new();
    if strategy == Strategy::Maps {
        let by_class = by_class(&members);
        let keys = keys.unwrap_or_else(|| choose_keys(&segments, &by_class));
        maps = map_decision(a, table, &segments, &by_class, keys, tails, default);
    } else {
        let labels: Vec<Label> = table.classes.iter().map(|_| a.label()).collect();
        let keys: Vec<(u32, Label)> = members
            .iter()
            .map(|(m, c)| (*m, labels[*c as usize]))
            .collect();
        if strategy == Strategy::Branches {
            for (k, l) in &keys {
                a.jump_if(Cond::Eq, R1, Src::Imm(*k as i32), *l);
            }
            a.goto(default);
        } else {
            search(a, R1, &keys, default);
        }
        for (c, label) in labels.iter().enumerate() {
            a.bind(*label);
            for ((_, proto), segs) in segments.iter().filter(|((k, _), _)| *k == c as u32) {
                let next = a.label();
                a.jump_if(Cond::Ne, PROTO, Src::Imm(ip_proto(*proto)), next);
                port_tree(a, table, segs, proto.max_port(), tails, default);
                a.bind(next);
            }
            a.goto(default);
        }
    }
    a.bind(default);
    verdict_jump(a, tails, &table.default, None);
    maps
}

fn verdict_code(v: &TableVerdict) -> u32 {
    match v {
        TableVerdict::Allow => 0,
        TableVerdict::Deny => 1,
        TableVerdict::Proxy(_) => 2,
    }
}

/// How a table decided by maps keys its map records: by the peer's identity, or by its class
/// after an identity-to-class lookup. Chosen per table by the bytes of the maps
/// ([`map_keys`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum MapKeys {
    /// `be32 identity, ...`: one lookup fewer per packet; the records grow with members ×
    /// port segments (a range takes one record per aligned prefix).
    Identity,
    /// `be32 class, ...` after the `cls_*` hash map (identity → class): one record per member
    /// of a class with rows, then records grow with classes × port segments.
    Class,
}

impl MapKeys {
    pub fn as_str(self) -> &'static str {
        match self {
            MapKeys::Identity => "identity",
            MapKeys::Class => "class",
        }
    }
}

/// Name prefixes of a map table's maps: identity to class, exact ports, port prefixes.
pub const CLASS_MAP_PREFIX: &str = "cls_";
pub const PORT_MAP_PREFIX: &str = "prt_";
pub const RANGE_MAP_PREFIX: &str = "rng_";

/// Bytes of one record (key and value) of the identity-to-class map, the exact-port map and
/// the port-prefix trie.
const CLASS_RECORD_BYTES: usize = 8;
const PORT_RECORD_BYTES: usize = 16;
const RANGE_RECORD_BYTES: usize = 20;

impl Generated {
    /// How the maps of a [`Strategy::Maps`] program are keyed; `None` for other strategies
    /// and for a program whose table has no rows (it reads no map of its own).
    pub fn map_keys(&self) -> Option<MapKeys> {
        if self.strategy != Strategy::Maps || self.maps.is_empty() {
            return None;
        }
        Some(
            if self
                .maps
                .iter()
                .any(|m| m.def.name.starts_with(CLASS_MAP_PREFIX))
            {
                MapKeys::Class
            } else {
                MapKeys::Identity
            },
        )
    }
}

/// Bytes of the records one (class, protocol)'s segments take when keyed once: an exact
/// record per single port, a record per aligned prefix of a range.
fn segment_bytes(segs: &[Segment]) -> usize {
    segs.iter()
        .map(|s| {
            if s.lo == s.hi {
                PORT_RECORD_BYTES
            } else {
                RANGE_RECORD_BYTES * port_prefix_count(s.lo, s.hi)
            }
        })
        .sum()
}

/// The bytes of a map table's records keyed each way: (by identity, by class).
fn layout_bytes(
    segments: &BTreeMap<(u32, Protocol), Vec<Segment>>,
    by_class: &BTreeMap<u32, Vec<u32>>,
) -> (usize, usize) {
    let mut per_class: BTreeMap<u32, usize> = BTreeMap::new();
    for ((class, _), segs) in segments {
        *per_class.entry(*class).or_default() += segment_bytes(segs);
    }
    let (mut identity, mut class) = (0usize, 0usize);
    for (c, bytes) in per_class {
        let members = by_class.get(&c).map_or(0, Vec::len);
        identity = identity.saturating_add(members.saturating_mul(bytes));
        class = class.saturating_add(members * CLASS_RECORD_BYTES + bytes);
    }
    (identity, class)
}

/// Class keys when they take less than half the bytes of identity keys
/// ([`CLASS_KEYS_MIN_SAVING`]); identity keys otherwise, which save a lookup per packet.
fn choose_keys(
    segments: &BTreeMap<(u32, Protocol), Vec<Segment>>,
    by_class: &BTreeMap<u32, Vec<u32>>,
) -> MapKeys {
    let (identity, class) = layout_bytes(segments, by_class);
    if class.saturating_mul(CLASS_KEYS_MIN_SAVING) < identity {
        MapKeys::Class
    } else {
        MapKeys::Identity
    }
}

/// How many times smaller class-keyed maps must be than identity-keyed ones for the generator
/// to key by class. The class lookup costs a hash lookup on every packet the maps decide
/// (about as much as the decision itself), and a class map holds every member anyway: for a
/// table of single ports keying by class at most halves the bytes (8 bytes per member instead
/// of 16 per member and port), not worth the lookup; port ranges (a record per aligned prefix,
/// often a dozen or more per range) and several ports per class multiply identity-keyed
/// records, and there class keys win by far more than this.
pub const CLASS_KEYS_MIN_SAVING: usize = 2;

/// How [`generate`] keys the maps of `table` if it decides it with maps: by class when that
/// takes less than half the bytes ([`CLASS_KEYS_MIN_SAVING`]; port ranges multiply
/// identity-keyed records by their prefixes), by identity otherwise.
pub fn map_keys(table: &DecisionTable) -> MapKeys {
    choose_keys(&segments(table), &by_class(&membership(table)))
}

/// The decision as map lookups. Keys are `be32 id, u8 protocol, u8 zero, be16 port`, where `id`
/// is the peer's identity ([`MapKeys::Identity`]) or its class, after an identity-to-class hash
/// lookup ([`MapKeys::Class`]). Single ports are exact keys of a hash map; port ranges are
/// prefixes in an LPM trie (the same key behind a prefix length), consulted only on a miss and
/// only when the table has ranges. Segments are disjoint, so a port is in at most one of the
/// two. A peer in no class with rows misses (the class map holds only those), and gets the
/// default.
fn map_decision(
    a: &mut Asm,
    table: &DecisionTable,
    segments: &BTreeMap<(u32, Protocol), Vec<Segment>>,
    by_class: &BTreeMap<u32, Vec<u32>>,
    keys: MapKeys,
    tails: &Tails,
    default: Label,
) -> Vec<MapImage> {
    let mut maps = Vec::new();
    let of_class = |c: u32| by_class.get(&c).map_or(&[][..], Vec::as_slice);
    // Key data at SCRATCH + 4 (the LPM prefix length sits in front of it).
    match keys {
        MapKeys::Identity => {
            a.mov(R3, Src::Reg(R1));
        }
        MapKeys::Class => {
            let with_rows: std::collections::BTreeSet<u32> =
                segments.keys().map(|(c, _)| *c).collect();
            let mut classes: Vec<Record> = with_rows
                .iter()
                .flat_map(|c| of_class(*c).iter().map(move |m| (*m, *c)))
                .map(|(m, c)| (m.to_le_bytes().to_vec(), c.to_le_bytes().to_vec()))
                .collect();
            classes.sort();
            let class_map = content_name(&CLASS_MAP_PREFIX[..3], &classes);
            a.store(Size::W, R10, SCRATCH, Src::Reg(R1));
            a.ld_map(R1, &class_map);
            a.mov(R2, Src::Reg(R10))
                .alu(AluOp::Add, R2, Src::Imm(i32::from(SCRATCH)));
            a.call(MAP_LOOKUP_ELEM);
            a.jump_if(Cond::Eq, R0, Src::Imm(0), default);
            a.load(Size::W, R3, R0, 0);
            maps.push(MapImage {
                def: MapDef {
                    name: class_map,
                    map_type: BPF_MAP_TYPE_HASH,
                    key_size: 4,
                    value_size: 4,
                    max_entries: classes.len().max(1) as u32,
                    flags: 0,
                },
                records: classes,
                key_layout: "u32 identity",
                value_layout: "u32 class",
            });
        }
    }
    a.push(Insn::ToBe { dst: R3, bits: 32 })
        .store(Size::W, R10, SCRATCH + 4, Src::Reg(R3));
    a.store(Size::W, R10, SCRATCH, Src::Imm(64));
    a.store(Size::B, R10, SCRATCH + 8, Src::Reg(PROTO)).store(
        Size::B,
        R10,
        SCRATCH + 9,
        Src::Imm(0),
    );
    a.load(Size::W, R1, R10, PORT)
        .push(Insn::ToBe { dst: R1, bits: 16 })
        .store(Size::H, R10, SCRATCH + 10, Src::Reg(R1));
    let (mut exact, mut ranges) = (Vec::new(), Vec::new());
    for ((class, proto), segs) in segments {
        // Each segment's value and port keys once, then one record per key id: (value, [(port,
        // None for an exact port or Some(prefix bits))]).
        type PortKeys = Vec<(u16, Option<u32>)>;
        let entries: Vec<(Vec<u8>, PortKeys)> = segs
            .iter()
            .map(|s| {
                let mut v = verdict_code(&table.rows[s.row].verdict)
                    .to_le_bytes()
                    .to_vec();
                v.extend((s.row as u32).to_le_bytes());
                let ports = if s.lo == s.hi {
                    vec![(s.lo, None)]
                } else {
                    port_prefixes(s.lo, s.hi)
                        .into_iter()
                        .map(|(port, bits)| (port, Some(bits)))
                        .collect()
                };
                (v, ports)
            })
            .collect();
        let one = [*class];
        let ids: &[u32] = match keys {
            MapKeys::Identity => of_class(*class),
            MapKeys::Class => &one,
        };
        for id in ids {
            let mut data = id.to_be_bytes().to_vec();
            data.extend([ip_proto(*proto) as u8, 0]);
            for (v, ports) in &entries {
                for (port, bits) in ports {
                    match bits {
                        None => {
                            let mut k = data.clone();
                            k.extend(port.to_be_bytes());
                            exact.push((k, v.clone()));
                        }
                        Some(bits) => {
                            let mut k = (48 + bits).to_le_bytes().to_vec();
                            k.extend(&data);
                            k.extend(port.to_be_bytes());
                            ranges.push((k, v.clone()));
                        }
                    }
                }
            }
        }
    }
    exact.sort();
    ranges.sort();
    let hit = a.label();
    let (layout, range_layout) = match keys {
        MapKeys::Identity => (
            "be32 identity, u8 protocol, u8 zero, be16 port",
            "u32 prefix length (48 + port bits), be32 identity, u8 protocol, u8 zero, be16 port",
        ),
        MapKeys::Class => (
            "be32 class, u8 protocol, u8 zero, be16 port",
            "u32 prefix length (48 + port bits), be32 class, u8 protocol, u8 zero, be16 port",
        ),
    };
    let value_layout = "u32 verdict (0 allow, 1 deny, 2 proxy), u32 row";
    if !exact.is_empty() {
        let name = content_name(&PORT_MAP_PREFIX[..3], &exact);
        a.ld_map(R1, &name);
        a.mov(R2, Src::Reg(R10))
            .alu(AluOp::Add, R2, Src::Imm(i32::from(SCRATCH + 4)));
        a.call(MAP_LOOKUP_ELEM);
        a.jump_if(Cond::Ne, R0, Src::Imm(0), hit);
        maps.push(MapImage {
            def: MapDef {
                name,
                map_type: BPF_MAP_TYPE_HASH,
                key_size: 8,
                value_size: 8,
                max_entries: exact.len() as u32,
                flags: 0,
            },
            records: exact,
            key_layout: layout,
            value_layout,
        });
    }
    if !ranges.is_empty() {
        let name = content_name(&RANGE_MAP_PREFIX[..3], &ranges);
        a.ld_map(R1, &name);
        a.mov(R2, Src::Reg(R10))
            .alu(AluOp::Add, R2, Src::Imm(i32::from(SCRATCH)));
        a.call(MAP_LOOKUP_ELEM);
        a.jump_if(Cond::Ne, R0, Src::Imm(0), hit);
        maps.push(MapImage {
            def: MapDef {
                name,
                map_type: BPF_MAP_TYPE_LPM_TRIE,
                key_size: 12,
                value_size: 8,
                max_entries: ranges.len() as u32,
                flags: BPF_F_NO_PREALLOC,
            },
            records: ranges,
            key_layout: range_layout,
            value_layout,
        });
    }
    a.goto(default);
    if !maps
        .iter()
        .any(|m| m.records.first().is_some_and(|r| r.1.len() == 8))
    {
        return maps; // no rows: nothing jumps to `hit`
    }
    a.bind(hit);
    a.load(Size::W, R3, R0, 4).load(Size::W, R1, R0, 0);
    tails.dispatch(a);
    maps
}

/// `[lo, hi]` as aligned blocks, (first port, size), each the largest block starting there
/// that is aligned and fits: what one LPM record per aligned prefix covers.
fn port_blocks(lo: u16, hi: u16) -> impl Iterator<Item = (u32, u32)> {
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    std::iter::from_fn(move || {
        if lo > hi {
            return None;
        }
        let mut size = if lo == 0 {
            1 << 16
        } else {
            1 << lo.trailing_zeros()
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        let block = (lo, size);
        lo += size;
        Some(block)
    })
}

/// How many aligned prefix blocks [`port_prefixes`] splits `[lo, hi]` into, without listing them.
fn port_prefix_count(lo: u16, hi: u16) -> usize {
    port_blocks(lo, hi).count()
}

/// `[lo, hi]` as aligned prefix blocks: (first port, prefix bits).
fn port_prefixes(lo: u16, hi: u16) -> Vec<(u16, u32)> {
    port_blocks(lo, hi)
        .map(|(lo, size)| (lo as u16, 16 - size.trailing_zeros()))
        .collect()
}

/// Cilium's lookup order (bpf/lib/policy.h), for the benchmark: (identity, port, protocol),
/// (identity, any port, protocol), (identity, any), (any); the first hit decides, a miss is the
/// default. Port segments become exact keys (a full range becomes the any-port key), which is
/// only practical for tables of single ports: the benchmark's.
fn baseline_decision(a: &mut Asm, table: &DecisionTable, tails: &Tails) -> Vec<MapImage> {
    let default = a.label();
    let mut records = Vec::new();
    let by_class = by_class(&membership(table));
    for ((class, proto), segs) in segments(table) {
        for &m in by_class.get(&class).into_iter().flatten() {
            for s in &segs {
                let ports: Vec<u16> = if s.lo == 0 && s.hi == proto.max_port() {
                    vec![0]
                } else {
                    (s.lo..=s.hi).take(1024).collect()
                };
                let verdict = verdict_code(&table.rows[s.row].verdict);
                for p in ports {
                    let mut k = m.to_le_bytes().to_vec();
                    k.extend(u32::from(p).to_le_bytes());
                    k.extend((ip_proto(proto) as u32).to_le_bytes());
                    let mut v = verdict.to_le_bytes().to_vec();
                    v.extend((s.row as u32).to_le_bytes());
                    records.push((k, v));
                }
            }
        }
    }
    records.sort();
    records.dedup_by(|x, y| x.0 == y.0);
    let name = content_name("pol", &records);
    // Key: u32 identity, u32 port, u32 protocol.
    a.store(Size::W, R10, SCRATCH, Src::Reg(R1))
        .store(Size::W, R10, SCRATCH + 4, Src::Reg(R2))
        .store(Size::W, R10, SCRATCH + 8, Src::Reg(PROTO));
    let hit = a.label();
    for step in 0..4 {
        match step {
            1 => {
                a.store(Size::W, R10, SCRATCH + 4, Src::Imm(0));
            }
            2 => {
                a.store(Size::W, R10, SCRATCH + 8, Src::Imm(0));
            }
            3 => {
                a.store(Size::W, R10, SCRATCH, Src::Imm(0));
            }
            _ => {}
        }
        a.ld_map(R1, &name);
        a.mov(R2, Src::Reg(R10))
            .alu(AluOp::Add, R2, Src::Imm(i32::from(SCRATCH)));
        a.call(MAP_LOOKUP_ELEM);
        a.jump_if(Cond::Ne, R0, Src::Imm(0), hit);
    }
    a.goto(default);
    a.bind(hit);
    a.load(Size::W, R3, R0, 4).load(Size::W, R1, R0, 0);
    tails.dispatch(a);
    a.bind(default);
    verdict_jump(a, tails, &table.default, None);
    vec![MapImage {
        def: MapDef {
            name,
            map_type: BPF_MAP_TYPE_HASH,
            key_size: 12,
            value_size: 8,
            max_entries: records.len().max(1) as u32,
            flags: 0,
        },
        records,
        key_layout: "u32 identity, u32 port, u32 protocol",
        value_layout: "u32 verdict, u32 row",
    }]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_prefixes_cover_ranges_exactly() {
        for (lo, hi) in [
            (0u16, 65535u16),
            (80, 80),
            (1, 65535),
            (1000, 2000),
            (0, 0),
            (65535, 65535),
            (7, 9),
        ] {
            let blocks = port_prefixes(lo, hi);
            let mut covered = Vec::new();
            for (start, bits) in &blocks {
                let size = 1u32 << (16 - bits);
                assert_eq!(u32::from(*start) % size, 0, "{start}/{bits} is aligned");
                covered.extend(u32::from(*start)..u32::from(*start) + size);
            }
            let want: Vec<u32> = (u32::from(lo)..=u32::from(hi)).collect();
            assert_eq!(covered, want, "{lo}-{hi}");
            assert!(blocks.len() <= 32);
        }
    }

    /// Tables of every verdict mix, both directions, tracked or not, in every form: each
    /// program, and the proxy device's, passes cnpc's checker (the kernel's verdict on the same
    /// shapes is in runtime-loader's tests).
    #[test]
    fn every_form_passes_the_checker() {
        use cnpc_ir::*;
        let proxy = || TableVerdict::Proxy(Vec::new());
        let verdicts = [TableVerdict::Allow, TableVerdict::Deny, proxy()];
        let mut checked = 0;
        for direction in [Direction::Ingress, Direction::Egress] {
            for default in &verdicts {
                for rows in [
                    vec![],
                    vec![proxy()],
                    vec![TableVerdict::Allow, proxy()],
                    vec![TableVerdict::Deny, TableVerdict::Allow],
                    verdicts.to_vec(),
                ] {
                    let table = DecisionTable {
                        subject: NumericIdentity(300),
                        direction,
                        default: default.clone(),
                        classes: vec![IdentityClass {
                            members: vec![NumericIdentity(400), NumericIdentity(401)],
                        }],
                        rows: rows
                            .iter()
                            .enumerate()
                            .map(|(i, v)| TableRow {
                                class: 0,
                                protocol: Protocol::Tcp,
                                ports: PortRange::single(80 + i as u16),
                                verdict: v.clone(),
                            })
                            .collect(),
                    };
                    for track in [false, true] {
                        let forms = [
                            Strategy::Constant,
                            Strategy::Branches,
                            Strategy::BinarySearch,
                            Strategy::Maps,
                            Strategy::HashBaseline,
                            Strategy::ParseOnly,
                        ]
                        .map(|s| (s, None))
                        .into_iter()
                        .chain([
                            (Strategy::Maps, Some(MapKeys::Identity)),
                            (Strategy::Maps, Some(MapKeys::Class)),
                        ]);
                        let hosts = HostAddresses::new(&[
                            ("10.0.0.4/32".parse().unwrap(), NumericIdentity(400)),
                            ("10.0.0.5/32".parse().unwrap(), NumericIdentity(401)),
                            ("fd00::4/128".parse().unwrap(), NumericIdentity(400)),
                        ]);
                        let in_code = Inline::new(&hosts);
                        let in_map = Inline {
                            max_code_addresses: 0,
                            max_window_slots: 0,
                            ..in_code
                        };
                        let in_window = Inline {
                            max_code_addresses: 0,
                            ..in_code
                        };
                        let inlined = [
                            (Strategy::Branches, in_code),
                            (Strategy::Maps, in_map),
                            (Strategy::Maps, in_window),
                            (Strategy::BinarySearch, in_window),
                        ]
                        .map(|(s, i)| build_inlined(&table, track, s, &i));
                        let plain = forms.map(|(strategy, keys)| match keys {
                            Some(k) => build_keyed(&table, track, strategy, k),
                            None => build(&table, track, strategy),
                        });
                        for (i, g) in plain.into_iter().chain(inlined).enumerate() {
                            let (strategy, keys) = (g.strategy, g.map_keys());
                            if let Err(e) = crate::check::check(&g.program) {
                                panic!(
                                    "{direction:?} {default:?} {rows:?} track={track} {strategy:?} {keys:?}: {e:?}\n{}",
                                    crate::disasm::listing(&g.program)
                                );
                            }
                            let asked = [None, None, None, None, None, None]
                                .into_iter()
                                .chain([Some(MapKeys::Identity), Some(MapKeys::Class)])
                                .nth(i)
                                .flatten();
                            if asked.is_some() && !rows.is_empty() {
                                assert_eq!(keys, asked, "the layout asked for");
                            }
                            // Rows name the members: the inlined forms hold their addresses,
                            // in code, in the address map or in windows.
                            if i >= 8 && !rows.is_empty() && strategy != Strategy::Constant {
                                assert_eq!(g.inlined.len(), 3, "{i}");
                                let has =
                                    |prefix| g.maps.iter().any(|m| m.def.name.starts_with(prefix));
                                assert_eq!(has(ADDRESS_MAP_PREFIX), i == 9);
                                assert_eq!(has(ADDRESS_WINDOW_MAP_PREFIX), i >= 10);
                                assert_eq!(has(ADDRESS_CLASS_MAP_PREFIX), i >= 10);
                            }
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(checked, 2 * 3 * 5 * 2 * 12);
        crate::check::check(&proxy_device_program()).expect("the proxy device program");
    }

    /// A table of large classes with port ranges, single ports, overlapping deny and allow
    /// rows, a proxy row and several protocols.
    fn large_table() -> DecisionTable {
        use cnpc_ir::*;
        let ids = |from: u32, n: u32| (from..from + n).map(NumericIdentity).collect();
        let row = |class, protocol, lo, hi, verdict| TableRow {
            class,
            protocol,
            ports: PortRange { lo, hi },
            verdict,
        };
        DecisionTable {
            subject: NumericIdentity(300),
            direction: Direction::Egress,
            default: TableVerdict::Deny,
            classes: vec![
                IdentityClass {
                    members: ids(1000, 150),
                },
                IdentityClass {
                    members: ids(2000, 70),
                },
                IdentityClass {
                    members: vec![NumericIdentity(2), NumericIdentity(1 << 24)],
                },
                IdentityClass {
                    members: ids(5000, 3),
                },
            ],
            rows: vec![
                row(0, Protocol::Tcp, 2000, 2999, TableVerdict::Deny),
                row(0, Protocol::Tcp, 1025, 9000, TableVerdict::Allow),
                row(0, Protocol::Udp, 53, 53, TableVerdict::Proxy(Vec::new())),
                row(1, Protocol::Tcp, 30000, 32767, TableVerdict::Allow),
                row(1, Protocol::Tcp, 80, 80, TableVerdict::Allow),
                row(1, Protocol::Sctp, 0, 65535, TableVerdict::Allow),
                row(2, Protocol::Udp, 5001, 5038, TableVerdict::Allow),
                row(2, Protocol::Icmp, 8, 8, TableVerdict::Allow),
                row(3, Protocol::Tcp, 443, 443, TableVerdict::Allow),
            ],
        }
    }

    /// Map images indexed for lookups the way the program makes them.
    struct Images {
        class: Option<std::collections::HashMap<Vec<u8>, Vec<u8>>>,
        exact: std::collections::HashMap<Vec<u8>, Vec<u8>>,
        /// Port-prefix records by their key (prefix length first).
        ranges: std::collections::HashMap<Vec<u8>, Vec<u8>>,
    }

    impl Images {
        fn new(g: &Generated) -> Images {
            let of = |prefix: &str| {
                g.maps
                    .iter()
                    .find(|m| m.def.name.starts_with(prefix))
                    .map(|m| m.records.iter().cloned().collect())
            };
            Images {
                class: of(CLASS_MAP_PREFIX),
                exact: of(PORT_MAP_PREFIX).unwrap_or_default(),
                ranges: of(RANGE_MAP_PREFIX).unwrap_or_default(),
            }
        }

        /// The identity-to-class map (class keys), the exact-port hash map, then the longest
        /// matching port prefix: the verdict code and row, or `None` for the default.
        fn lookup(&self, peer: u32, proto: Protocol, port: u16) -> Option<(u32, u32)> {
            let word = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            let id = match &self.class {
                Some(cls) => word(cls.get(&peer.to_le_bytes().to_vec())?),
                None => peer,
            };
            let value = |v: &Vec<u8>| (word(&v[0..4]), word(&v[4..8]));
            let mut key = id.to_be_bytes().to_vec();
            key.extend([proto.number(), 0]);
            if let Some(v) = self.exact.get(&[&key[..], &port.to_be_bytes()].concat()) {
                return Some(value(v));
            }
            (0..=16u32).rev().find_map(|bits| {
                let masked = if bits == 0 {
                    0
                } else {
                    port & (u16::MAX << (16 - bits))
                };
                let k = [&(48 + bits).to_le_bytes()[..], &key, &masked.to_be_bytes()].concat();
                self.ranges.get(&k).map(value)
            })
        }
    }

    /// Both layouts of the maps give every peer, protocol and boundary port the table's own
    /// verdict and row (the kernel's agreement with the evaluator on both is in this crate's
    /// tests/map_layouts.rs).
    #[test]
    fn map_images_decide_like_the_table_in_both_layouts() {
        let table = large_table();
        let mut peers: Vec<u32> = table
            .classes
            .iter()
            .flat_map(|c| c.members.iter().map(|m| m.0))
            .collect();
        peers.extend([1, 3, 999, 1150, 4999, 7000]);
        let mut ports: Vec<u16> = vec![0, 1, 65535];
        for r in &table.rows {
            ports.extend([r.ports.lo, r.ports.hi]);
            ports.extend(r.ports.lo.checked_sub(1));
            ports.extend(r.ports.hi.checked_add(1));
        }
        for keys in [MapKeys::Identity, MapKeys::Class] {
            let g = build_keyed(&table, true, Strategy::Maps, keys);
            assert_eq!(g.map_keys(), Some(keys));
            let images = Images::new(&g);
            for &peer in &peers {
                for proto in Protocol::ALL {
                    for &port in &ports {
                        let want = table.lookup(cnpc_ir::NumericIdentity(peer), proto, port);
                        let got = images.lookup(peer, proto, port);
                        assert_eq!(
                            got.map_or(verdict_code(&table.default), |(v, _)| v),
                            verdict_code(want),
                            "{keys:?} peer {peer} {proto:?} {port}"
                        );
                        if let Some((_, row)) = got {
                            assert_eq!(&table.rows[row as usize].verdict, want);
                        }
                    }
                }
            }
        }
    }

    /// Ranges towards large classes are keyed by class, and the images then grow with classes
    /// and prefixes, plus one record per member; tables of single ports to single peers (the
    /// datapath benchmark's) keep identity keys, which save the class lookup.
    #[test]
    fn class_keys_when_they_take_less_than_half_the_bytes() {
        let table = large_table();
        assert_eq!(map_keys(&table), MapKeys::Class);
        let g = generate(&table, true);
        assert_eq!(g.strategy, Strategy::Maps);
        assert_eq!(g.map_keys(), Some(MapKeys::Class));
        let records = |g: &Generated| g.maps.iter().map(|m| m.records.len()).sum::<usize>();
        let members: usize = table.classes.iter().map(|c| c.members.len()).sum();
        let prefixes: usize = segments(&table)
            .values()
            .flatten()
            .map(|s| port_prefix_count(s.lo, s.hi))
            .sum();
        assert_eq!(records(&g), members + prefixes);
        let flat = build_keyed(&table, true, Strategy::Maps, MapKeys::Identity);
        assert!(
            records(&flat) > 10 * records(&g),
            "{} records by identity, {} by class",
            records(&flat),
            records(&g)
        );

        use cnpc_ir::*;
        let single = DecisionTable {
            subject: NumericIdentity(300),
            direction: Direction::Ingress,
            default: TableVerdict::Deny,
            classes: (0..1000)
                .map(|i| IdentityClass {
                    members: vec![NumericIdentity(1000 + i)],
                })
                .collect(),
            rows: (0..1000)
                .map(|i| TableRow {
                    class: i,
                    protocol: Protocol::Tcp,
                    ports: PortRange::single(8000 + i as u16),
                    verdict: TableVerdict::Allow,
                })
                .collect(),
        };
        assert_eq!(map_keys(&single), MapKeys::Identity);
        let g = generate(&single, true);
        assert_eq!(g.map_keys(), Some(MapKeys::Identity));
        assert_eq!(records(&g), 1000);

        // One large class on one port: class keys would halve the bytes at the price of a
        // lookup per packet; the generator keeps identity keys. On a range it keys by class.
        let mut wide = DecisionTable {
            subject: NumericIdentity(300),
            direction: Direction::Ingress,
            default: TableVerdict::Deny,
            classes: vec![IdentityClass {
                members: (1000..6000).map(NumericIdentity).collect(),
            }],
            rows: vec![TableRow {
                class: 0,
                protocol: Protocol::Tcp,
                ports: PortRange::single(80),
                verdict: TableVerdict::Allow,
            }],
        };
        assert_eq!(map_keys(&wide), MapKeys::Identity);
        // A range record (20 bytes) per member against one class record (8).
        wide.rows[0].ports = PortRange { lo: 80, hi: 81 };
        assert_eq!(map_keys(&wide), MapKeys::Class, "one prefix");
        wide.rows[0].ports = PortRange { lo: 79, hi: 81 };
        let g = generate(&wide, true);
        assert_eq!(g.map_keys(), Some(MapKeys::Class), "two prefixes");
        assert_eq!(records(&g), 5000 + 2);
    }

    #[test]
    fn prefix_count_matches_the_prefixes() {
        for lo in (0u16..200).chain([1000, 1025, 30000, 65000, 65535]) {
            for hi in [
                lo,
                lo.saturating_add(1),
                lo.saturating_add(37),
                lo.saturating_add(1000),
                65535,
            ] {
                assert_eq!(port_prefix_count(lo, hi), port_prefixes(lo, hi).len());
            }
        }
    }

    #[test]
    fn segments_follow_first_match() {
        use cnpc_ir::*;
        let row = |lo, hi, verdict| TableRow {
            class: 0,
            protocol: Protocol::Tcp,
            ports: PortRange { lo, hi },
            verdict,
        };
        let table = DecisionTable {
            subject: NumericIdentity(300),
            direction: Direction::Ingress,
            default: TableVerdict::Deny,
            classes: vec![IdentityClass {
                members: vec![NumericIdentity(400)],
            }],
            rows: vec![
                row(80, 90, TableVerdict::Allow),
                row(0, 65535, TableVerdict::Deny),
            ],
        };
        let s = &segments(&table)[&(0, Protocol::Tcp)];
        let got: Vec<(u16, u16, usize)> = s.iter().map(|s| (s.lo, s.hi, s.row)).collect();
        assert_eq!(got, [(0, 79, 1), (80, 90, 0), (91, 65535, 1)]);
        for port in [0, 79, 80, 90, 91, 65535] {
            let seg = s.iter().find(|s| s.lo <= port && port <= s.hi).unwrap();
            assert_eq!(
                &table.rows[seg.row].verdict,
                table.lookup(NumericIdentity(400), Protocol::Tcp, port)
            );
        }
    }
}
