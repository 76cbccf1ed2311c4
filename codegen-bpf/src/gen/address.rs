//! Peers found by address ([`super::generate_inlined`]; the semantics are in the parent module's
//! doc, "Peers by address"): the host addresses of the identities a table's rows name, compared
//! in code, looked up in address windows (array maps) or in an address map, before the ipcache.

use super::*;

/// Host addresses per identity: what the [`HOSTS_MAP`] holds (endpoints and nodes; the rule of
/// [`crate::artifacts::is_host_entry`]), indexed for [`generate_inlined`]. Built once per
/// ipcache and shared by every program generated from it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostAddresses {
    by_identity: BTreeMap<u32, Vec<IpAddr>>,
}

impl HostAddresses {
    /// The host entries of `ipcache`. An address listed twice with different identities is
    /// left out (the map would hold one of them, whichever was written last): its packets take
    /// the lookup.
    pub fn new(ipcache: &[(IpNet, NumericIdentity)]) -> HostAddresses {
        let mut by_address: BTreeMap<IpAddr, Option<u32>> = BTreeMap::new();
        for (net, id) in ipcache {
            if !crate::artifacts::is_host_entry(*net, *id) {
                continue;
            }
            by_address
                .entry(net.addr())
                .and_modify(|known| {
                    if *known != Some(id.0) {
                        *known = None;
                    }
                })
                .or_insert(Some(id.0));
        }
        let mut by_identity: BTreeMap<u32, Vec<IpAddr>> = BTreeMap::new();
        for (ip, id) in by_address {
            if let Some(id) = id {
                by_identity.entry(id).or_default().push(ip);
            }
        }
        HostAddresses { by_identity }
    }

    /// The addresses of `id`, sorted.
    pub fn of(&self, id: NumericIdentity) -> &[IpAddr] {
        self.by_identity.get(&id.0).map_or(&[], Vec::as_slice)
    }
}

/// The input of [`generate_inlined`]: the ipcache's host addresses and how much a program may
/// spend on them.
#[derive(Clone, Copy, Debug)]
pub struct Inline<'a> {
    pub hosts: &'a HostAddresses,
    /// Addresses per family up to which they are compared in code ([`INLINE_MAX_ADDRESSES`]).
    pub max_code_addresses: usize,
    /// Records the address map may hold when the addresses are too many for code and for
    /// windows: one per address and single port of its class ([`INLINE_MAX_MAP_RECORDS`]; 0:
    /// no address map, those programs look every peer up).
    pub max_map_records: usize,
    /// Slots the address windows may take when the addresses are too many for code
    /// ([`INLINE_MAX_WINDOW_SLOTS`]; 0: no windows, the address map is tried instead).
    pub max_window_slots: usize,
}

