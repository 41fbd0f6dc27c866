//! Waiting for the network before a network-bound unlock (Tang pins).
//!
//! The initramfs brings the network up (dracut's network module, initramfs-tools'
//! `ip=`, udhcpc in the test initramfs); vaultguard never configures an interface.
//! It only waits, bounded by the unlock's overall deadline, until the kernel has a
//! route that can carry a packet to the Tang server: a route whose prefix covers the
//! server's address, or any default route when the server is named by a host name
//! (resolving it is the HTTP client's business). Waiting here, rather than letting
//! each pin fail on ENETUNREACH at once, is what lets a lease that arrives a second
//! after vaultguard starts still unlock; the deadline is what keeps a machine with no
//! network from stalling the boot.
//!
//! The routing tables are read from `/proc/net/route` and `/proc/net/ipv6_route`
//! (the kernel's own text, no netlink socket): pure parsing below, one polling loop.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often the tables are re-read while waiting: short against a deadline of
/// seconds, long enough to cost nothing.
const POLL: Duration = Duration::from_millis(50);
/// RTF_UP in the kernel's route flags.
const RTF_UP: u32 = 0x1;

/// What a pin needs a route to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteTarget {
    /// The server's address (the URL names it by address).
    Addr(IpAddr),
    /// A server named by host name: any default route will do.
    Default,
}

impl RouteTarget {
    /// The target for an `http://HOST[:PORT]/...` URL: an address when HOST is one
    /// (IPv6 in brackets), else [`RouteTarget::Default`].
    pub fn for_url(url: &str) -> RouteTarget {
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .unwrap_or(url);
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        if let Some(v6) = host.strip_prefix('[') {
            if let Some((addr, _)) = v6.split_once(']') {
                if let Ok(a) = addr.parse::<Ipv6Addr>() {
                    return RouteTarget::Addr(IpAddr::V6(a));
                }
            }
            return RouteTarget::Default;
        }
        let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
        match host.parse::<Ipv4Addr>() {
            Ok(a) => RouteTarget::Addr(IpAddr::V4(a)),
            Err(_) => RouteTarget::Default,
        }
    }
}

impl fmt::Display for RouteTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteTarget::Addr(a) => write!(f, "{a}"),
            RouteTarget::Default => f.write_str("a server named by host name (no default route)"),
        }
    }
}

/// One usable route of the kernel's tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub iface: String,
    pub dest: IpAddr,
    pub prefix: u8,
}

impl Route {
    fn covers(&self, target: &RouteTarget) -> bool {
        match (target, self.dest) {
            (RouteTarget::Default, _) => self.prefix == 0,
            (RouteTarget::Addr(IpAddr::V4(a)), IpAddr::V4(d)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(*a) & mask == u32::from(d) & mask
            }
            (RouteTarget::Addr(IpAddr::V6(a)), IpAddr::V6(d)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(*a) & mask == u128::from(d) & mask
            }
            _ => false,
        }
    }
}

/// The routes of `/proc/net/route` that are up and not on the loopback device.
/// Lines that do not parse are skipped (the header, a future column layout).
pub fn parse_ipv4(text: &str) -> Vec<Route> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
        if f.len() < 8 || f[0] == "lo" {
            continue;
        }
        let (Ok(dest), Ok(flags), Ok(mask)) = (
            u32::from_str_radix(f[1], 16),
            u32::from_str_radix(f[3], 16),
            u32::from_str_radix(f[7], 16),
        ) else {
            continue;
        };
        if flags & RTF_UP == 0 {
            continue;
        }
        // The kernel prints the addresses in network byte order read as a host
        // (little-endian) integer: 10.0.2.0 is 0002000A.
        let mask = u32::from_be(mask.to_le());
        if mask.leading_ones() + mask.trailing_zeros() != 32 {
            continue; // not a prefix mask: never produced by the kernel
        }
        out.push(Route {
            iface: f[0].to_string(),
            dest: IpAddr::V4(Ipv4Addr::from(u32::from_be(dest.to_le()))),
            prefix: mask.leading_ones() as u8,
        });
    }
    out
}

/// The routes of `/proc/net/ipv6_route` that are up, not on the loopback device,
/// and neither link-local (fe80::/10) nor multicast (ff00::/8): those exist on every
/// interface that is merely up and carry nothing to a Tang server elsewhere.
pub fn parse_ipv6(text: &str) -> Vec<Route> {
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // dest plen src splen next_hop metric refcnt use flags iface
        if f.len() < 10 || f[9] == "lo" {
            continue;
        }
        let (Ok(dest), Ok(prefix), Ok(flags)) = (
            u128::from_str_radix(f[0], 16),
            u8::from_str_radix(f[1], 16),
            u32::from_str_radix(f[8], 16),
        ) else {
            continue;
        };
        let dest = Ipv6Addr::from(dest);
        let seg = dest.segments()[0];
        if flags & RTF_UP == 0
            || prefix > 128
            || (seg & 0xffc0) == 0xfe80
            || (seg & 0xff00) == 0xff00
        {
            continue;
        }
        out.push(Route {
            iface: f[9].to_string(),
            dest: IpAddr::V6(dest),
            prefix,
        });
    }
    out
}

