//! The address a call comes from: the TCP peer, or — behind a proxy listed as trusted — the last
//! `x-forwarded-for` entry that is not itself a trusted proxy (entries further left were written
//! by the client and prove nothing).

use std::{net::IpAddr, str::FromStr};

/// An IP network: `10.0.0.0/8`, `2001:db8::/32`, or one address (`192.0.2.7`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr = IpAddr::from_str(addr)
            .map_err(|_| format!("trusted proxy {text:?}: not an IP address or CIDR network"))?
            .to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| {
                format!("trusted proxy {text:?}: prefix length must be 0..={max}")
            })?,
        };
        Ok(Self { addr, prefix })
    }
}

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let keep = |bits: u32, width: u32| -> u128 {
            if bits == 0 {
                0
            } else {
                u128::MAX << (width - bits)
            }
        };
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = keep(u32::from(self.prefix), 32);
                (u128::from(u32::from(net)) & mask) == (u128::from(u32::from(ip)) & mask)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = keep(u32::from(self.prefix), 128);
                (u128::from(net) & mask) == (u128::from(ip) & mask)
            }
            _ => false,
        }
    }
}

/// The proxies whose `x-forwarded-for` entries kluis believes.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// # Errors
    /// The first entry that is not an IP address or CIDR network.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        entries
            .iter()
            .filter(|e| !e.trim().is_empty())
            .map(|e| e.parse())
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(ip))
    }

    /// The client behind `peer`: `peer` itself unless it is a trusted proxy; then, reading the
    /// `x-forwarded-for` values right to left, the first entry that is not a trusted proxy (or
    /// the last one read, when an entry does not parse or all are trusted).
    pub fn client<'a>(&self, peer: IpAddr, forwarded_for: impl Iterator<Item = &'a str>) -> IpAddr {
        let mut client = peer.to_canonical();
        if !self.trusts(client) {
            return client;
        }
        let entries: Vec<&str> = forwarded_for.flat_map(|v| v.split(',')).collect();
        for entry in entries.iter().rev() {
            let Some(ip) = parse_entry(entry) else {
                return client;
            };
            client = ip;
            if !self.trusts(ip) {
                return ip;
            }
        }
        client
    }
}

/// One `x-forwarded-for` entry: `192.0.2.7`, `2001:db8::1`, `192.0.2.7:4711`, `[2001:db8::1]:4711`.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    IpAddr::from_str(entry)
        .ok()
        .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
        .map(|ip| ip.to_canonical())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn proxies(list: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(&list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_peer_that_is_not_a_trusted_proxy_is_the_client_whatever_it_forwards() {
        let trusted = proxies(&["10.0.0.0/8"]);
        assert_eq!(
            trusted.client(ip("192.0.2.7"), ["203.0.113.9"].into_iter()),
            ip("192.0.2.7")
        );
        assert_eq!(
            TrustedProxies::default().client(ip("127.0.0.1"), ["203.0.113.9"].into_iter()),
            ip("127.0.0.1")
        );
    }

    #[test]
    fn behind_trusted_proxies_the_client_is_the_last_untrusted_entry() {
        let trusted = proxies(&["10.0.0.0/8", "192.0.2.1"]);
        // spoofed, client, inner proxy — read right to left.
        let header = ["198.51.100.66, 203.0.113.9", "192.0.2.1"];
        assert_eq!(
            trusted.client(ip("10.1.2.3"), header.into_iter()),
            ip("203.0.113.9")
        );
        assert_eq!(
            trusted.client(ip("10.1.2.3"), ["[2001:db8::7]:4711"].into_iter()),
            ip("2001:db8::7")
        );
        // No header: the proxy itself.
        assert_eq!(
            trusted.client(ip("10.1.2.3"), std::iter::empty()),
            ip("10.1.2.3")
        );
        // A garbage entry stops the walk at the last address that could be believed.
        assert_eq!(
            trusted.client(ip("10.1.2.3"), ["203.0.113.9, nonsense"].into_iter()),
            ip("10.1.2.3")
        );
    }

    #[test]
    fn networks_match_by_prefix_and_ipv4_mapped_addresses_count_as_ipv4() {
        let net: IpNet = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains(ip("10.255.0.1")));
        assert!(!net.contains(ip("11.0.0.1")));
        assert!(net.contains(ip("::ffff:10.0.0.1")));
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.9")));
        let v6: IpNet = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:1::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("proxy.internal".parse::<IpNet>().is_err());
    }
}