impl<'a> Inline<'a> {
    /// `hosts` with the default bounds.
    pub fn new(hosts: &'a HostAddresses) -> Inline<'a> {
        Inline {
            hosts,
            max_code_addresses: INLINE_MAX_ADDRESSES,
            max_map_records: INLINE_MAX_MAP_RECORDS,
            max_window_slots: INLINE_MAX_WINDOW_SLOTS,
        }
    }
}

/// Addresses per family up to which known peers are compared in code (a search tree of at most
/// seven levels); beyond, they go into address windows or, too sparse for windows, the address
/// map (module doc, "Peers by address").
pub const INLINE_MAX_ADDRESSES: usize = 64;
/// The default of [`Inline::max_map_records`]: an address map's records cost about 100 bytes
/// each in the kernel (key, value and hash-table element), so this bounds one program's map
/// at about 3 MiB.
pub const INLINE_MAX_MAP_RECORDS: usize = 32_768;
/// Name prefix of the address map ([`by_address`]).
pub const ADDRESS_MAP_PREFIX: &str = "adr_";
/// The default of [`Inline::max_window_slots`]: a slot is 8 bytes of an array map, so this
/// bounds one program's address windows at 512 KiB (the kernel allocates an array whole:
/// kernel/bpf/arraymap.c `array_map_alloc`).
pub const INLINE_MAX_WINDOW_SLOTS: usize = 65_536;
/// Address windows per family at most (each costs a subtraction and a compare per packet).
pub const INLINE_MAX_WINDOWS: usize = 4;
/// Slots per held address the windows may take at most: denser windows than one address in
/// eight, so that they never take more bytes than the address map's records would (about 100
/// bytes per address and port; a slot is 8).
pub const WINDOW_SLOTS_PER_ADDRESS: usize = 8;
/// Port segments of a class its record in the class array holds at most; a class with more
/// is decided by the table's own decision for the ports its record does not hold.
pub const WINDOW_CLASS_ENTRIES: usize = 4;
/// Name prefixes of the address windows' slot array and class array ([`by_window`]).
pub const ADDRESS_WINDOW_MAP_PREFIX: &str = "adw_";
pub const ADDRESS_CLASS_MAP_PREFIX: &str = "adc_";
/// Bytes of a class entry in the class array: `u16 lo, u16 hi, u8 protocol, u8 verdict, u16
/// zero, u32 row`.
const CLASS_ENTRY_BYTES: usize = 12;

/// The peers of `table` found in `inline.hosts`: (address, identity, class) for every member
/// of a class with rows, sorted by address. Other peers (the world, reserved identities,
/// prefixes, learned names, and identities no row names) are looked up as before.
fn peers_by_address(table: &DecisionTable, hosts: &HostAddresses) -> Vec<(IpAddr, u32, u32)> {
    let with_rows: std::collections::BTreeSet<u32> = table.rows.iter().map(|r| r.class).collect();
    let mut out: Vec<(IpAddr, u32, u32)> = membership(table)
        .into_iter()
        // Identities are moved into registers as sign-extended immediates.
        .filter(|(m, c)| with_rows.contains(c) && *m < 1 << 31)
        .flat_map(|(m, c)| {
            hosts
                .of(NumericIdentity(m))
                .iter()
                .map(move |ip| (*ip, m, c))
        })
        .collect();
    out.sort();
    out
}

/// The address as the program holds it: 32-bit words as loaded from the packet (network-order
/// bytes read little-endian), one for IPv4, four for IPv6.
fn address_words(ip: IpAddr) -> Vec<u32> {
    let bytes = match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    bytes
        .chunks(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// What a form of finding peers by address reads and holds: its maps, and the addresses whose
/// identity it holds ([`Generated::inlined`]).
type HeldPeers = (Vec<MapImage>, Vec<(IpAddr, NumericIdentity)>);

/// The fast path of [`generate_inlined`] (module doc, "Peers by address"), emitted before the
/// ipcache lookup, which follows as the slow path: with the peer's address at KEY, either a
/// search tree in code that jumps to `decide` with r1 = the identity the address has, address
/// windows ([`by_window`]), or a lookup in the address map whose hit is the verdict itself.
/// Anything else falls through. Returns the maps, if any, and the addresses held.
pub(super) fn by_address(
    a: &mut Asm,
    table: &DecisionTable,
    inline: &Inline,
    tails: &Tails,
    decide: Label,
) -> HeldPeers {
    let peers = peers_by_address(table, inline.hosts);
    let (v4, v6): (Vec<_>, Vec<_>) = peers.iter().partition(|(ip, _, _)| ip.is_ipv4());
    if peers.is_empty() {
        return (Vec::new(), Vec::new());
    }
    let slow = a.label();
    let code = inline.max_code_addresses.min(INLINE_MAX_ADDRESSES);
    if v4.len() <= code && v6.len() <= code {
        let not_v4 = a.label();
        a.load(Size::W, R1, R10, KEY + 4);
        for (family, peers, regs, next) in [
            (4, &v4, &[R2][..], not_v4),
            (6, &v6, &[R2, R3, R4, R5][..], slow),
        ] {
            if family == 6 {
                a.bind(not_v4);
            }
            if peers.is_empty() {
                if family == 4 {
                    a.goto(next);
                }
                continue;
            }
            a.jump_if(Cond::Ne, R1, Src::Imm(family), next);
            for (w, r) in regs.iter().enumerate() {
                a.load(Size::W, *r, R10, KEY + 8 + 4 * w as i16);
            }
            let hits: Vec<(Vec<u32>, Label, u32)> = peers
                .iter()
                .map(|(ip, id, _)| (address_words(*ip), a.label(), *id))
                .collect();
            let mut keys: Vec<(Vec<u32>, Label)> =
                hits.iter().map(|(w, l, _)| (w.clone(), *l)).collect();
            keys.sort_by(|x, y| x.0.cmp(&y.0));
            address_search(a, regs, &keys, slow);
            for (_, label, id) in hits {
                a.bind(label);
                a.mov(R1, Src::Imm(id as i32)).goto(decide);
            }
        }
        a.bind(slow);
        let held = peers
            .iter()
            .map(|(ip, id, _)| (*ip, NumericIdentity(*id)))
            .collect();
        return (Vec::new(), held);
    }
    // Too many addresses for code: address windows when the addresses are dense enough.
    if let Some(found) = by_window(a, table, &peers, inline, tails, decide, slow) {
        return found;
    }
    // Otherwise an address map of the single ports (a port range is many ports: those packets
    // take the lookup, as do ports no single-port row names).
    let segments = segments(table);
    let mut singles: BTreeMap<u32, Vec<(Protocol, u16, &TableVerdict, usize)>> = BTreeMap::new();
    for ((class, proto), segs) in &segments {
        for s in segs.iter().filter(|s| s.lo == s.hi) {
            singles.entry(*class).or_default().push((
                *proto,
                s.lo,
                &table.rows[s.row].verdict,
                s.row,
            ));
        }
    }
    let records_wanted: usize = peers
        .iter()
        .map(|(_, _, c)| singles.get(c).map_or(0, Vec::len))
        .sum();
    if records_wanted == 0 || records_wanted > inline.max_map_records {
        return (Vec::new(), Vec::new());
    }
    let mut records: Vec<Record> = Vec::with_capacity(records_wanted);
    let mut held = Vec::new();
    for (ip, id, class) in &peers {
        let Some(ports) = singles.get(class) else {
            continue;
        };
        held.push((*ip, NumericIdentity(*id)));
        let mut address = crate::artifacts::fqdn_key(*ip);
        for (proto, port, verdict, row) in ports {
            let mut k = address.clone();
            k.extend([ip_proto(*proto) as u8, 0]);
            k.extend(port.to_be_bytes());
            let mut v = verdict_code(verdict).to_le_bytes().to_vec();
            v.extend((*row as u32).to_le_bytes());
            v.extend(id.to_le_bytes());
            records.push((k, v));
        }
        address.clear();
    }
    records.sort();
    let name = content_name(&ADDRESS_MAP_PREFIX[..3], &records);
    // Key: the host map's key (family word, 16 address bytes), protocol, zero, be16 port.
    for w in 0..5 {
        a.load(Size::W, R1, R10, KEY + 4 + 4 * w).store(
            Size::W,
            R10,
            ADDR_KEY + 4 * w,
            Src::Reg(R1),
        );
    }
    a.store(Size::B, R10, ADDR_KEY + 20, Src::Reg(PROTO)).store(
        Size::B,
        R10,
        ADDR_KEY + 21,
        Src::Imm(0),
    );
    a.load(Size::W, R1, R10, PORT)
        .push(Insn::ToBe { dst: R1, bits: 16 })
        .store(Size::H, R10, ADDR_KEY + 22, Src::Reg(R1));
    a.ld_map(R1, &name);
    a.mov(R2, Src::Reg(R10))
        .alu(AluOp::Add, R2, Src::Imm(i32::from(ADDR_KEY)));
    a.call(MAP_LOOKUP_ELEM);
    a.jump_if(Cond::Eq, R0, Src::Imm(0), slow);
    a.load(Size::W, R1, R0, 8)
        .store(Size::W, R10, EVT + event::PEER as i16, Src::Reg(R1));
    a.load(Size::W, R3, R0, 4).load(Size::W, R1, R0, 0);
    tails.dispatch(a);
    a.bind(slow);
    let map = MapImage {
        def: MapDef {
            name,
            map_type: BPF_MAP_TYPE_HASH,
            key_size: 24,
            value_size: 12,
            max_entries: records.len() as u32,
            flags: 0,
        },
        records,
        key_layout: "u32 family, u8[16] address, u8 protocol, u8 zero, be16 port",
        value_layout: "u32 verdict (0 allow, 1 deny, 2 proxy), u32 row, u32 identity",
    };
    (vec![map], held)
}

/// A window of addresses held in the slot array of [`by_window`]: the addresses whose upper
/// words are `upper` and whose last 32 bits (host order) are in `base .. base + len`, at slots
/// `offset ..`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Window {
    /// IPv6: the first three words as [`address_words`] gives them (compared in code); empty
    /// for IPv4.
    upper: Vec<u32>,
    base: u32,
    len: u32,
    offset: u32,
}

/// An address as its window sees it: the upper words (IPv6 only) and the last 32 bits in host
/// order (what the program computes with after a byte swap).
fn window_parts(ip: IpAddr) -> (Vec<u32>, u32) {
    match ip {
        IpAddr::V4(v4) => (Vec::new(), u32::from(v4)),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            (
                address_words(ip)[..3].to_vec(),
                u32::from_be_bytes([o[12], o[13], o[14], o[15]]),
            )
        }
    }
}

/// A window's (upper words, base, length) before it is placed in the slot array.
type WindowSpan = (Vec<u32>, u32, u32);

/// The fewest windows (at most `max` for these addresses of one family) that hold them all in
/// at most `budget` slots, or `None`. Addresses with other upper words need windows of their
/// own; beyond that the windows are cut at the widest gaps between consecutive addresses,
/// which for a given number of windows leaves the fewest slots.
fn address_windows(addrs: &[IpAddr], max: usize, budget: u64) -> Option<Vec<WindowSpan>> {
    let mut groups: BTreeMap<Vec<u32>, Vec<u32>> = BTreeMap::new();
    for ip in addrs {
        let (upper, low) = window_parts(*ip);
        groups.entry(upper).or_default().push(low);
    }
    if groups.len() > max {
        return None;
    }
    let mut span: u64 = 0;
    // (slots a cut saves, group, index of the address after the cut)
    let mut gaps: Vec<(u64, usize, usize)> = Vec::new();
    for (g, lows) in groups.values_mut().enumerate() {
        lows.sort_unstable();
        lows.dedup();
        // Non-empty: each group holds the address it was made for.
        span += u64::from(lows[lows.len() - 1] - lows[0]) + 1;
        for (i, pair) in lows.windows(2).enumerate() {
            let gap = u64::from(pair[1] - pair[0] - 1);
            if gap > 0 {
                gaps.push((gap, g, i + 1));
            }
        }
    }
    // Widest first; ties by position, so that the same addresses give the same windows.
    gaps.sort_by(|x, y| y.0.cmp(&x.0).then((x.1, x.2).cmp(&(y.1, y.2))));
    let mut cuts = 0;
    while span > budget {
        if groups.len() + cuts >= max || cuts >= gaps.len() {
            return None;
        }
        span -= gaps[cuts].0;
        cuts += 1;
    }
    let mut cut: Vec<(usize, usize)> = gaps[..cuts].iter().map(|&(_, g, i)| (g, i)).collect();
    cut.sort_unstable();
    let mut out = Vec::new();
    for (g, (upper, lows)) in groups.into_iter().enumerate() {
        let mut start = 0;
        let ends = cut
            .iter()
            .filter(|(cg, _)| *cg == g)
            .map(|(_, i)| *i)
            .chain([lows.len()]);
        for end in ends {
            let (lo, hi) = (lows[start], lows[end - 1]);
            // No overflow: the window's slots, hi - lo + 1, are within the span accepted
            // above, at most `budget`, which callers keep at most u32::MAX.
            out.push((upper.clone(), lo, hi - lo + 1));
            start = end;
        }
    }
    Some(out)
}

/// The address windows form of [`by_address`] (module doc, "Peers by address"), for tables
/// whose held addresses fall in a few dense windows: a slot array indexed by the address's
/// place in its window gives the address's identity and class (`adw_*`, ARRAY, key `u32
/// slot`, value `u32 identity, u32 class`; identity 0: no address held there), and a class
/// array (`adc_*`, ARRAY, key `u32 class`, value `u32 flags, K × {u16 lo, u16 hi, u8
/// protocol, u8 verdict, u16 zero, u32 row}`) the class's port segments, compared in code;
/// flag bit 0 says they are all of them, so a miss is the default. A class with more than
/// [`WINDOW_CLASS_ENTRIES`] segments holds the first ones, and a miss goes on to the table's
/// own decision with the identity. Array lookups are inlined by the verifier into a bounds
/// check and an add (kernel/bpf/arraymap.c `array_map_gen_lookup`): no hashing.
///
/// Emits nothing and returns `None` when the addresses do not fit: more than
/// [`INLINE_MAX_WINDOWS`] windows per family or more slots than [`Inline::max_window_slots`]
/// or [`WINDOW_SLOTS_PER_ADDRESS`] per address would take.
fn by_window(
    a: &mut Asm,
    table: &DecisionTable,
    peers: &[(IpAddr, u32, u32)],
    inline: &Inline,
    tails: &Tails,
    decide: Label,
    slow: Label,
) -> Option<HeldPeers> {
    // Identity 0 marks an empty slot: such a peer (none in Cilium) is looked up.
    let peers: Vec<&(IpAddr, u32, u32)> = peers.iter().filter(|p| p.1 != 0).collect();
    if peers.is_empty() || inline.max_window_slots == 0 {
        return None;
    }
    let budget = (inline.max_window_slots as u64)
        .min((WINDOW_SLOTS_PER_ADDRESS * peers.len()) as u64)
        .min(u64::from(u32::MAX));
    let (v4, v6): (Vec<IpAddr>, Vec<IpAddr>) = peers.iter().map(|p| p.0).partition(IpAddr::is_ipv4);
    let mut windows: [Vec<Window>; 2] = Default::default();
    let mut used: u64 = 0;
    for (family, addrs) in [v4, v6].iter().enumerate() {
        if addrs.is_empty() {
            continue;
        }
        for (upper, base, len) in address_windows(addrs, INLINE_MAX_WINDOWS, budget - used)? {
            windows[family].push(Window {
                upper,
                base,
                len,
                // Below `budget`, itself at most u32::MAX.
                offset: used as u32,
            });
            used += u64::from(len);
        }
    }
    // The slots: the identity and class of each held address.
    let mut slots: Vec<Record> = Vec::with_capacity(peers.len());
    let mut held = Vec::with_capacity(peers.len());
    for (ip, id, class) in &peers {
        let (upper, low) = window_parts(*ip);
        let family = usize::from(ip.is_ipv6());
        // address_windows put every address in a window of its family.
        let w = windows[family]
            .iter()
            .find(|w| w.upper == upper && low.wrapping_sub(w.base) < w.len)
            .expect("every held address is in a window");
        let slot = w.offset + (low - w.base);
        let mut v = id.to_le_bytes().to_vec();
        v.extend(class.to_le_bytes());
        slots.push((slot.to_le_bytes().to_vec(), v));
        held.push((*ip, NumericIdentity(*id)));
    }
    slots.sort();
    // The classes: their port segments (every protocol), first K.
    let segments = segments(table);
    let mut of_class: BTreeMap<u32, Vec<(Protocol, Segment)>> = BTreeMap::new();
    for ((class, proto), segs) in &segments {
        of_class
            .entry(*class)
            .or_default()
            .extend(segs.iter().map(|s| (*proto, *s)));
    }
    let classes_held: std::collections::BTreeSet<u32> = peers.iter().map(|p| p.2).collect();
    let k = classes_held
        .iter()
        .map(|c| of_class.get(c).map_or(0, Vec::len))
        .max()
        .unwrap_or(0)
        .clamp(1, WINDOW_CLASS_ENTRIES);
    let mut classes: Vec<Record> = Vec::with_capacity(classes_held.len());
    let (mut complete, mut partial) = (false, false);
    for c in &classes_held {
        let segs = of_class.get(c).map_or(&[][..], Vec::as_slice);
        let whole = segs.len() <= k;
        complete |= whole;
        partial |= !whole;
        let mut v = u32::from(whole).to_le_bytes().to_vec();
        for j in 0..k {
            match segs.get(j) {
                Some((proto, s)) => {
                    v.extend(s.lo.to_le_bytes());
                    v.extend(s.hi.to_le_bytes());
                    v.extend([
                        ip_proto(*proto) as u8,
                        verdict_code(&table.rows[s.row].verdict) as u8,
                        0,
                        0,
                    ]);
                    v.extend((s.row as u32).to_le_bytes());
                }
                // An empty entry: lo > hi, no port is in it.
                None => {
                    v.extend(u16::MAX.to_le_bytes());
                    v.extend(0u16.to_le_bytes());
                    v.extend([0; 8]);
                }
            }
        }
        classes.push((c.to_le_bytes().to_vec(), v));
    }
    let slot_map = content_name(&ADDRESS_WINDOW_MAP_PREFIX[..3], &slots);
    let class_map = content_name(&ADDRESS_CLASS_MAP_PREFIX[..3], &classes);

    // The address's slot: r1 = offset + (last 32 bits − base) of the window holding it.
    let index = a.label();
    let not_v4 = a.label();
    a.load(Size::W, R1, R10, KEY + 4);
    a.jump_if(Cond::Ne, R1, Src::Imm(4), not_v4);
    let window_check = |a: &mut Asm, w: &Window, regs: &[Reg]| {
        let next = a.label();
        for (r, word) in regs.iter().zip(&w.upper) {
            a.jump32_if(Cond::Ne, *r, Src::Imm(*word as i32), next);
        }
        // 32-bit arithmetic: below the base wraps to a large index, which the compare refuses.
        a.mov(R1, Src::Reg(R2)).push(Insn::Alu {
            op: AluOp::Sub,
            wide: false,
            dst: R1,
            src: Src::Imm(w.base as i32),
        });
        a.jump32_if(Cond::Ge, R1, Src::Imm(w.len as i32), next);
        if w.offset != 0 {
            a.push(Insn::Alu {
                op: AluOp::Add,
                wide: false,
                dst: R1,
                src: Src::Imm(w.offset as i32),
            });
        }
        a.goto(index);
        a.bind(next);
    };
    if !windows[0].is_empty() {
        a.load(Size::W, R2, R10, KEY + 8)
            .push(Insn::ToBe { dst: R2, bits: 32 });
        for w in &windows[0] {
            window_check(a, w, &[]);
        }
    }
    a.goto(slow);
    a.bind(not_v4);
    if !windows[1].is_empty() {
        a.jump_if(Cond::Ne, R1, Src::Imm(6), slow);
        a.load(Size::W, R2, R10, KEY + 20)
            .push(Insn::ToBe { dst: R2, bits: 32 });
        for (w, r) in [R3, R4, R5].into_iter().enumerate() {
            a.load(Size::W, r, R10, KEY + 8 + 4 * w as i16);
        }
        for w in &windows[1] {
            window_check(a, w, &[R3, R4, R5]);
        }
    }
    a.goto(slow);

    // The slot: an empty one (identity 0) is an address not held.
    a.bind(index);
    let lookup = |a: &mut Asm, map: &str| {
        a.store(Size::W, R10, SCRATCH, Src::Reg(R1));
        a.ld_map(R1, map);
        a.mov(R2, Src::Reg(R10))
            .alu(AluOp::Add, R2, Src::Imm(i32::from(SCRATCH)));
        a.call(MAP_LOOKUP_ELEM);
    };
    lookup(a, &slot_map);
    // Never null: the index is below the array's size (the verifier wants the check).
    a.jump_if(Cond::Eq, R0, Src::Imm(0), slow);
    a.load(Size::W, R1, R0, 0);
    a.jump_if(Cond::Eq, R1, Src::Imm(0), slow);
    a.store(Size::W, R10, EVT + event::PEER as i16, Src::Reg(R1));
    a.load(Size::W, R1, R0, 4);
    lookup(a, &class_map);
    // The identity's own decision: a port the class's record does not hold.
    let known = a.label();
    a.jump_if(Cond::Eq, R0, Src::Imm(0), known);
    a.load(Size::W, R2, R10, PORT);
    for j in 0..k {
        let at = 4 + (CLASS_ENTRY_BYTES * j) as i16;
        let next = a.label();
        a.load(Size::B, R4, R0, at + 4);
        a.jump_if(Cond::Ne, R4, Src::Reg(PROTO), next);
        a.load(Size::H, R4, R0, at);
        a.jump_if(Cond::Lt, R2, Src::Reg(R4), next);
        a.load(Size::H, R4, R0, at + 2);
        a.jump_if(Cond::Gt, R2, Src::Reg(R4), next);
        a.load(Size::W, R3, R0, at + 8)
            .load(Size::B, R1, R0, at + 5);
        tails.dispatch(a);
        a.bind(next);
    }
    // Known at generation time when every class is complete, or none is.
    match (complete, partial) {
        (true, true) => {
            let default = a.label();
            a.load(Size::W, R4, R0, 0);
            a.jump_if(Cond::Set, R4, Src::Imm(1), default);
            a.goto(known);
            a.bind(default);
            verdict_jump(a, tails, &table.default, None);
        }
        (true, false) => verdict_jump(a, tails, &table.default, None),
        _ => {
            a.goto(known);
        }
    }
    a.bind(known);
    a.load(Size::W, R1, R10, EVT + event::PEER as i16);
    a.goto(decide);
    a.bind(slow);
    let maps = vec![
        MapImage {
            def: MapDef {
                name: slot_map,
                map_type: BPF_MAP_TYPE_ARRAY,
                key_size: 4,
                value_size: 8,
                // At most the budget, itself at most u32::MAX.
                max_entries: used as u32,
                flags: 0,
            },
            records: slots,
            key_layout: "u32 slot (window offset + address - window base)",
            value_layout: "u32 identity (0: no address held), u32 class",
        },
        MapImage {
            def: MapDef {
                name: class_map,
                map_type: BPF_MAP_TYPE_ARRAY,
                key_size: 4,
                value_size: (4 + CLASS_ENTRY_BYTES * k) as u32,
                max_entries: table.classes.len() as u32,
                flags: 0,
            },
            records: classes,
            key_layout: "u32 class",
            value_layout: "u32 flags (bit 0: the entries are all the class's segments), \
                           entries of u16 lo, u16 hi, u8 protocol, u8 verdict (0 allow, 1 deny, \
                           2 proxy), u16 zero, u32 row",
        },
    ];
    Some((maps, held))
}

/// Emits `if address == key goto target` for each `(key, target)` of `keys` (sorted; a key is
/// the address's words, compared as unsigned 32-bit words in order) as a binary-search tree,
/// the address's words being in `regs`; a miss goes to `miss`.
fn address_search(a: &mut Asm, regs: &[Reg], keys: &[(Vec<u32>, Label)], miss: Label) {
    let imm = |w: u32| Src::Imm(w as i32);
    if keys.len() <= 2 {
        for (key, target) in keys {
            let next = a.label();
            for (r, w) in regs.iter().zip(key) {
                a.jump32_if(Cond::Ne, *r, imm(*w), next);
            }
            a.goto(*target);
            a.bind(next);
        }
        a.goto(miss);
        return;
    }
    let mid = keys.len() / 2;
    let (lower, upper) = (a.label(), a.label());
    let (key, target) = &keys[mid];
    let last = regs.len() - 1;
    for (i, (r, w)) in regs.iter().zip(key).enumerate() {
        a.jump32_if(Cond::Lt, *r, imm(*w), lower);
        if i < last {
            a.jump32_if(Cond::Gt, *r, imm(*w), upper);
        } else {
            a.jump32_if(Cond::Eq, *r, imm(*w), *target);
        }
    }
    a.bind(upper);
    address_search(a, regs, &keys[mid + 1..], miss);
    a.bind(lower);
    address_search(a, regs, &keys[..mid], miss);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter()
            .map(|s| s.parse().expect("an address"))
            .collect()
    }