/// The first route in `routes` that reaches `target`.
pub fn route_to<'a>(routes: &'a [Route], target: &RouteTarget) -> Option<&'a Route> {
    routes.iter().find(|r| r.covers(target))
}

#[derive(Debug)]
pub enum NetError {
    /// The deadline passed with no route to the target.
    NoRoute {
        target: RouteTarget,
        waited: Duration,
        /// Usable routes seen at the end (none, or only ones that miss the target).
        routes: Vec<Route>,
    },
    /// The routing table could not be read at all (no /proc, a kernel without IPv4).
    Read { path: PathBuf, why: String },
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetError::NoRoute {
                target,
                waited,
                routes,
            } if routes.is_empty() => write!(
                f,
                "no route to {target} after {:.1} s: the network is not up (no interface has \
                 an address); check the initramfs's network setup (dracut rd.neednet=1 ip=dhcp, \
                 initramfs-tools ip=, the NIC's driver)",
                waited.as_secs_f64()
            ),
            NetError::NoRoute {
                target,
                waited,
                routes,
            } => {
                let have: Vec<String> = routes
                    .iter()
                    .map(|r| format!("{}/{} on {}", r.dest, r.prefix, r.iface))
                    .collect();
                write!(
                    f,
                    "no route to {target} after {:.1} s (routes: {}); the network is up but \
                     leads elsewhere: check the lease's router or add a route to the server",
                    waited.as_secs_f64(),
                    have.join(", ")
                )
            }
            NetError::Read { path, why } => {
                write!(f, "cannot read the routing table {}: {why}", path.display())
            }
        }
    }
}

impl std::error::Error for NetError {}

/// Where the kernel's routing tables are; tests point this at files of their own.
#[derive(Debug, Clone)]
pub struct RouteTables {
    pub ipv4: PathBuf,
    pub ipv6: PathBuf,
}

impl Default for RouteTables {
    fn default() -> Self {
        RouteTables {
            ipv4: PathBuf::from("/proc/net/route"),
            ipv6: PathBuf::from("/proc/net/ipv6_route"),
        }
    }
}

impl RouteTables {
    /// The usable routes now. A missing IPv6 table (a kernel without IPv6) is no
    /// routes; a missing IPv4 table is an error (no network stack at all).
    pub fn read(&self) -> Result<Vec<Route>, NetError> {
        let v4 = read_table(&self.ipv4)?;
        let mut routes = parse_ipv4(&v4);
        match read_table(&self.ipv6) {
            Ok(v6) => routes.extend(parse_ipv6(&v6)),
            Err(NetError::Read { .. }) if !self.ipv6.exists() => {}
            Err(e) => return Err(e),
        }
        Ok(routes)
    }

    /// Wait until a route reaches every target, or `deadline`. Returns the route
    /// found for each target, in order.
    pub fn wait_for(
        &self,
        targets: &[RouteTarget],
        deadline: Instant,
    ) -> Result<Vec<Route>, NetError> {
        let start = Instant::now();
        loop {
            let routes = self.read()?;
            let found: Vec<Option<&Route>> = targets.iter().map(|t| route_to(&routes, t)).collect();
            if found.iter().all(Option::is_some) {
                return Ok(found.into_iter().flatten().cloned().collect());
            }
            let now = Instant::now();
            if now >= deadline {
                let missing = targets
                    .iter()
                    .zip(&found)
                    .find(|(_, r)| r.is_none())
                    .map(|(t, _)| t.clone())
                    .unwrap_or(RouteTarget::Default);
                return Err(NetError::NoRoute {
                    target: missing,
                    waited: now.duration_since(start),
                    routes,
                });
            }
            std::thread::sleep(POLL.min(deadline - now));
        }
    }
}

