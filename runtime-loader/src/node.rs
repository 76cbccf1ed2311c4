//! This node's side of endpoints: the host-side interface each endpoint's traffic crosses.
//!
//! An endpoint is found by the route to its address in the loader's network namespace, the
//! way a CNI plugin leaves it (a host route `10.0.1.20 dev lxc1234` per pod): the direct route
//! (no gateway) with the longest prefix names the interface. IPv4 routes come from
//! /proc/net/route, IPv6 routes from /proc/net/ipv6_route. Endpoints with no such route are not
//! on this node. Where routes do not lead to pods, the Pod annotation `cnpc.io/interface` names
//! the interface; it counts only on the node that has that interface. This node's own
//! addresses carry the host identity in its ipcache ([`mark_host`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A direct route: prefix, prefix length, interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub prefix: IpAddr,
    pub len: u8,
    pub interface: String,
}

/// Parses /proc/net/route (IPv4: hex words in host byte order) and /proc/net/ipv6_route (hex
/// bytes in network order); routes through a gateway and the loopback device are skipped.
pub fn parse_routes(v4: &str, v6: &str) -> Vec<Route> {
    const RTF_GATEWAY: u32 = 0x2;
    let mut out = Vec::new();
    for line in v4.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let hex = |s: &str| u32::from_str_radix(s, 16).ok();
        let (Some(dest), Some(flags), Some(mask)) = (hex(f[1]), hex(f[3]), hex(f[7])) else {
            continue;
        };
        if flags & RTF_GATEWAY != 0 || f[0] == "lo" {
            continue;
        }
        out.push(Route {
            prefix: IpAddr::V4(Ipv4Addr::from(dest.to_le_bytes())),
            len: mask.count_ones() as u8,
            interface: f[0].to_string(),
        });
    }
    for line in v6.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[0].len() != 32 {
            continue;
        }
        let mut bytes = [0u8; 16];
        let ok = (0..16).all(|i| {
            u8::from_str_radix(&f[0][2 * i..2 * i + 2], 16)
                .map(|b| bytes[i] = b)
                .is_ok()
        });
        let (Ok(len), Ok(flags)) = (u8::from_str_radix(f[1], 16), u32::from_str_radix(f[8], 16))
        else {
            continue;
        };
        if !ok || flags & RTF_GATEWAY != 0 || f[9] == "lo" {
            continue;
        }
        out.push(Route {
            prefix: IpAddr::V6(Ipv6Addr::from(bytes)),
            len,
            interface: f[9].to_string(),
        });
    }
    out
}

fn covers(r: &Route, ip: IpAddr) -> bool {
    match (r.prefix, ip) {
        (IpAddr::V4(p), IpAddr::V4(a)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(r.len)).unwrap_or(0);
            u32::from(p) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(p), IpAddr::V6(a)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(r.len)).unwrap_or(0);
            u128::from(p) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

/// The interface of the longest direct route to `ip`, if any. A default route (length 0) does
/// not make an address local.
pub fn interface_of(routes: &[Route], ip: IpAddr) -> Option<&str> {
    routes
        .iter()
        .filter(|r| r.len > 0 && covers(r, ip))
        .max_by_key(|r| r.len)
        .map(|r| r.interface.as_str())
}

/// The interface of an endpoint on this node: the one its `cnpc.io/interface` annotation
/// names, when that interface exists here, else the one the route to one of its addresses
/// leaves by.
pub fn interface_for(annotation: Option<&str>, ips: &[IpAddr], routes: &[Route]) -> Option<String> {
    if let Some(name) = annotation.filter(|n| crate::sys::ifindex(n).is_some()) {
        return Some(name.to_string());
    }
    ips.iter()
        .find_map(|ip| interface_of(routes, *ip))
        .map(str::to_string)
}

/// The addresses of this network namespace's interfaces, loopback left out.
pub fn local_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `ifap` with a list we walk read-only and free once below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return out;
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family says which layout it has.
            let ip = unsafe {
                match i32::from((*ifa.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                        Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr))))
                    }
                    libc::AF_INET6 => {
                        let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                        Some(IpAddr::V6(Ipv6Addr::from(sa.sin6_addr.s6_addr)))
                    }
                    _ => None,
                }
            };
            out.extend(ip.filter(|ip| !ip.is_loopback()));
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list came from getifaddrs and is freed exactly once.
    unsafe { libc::freeifaddrs(ifap) };
    out.sort();
    out.dedup();
    out
}

/// Gives this node's own addresses the host identity in an ipcache, as Cilium's does (its node
/// addresses are `reserved:host`; other nodes' are `reserved:remote-node`): a node address the
/// snapshot lists becomes host, and an address of this node it does not list is added.
pub fn mark_host(ipcache: &mut Vec<(cnpc_ir::IpNet, cnpc_ir::NumericIdentity)>, local: &[IpAddr]) {
    let host = cnpc_ir::Reserved::Host.numeric();
    for ip in local {
        let net = cnpc_ir::IpNet::from(*ip);
        match ipcache.iter_mut().find(|(n, _)| *n == net) {
            Some(entry) => entry.1 = host,
            None => ipcache.push((net, host)),
        }
    }
    ipcache.sort();
}

/// The routes of the calling thread's network namespace.
pub fn routes() -> Vec<Route> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    parse_routes(&read("/proc/net/route"), &read("/proc/net/ipv6_route"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_nodes_addresses_are_the_host() {
        let id = cnpc_ir::NumericIdentity;
        let mut ipcache = vec![
            ("10.0.1.20/32".parse().unwrap(), id(300)),
            ("192.168.56.10/32".parse().unwrap(), id(6)),
            ("192.168.56.11/32".parse().unwrap(), id(6)),
        ];
        let local = [
            "192.168.56.10".parse().unwrap(),
            "169.254.1.1".parse().unwrap(),
        ];
        mark_host(&mut ipcache, &local);
        let of = |a: &str| {
            ipcache
                .iter()
                .find(|(n, _)| *n == a.parse::<cnpc_ir::IpNet>().unwrap())
                .map(|(_, i)| i.0)
        };
        assert_eq!(of("192.168.56.10/32"), Some(1), "this node: host");
        assert_eq!(of("192.168.56.11/32"), Some(6), "another node: remote-node");
        assert_eq!(
            of("169.254.1.1/32"),
            Some(1),
            "an address the snapshot does not list"
        );
        assert_eq!(of("10.0.1.20/32"), Some(300));
        assert!(local_addresses().iter().all(|ip| !ip.is_loopback()));
    }

    #[test]
    fn host_routes_name_the_interface() {
        let v4 =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                  lxc1\t1401000A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
                  cbr0\t0001000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        let v6 = "fd00000a000000010000000000000014 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001     lxc1\n";
        let routes = parse_routes(v4, v6);
        assert_eq!(
            routes.len(),
            3,
            "the default route through a gateway is skipped"
        );
        assert_eq!(
            interface_of(&routes, "10.0.1.20".parse().unwrap()),
            Some("lxc1")
        );
        assert_eq!(
            interface_of(&routes, "10.0.1.30".parse().unwrap()),
            Some("cbr0")
        );
        assert_eq!(interface_of(&routes, "8.8.8.8".parse().unwrap()), None);
        assert_eq!(
            interface_of(&routes, "fd00:a:0:1::14".parse().unwrap()),
            Some("lxc1")
        );
    }
}