    #[test]
    fn windows_are_cut_at_the_widest_gaps_within_the_budget() {
        let v4 = ips(&["10.0.0.1", "10.0.0.2", "10.0.0.9", "10.0.1.0", "10.0.1.3"]);
        let base = u32::from(std::net::Ipv4Addr::new(10, 0, 0, 1));
        // One window when the budget allows the whole span (10.0.0.1 ..= 10.0.1.3: 259).
        assert_eq!(
            address_windows(&v4, 4, 259),
            Some(vec![(vec![], base, 259)])
        );
        // The widest gap (10.0.0.9 .. 10.0.1.0, 246 slots) goes first, then 10.0.0.2 .. 9.
        assert_eq!(
            address_windows(&v4, 4, 258),
            Some(vec![(vec![], base, 9), (vec![], base + 255, 4)])
        );
        assert_eq!(
            address_windows(&v4, 4, 12),
            Some(vec![
                (vec![], base, 2),
                (vec![], base + 8, 1),
                (vec![], base + 255, 4)
            ])
        );
        // Four windows hold these five addresses in no fewer than 5 slots (2 + 1 + 1 + 1).
        assert_eq!(address_windows(&v4, 4, 5).map(|w| w.len()), Some(4));
        assert_eq!(address_windows(&v4, 4, 4), None);
        assert_eq!(address_windows(&v4, 2, 12), None);
        // IPv6: one window per upper 96 bits at least; the last 32 bits index.
        let v6 = ips(&["fd00::1:0", "fd00::1:ffff", "fd01::7"]);
        let upper = |ip: &str| address_words(ip.parse().expect("an address"))[..3].to_vec();
        assert_eq!(
            address_windows(&v6, 4, 65_537),
            Some(vec![
                (upper("fd00::"), 0x1_0000, 0x1_0000),
                (upper("fd01::"), 7, 1)
            ])
        );
        assert_eq!(address_windows(&v6, 1, 1 << 20), None);
        assert_eq!(
            address_windows(&v6, 4, 3),
            Some(vec![
                (upper("fd00::"), 0x1_0000, 1),
                (upper("fd00::"), 0x1_ffff, 1),
                (upper("fd01::"), 7, 1)
            ])
        );
        // The whole IPv4 space is never one window: its span does not fit the slot count.
        let ends = ips(&["0.0.0.0", "255.255.255.255"]);
        assert_eq!(
            address_windows(&ends, 4, u64::from(u32::MAX)),
            Some(vec![(vec![], 0, 1), (vec![], u32::MAX, 1)])
        );
    }
}