fn read_table(path: &Path) -> Result<String, NetError> {
    std::fs::read_to_string(path).map_err(|e| NetError::Read {
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

/// Wait, until `deadline`, for routes to the servers of these Tang URLs in the
/// kernel's own tables. The boot path calls this once before starting the pins:
/// a pin then fails on its own (refused, timed out) rather than on "network
/// unreachable" a moment before the lease arrives.
pub fn wait_for_urls(urls: &[&str], deadline: Instant) -> Result<Vec<Route>, NetError> {
    let targets: Vec<RouteTarget> = urls.iter().map(|u| RouteTarget::for_url(u)).collect();
    RouteTables::default().wait_for(&targets, deadline)
}

/// The network needs of a set of clevis tokens: the Tang URLs of every tang pin
/// (nested sss included) and whether any tpm2 pin could answer without the network.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PinNeeds {
    pub tang_urls: Vec<String>,
    pub has_tpm2: bool,
}

/// Walk the tokens' pins. A pin that does not parse is skipped here: the engine
/// reports it on its own line.
pub fn pin_needs(tokens: &[crate::clevis::ClevisToken]) -> PinNeeds {
    use crate::clevis::jwe::Jwe;
    fn walk(jwe: &Jwe, depth: usize, out: &mut PinNeeds) {
        match jwe.pin() {
            Ok("tang") => {
                if let Ok(t) = crate::clevis::tang::TangPin::from_jwe(jwe) {
                    if !out.tang_urls.contains(&t.url) {
                        out.tang_urls.push(t.url);
                    }
                }
            }
            Ok("tpm2") => out.has_tpm2 = true,
            Ok("sss") if depth < 8 => {
                if let Ok(p) = crate::clevis::sss::SssPin::from_jwe(jwe) {
                    for c in &p.children {
                        if let Ok(child) = Jwe::from_compact(c) {
                            walk(&child, depth + 1, out);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    let mut out = PinNeeds::default();
    for t in tokens {
        walk(&t.jwe, 0, &mut out);
    }
    out
}

/// The boot path's one call before the clevis engine: wait, until `deadline` (the
/// engine's own), for routes to the tokens' Tang servers. Only when no tpm2 pin is
/// among them: a TPM pin must start at once, not after the network (the engine
/// runs it on its own thread), so with one present the engine starts now and each
/// Tang pin waits for its own route on its thread (`EngineOptions::route_wait`). Returns a line for the operator when
/// the wait ended without a route (the engine then runs and reports each pin).
pub fn wait_before_clevis(
    tokens: &[crate::clevis::ClevisToken],
    deadline: Instant,
) -> Option<String> {
    let needs = pin_needs(tokens);
    if needs.tang_urls.is_empty() || needs.has_tpm2 {
        return None;
    }
    let urls: Vec<&str> = needs.tang_urls.iter().map(String::as_str).collect();
    wait_for_urls(&urls, deadline).err().map(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    // /proc/net/route of the QEMU guest on a restricted user network: udhcpc leased
    // 10.0.2.15/24 with no router (restrict=on leaves the router out).
    const QEMU_RESTRICTED: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
        eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
    const WITH_DEFAULT: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
        eth0\t00000000\t0202000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
        eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
    const HEADER_ONLY: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n";
    const IPV6: &str = "\
        00000000000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000001 00000000 00000001       lo\n\
        fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n\
        ff000000000000000000000000000000 08 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n\
        20010db8000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n";

    fn v4(s: &str) -> RouteTarget {
        RouteTarget::Addr(IpAddr::V4(s.parse().unwrap()))
    }

    #[test]
    fn the_restricted_user_network_subnet_route_reaches_the_forwarded_tang_address() {
        let routes = parse_ipv4(QEMU_RESTRICTED);
        assert_eq!(
            routes,
            vec![Route {
                iface: "eth0".into(),
                dest: "10.0.2.0".parse().unwrap(),
                prefix: 24
            }]
        );
        assert!(route_to(&routes, &v4("10.0.2.100")).is_some());
        assert!(route_to(&routes, &v4("1.1.1.1")).is_none());
        assert!(route_to(&routes, &RouteTarget::Default).is_none());
    }

    #[test]
    fn a_default_route_reaches_everything_and_serves_host_names() {
        let routes = parse_ipv4(WITH_DEFAULT);
        assert_eq!(routes[0].prefix, 0);
        assert_eq!(
            route_to(&routes, &v4("192.0.2.7")).map(|r| r.prefix),
            Some(0)
        );
        assert!(route_to(&routes, &RouteTarget::Default).is_some());
    }

    #[test]
    fn loopback_down_and_garbage_lines_are_no_routes() {
        let text = format!(
            "{HEADER_ONLY}lo\t0000007F\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0\n\
             eth0\t0002000A\t00000000\t0000\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
             eth0\tzz\n"
        );
        assert!(parse_ipv4(&text).is_empty());
        assert!(parse_ipv4("").is_empty());
    }

    #[test]
    fn ipv6_keeps_global_prefixes_only() {
        let routes = parse_ipv6(IPV6);
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].prefix, 64);
        let t = RouteTarget::Addr(IpAddr::V6("2001:db8::5".parse().unwrap()));
        assert!(route_to(&routes, &t).is_some());
        let other = RouteTarget::Addr(IpAddr::V6("2001:db9::5".parse().unwrap()));
        assert!(route_to(&routes, &other).is_none());
    }

    #[test]
    fn url_targets() {
        assert_eq!(RouteTarget::for_url("http://10.0.2.100"), v4("10.0.2.100"));
        assert_eq!(
            RouteTarget::for_url("http://10.0.2.100:8080/tang"),
            v4("10.0.2.100")
        );
        assert_eq!(
            RouteTarget::for_url("http://[2001:db8::1]:80/"),
            RouteTarget::Addr(IpAddr::V6("2001:db8::1".parse().unwrap()))
        );
        assert_eq!(
            RouteTarget::for_url("http://tang.example:80"),
            RouteTarget::Default
        );
        assert_eq!(RouteTarget::for_url("tang.example"), RouteTarget::Default);
        assert_eq!(RouteTarget::for_url("http://[oops"), RouteTarget::Default);
    }

    fn tables(dir: &Path, v4: &str) -> RouteTables {
        let t = RouteTables {
            ipv4: dir.join("route"),
            ipv6: dir.join("ipv6_route"),
        };
        std::fs::write(&t.ipv4, v4).unwrap();
        t
    }

    #[test]
    fn waiting_ends_at_the_deadline_naming_the_target_and_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let t = tables(dir.path(), HEADER_ONLY);
        let start = Instant::now();
        let err = t
            .wait_for(&[v4("10.0.2.100")], start + Duration::from_millis(300))
            .unwrap_err();
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_millis(600),
            "{waited:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with("no route to 10.0.2.100 after 0.3 s: the network is not up"),
            "{msg}"
        );

        std::fs::write(
            &t.ipv4,
            WITH_DEFAULT
                .replace("0003", "0000")
                .replace("00000000\t0202000A", "0000000B\t0202000A"),
        )
        .unwrap();
        let err = t
            .wait_for(&[RouteTarget::Default], Instant::now())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no route to a server named by host name (no default route)")
                && err.contains("10.0.2.0/24 on eth0"),
            "{err}"
        );
    }

    #[test]
    fn a_route_that_appears_while_waiting_ends_the_wait_early() {
        let dir = tempfile::tempdir().unwrap();
        let t = tables(dir.path(), HEADER_ONLY);
        let path = t.ipv4.clone();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            std::fs::write(path, QEMU_RESTRICTED).unwrap();
        });
        let start = Instant::now();
        let found = t
            .wait_for(&[v4("10.0.2.100")], start + Duration::from_secs(5))
            .unwrap();
        writer.join().unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(found[0].iface, "eth0");
    }

    #[test]
    fn an_unreadable_ipv4_table_is_an_error_a_missing_ipv6_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let t = RouteTables {
            ipv4: dir.path().join("absent"),
            ipv6: dir.path().join("absent6"),
        };
        let msg = t.read().unwrap_err().to_string();
        assert!(
            msg.starts_with("cannot read the routing table ") && msg.contains("absent"),
            "{msg}"
        );
        let t = tables(dir.path(), QEMU_RESTRICTED);
        assert_eq!(t.read().unwrap().len(), 1);
    }

    // Written by `clevis luks bind` (clevis 19, Debian 12) on a throwaway image: a
    // tang pin, and sss t=2 of a tpm2 pin (swtpm) and the same tang pin.
    fn token(json: &str) -> crate::clevis::ClevisToken {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        crate::clevis::ClevisToken::from_json(0, &v).unwrap()
    }
    const TANG_TOKEN: &str = include_str!("testdata/clevis-token-tang.json");
    const SSS_TOKEN: &str = include_str!("testdata/clevis-token-sss-tpm2-tang.json");

    #[test]
    fn clevis_tokens_name_their_tang_servers_and_tpm2_pins() {
        let tang = pin_needs(&[token(TANG_TOKEN)]);
        assert_eq!(
            tang,
            PinNeeds {
                tang_urls: vec!["http://10.0.2.100".into()],
                has_tpm2: false
            }
        );
        let both = pin_needs(&[token(TANG_TOKEN), token(SSS_TOKEN)]);
        assert_eq!(
            both,
            PinNeeds {
                tang_urls: vec!["http://10.0.2.100".into()],
                has_tpm2: true
            }
        );
    }

    #[test]
    fn no_wait_when_a_tpm2_pin_could_answer_or_no_tang_pin_needs_the_network() {
        // The deadline is an hour away: a wait would hang the test.
        let far = Instant::now() + Duration::from_secs(3600);
        let start = Instant::now();
        assert_eq!(wait_before_clevis(&[token(SSS_TOKEN)], far), None);
        assert_eq!(wait_before_clevis(&[], far), None);
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn the_live_table_parses() {
        // This machine's own tables: whatever they hold, reading them works.
        RouteTables::default().read().unwrap();
    }
}
