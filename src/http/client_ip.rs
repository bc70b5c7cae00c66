//! The client's IP address, decided in one place for rate limits, logs and spans.
//!
//! A request's peer is the client unless the peer is a trusted proxy (an address or CIDR in
//! `server.trusted_proxies`). Then the client is the rightmost address of the **last**
//! `X-Forwarded-For` header that is not itself a trusted proxy: each proxy appends the
//! address it saw, so everything left of the last trusted hop was written by the client
//! and can be anything. An entry that does not parse as an IP address stops the walk and
//! the last trusted hop is used instead: garbage never becomes a key.
//!
//! Headers from untrusted peers are ignored entirely, so spoofing `X-Forwarded-For`
//! changes nothing.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, Request};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use ipnet::IpNet;

/// The resolved client address, put into request extensions by [`resolve_layer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

/// Parses `10.0.0.0/8`, `fd00::/8` or a bare address (a /32 or /128).
pub fn parse_net(raw: &str) -> Option<IpNet> {
    let raw = raw.trim();
    raw.parse::<IpNet>()
        .ok()
        .or_else(|| raw.parse::<IpAddr>().ok().map(IpNet::from))
}

/// Decides client addresses from the trusted proxy list.
#[derive(Debug, Clone, Default)]
pub struct ClientIpResolver {
    trusted: Vec<IpNet>,
}

impl ClientIpResolver {
    /// Entries that do not parse are skipped (config validation refuses them first).
    pub fn new(trusted_proxies: &[String]) -> Self {
        Self {
            trusted: trusted_proxies
                .iter()
                .filter_map(|p| parse_net(p))
                .collect(),
        }
    }

    /// Whether `ip` is a trusted proxy (its connections carry other clients' requests).
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// The client address of a request from `peer` carrying `headers`.
    pub fn resolve(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.is_trusted(peer) {
            return peer;
        }
        let Some(last) = headers.get_all("x-forwarded-for").iter().next_back() else {
            return peer;
        };
        let Ok(list) = last.to_str() else {
            return peer;
        };
        let mut client = peer;
        for entry in list.rsplit(',') {
            match parse_forwarded(entry) {
                Some(ip) => {
                    client = ip;
                    if !self.is_trusted(ip) {
                        break;
                    }
                }
                None => break,
            }
        }
        client
    }
}

/// One `X-Forwarded-For` entry: an address, optionally with a port (`1.2.3.4:5678`,
/// `[::1]:5678`).
fn parse_forwarded(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .map(canonical)
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`, as a dual-stack listener reports IPv4
/// peers) are the IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Middleware: resolves the client address once and stores it as [`ClientIp`].
pub async fn resolve_layer(
    axum::extract::State(resolver): axum::extract::State<std::sync::Arc<ClientIpResolver>>,
    mut request: Request,
    next: Next,
) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
    let ip = resolver.resolve(peer, request.headers());
    request.extensions_mut().insert(ClientIp(ip));
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn headers(lines: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for line in lines {
            map.append("x-forwarded-for", HeaderValue::from_str(line).unwrap());
        }
        map
    }

    fn resolver() -> ClientIpResolver {
        ClientIpResolver::new(&["10.0.0.0/8".into(), "192.168.1.1".into()])
    }

    #[test]
    fn untrusted_peers_are_themselves_whatever_they_send() {
        let r = resolver();
        assert_eq!(
            r.resolve(ip("203.0.113.9"), &headers(&["1.1.1.1"])),
            ip("203.0.113.9")
        );
        assert_eq!(
            r.resolve(ip("203.0.113.9"), &HeaderMap::new()),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn behind_a_trusted_proxy_the_rightmost_untrusted_entry_wins() {
        let r = resolver();
        let got = r.resolve(ip("10.1.2.3"), &headers(&["6.6.6.6, 198.51.100.7"]));
        assert_eq!(got, ip("198.51.100.7"));
        // Trusted hops on the right are skipped.
        let got = r.resolve(
            ip("10.1.2.3"),
            &headers(&["6.6.6.6, 198.51.100.7, 10.9.9.9"]),
        );
        assert_eq!(got, ip("198.51.100.7"));
    }

    #[test]
    fn a_rotating_spoofed_prefix_changes_nothing() {
        let r = resolver();
        for fake in ["1.2.3.4", "5.6.7.8", "garbage", "::1"] {
            let line = format!("{fake}, 198.51.100.7");
            assert_eq!(
                r.resolve(ip("10.0.0.1"), &headers(&[&line])),
                ip("198.51.100.7")
            );
        }
    }

    #[test]
    fn the_last_header_line_is_used() {
        let r = resolver();
        let got = r.resolve(ip("10.0.0.1"), &headers(&["198.51.100.1", "198.51.100.2"]));
        assert_eq!(got, ip("198.51.100.2"));
    }

    #[test]
    fn garbage_or_absence_falls_back_to_the_last_trusted_hop() {
        let r = resolver();
        assert_eq!(r.resolve(ip("10.0.0.1"), &HeaderMap::new()), ip("10.0.0.1"));
        assert_eq!(
            r.resolve(ip("10.0.0.1"), &headers(&["23189987"])),
            ip("10.0.0.1")
        );
        assert_eq!(
            r.resolve(
                ip("10.0.0.1"),
                &headers(&["198.51.100.7, nonsense, 10.0.0.2"])
            ),
            ip("10.0.0.2")
        );
        assert_eq!(r.resolve(ip("10.0.0.1"), &headers(&[""])), ip("10.0.0.1"));
    }

    #[test]
    fn ports_brackets_and_mapped_addresses() {
        let r = resolver();
        assert_eq!(
            r.resolve(ip("10.0.0.1"), &headers(&["198.51.100.7:4431"])),
            ip("198.51.100.7")
        );
        assert_eq!(
            r.resolve(ip("10.0.0.1"), &headers(&["[2001:db8::1]:443"])),
            ip("2001:db8::1")
        );
        assert_eq!(
            r.resolve(ip("::ffff:10.0.0.1"), &headers(&["198.51.100.7"])),
            ip("198.51.100.7")
        );
        assert_eq!(
            r.resolve(ip("::ffff:203.0.113.9"), &HeaderMap::new()),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn nets_parse() {
        assert!(parse_net("10.0.0.0/8").is_some());
        assert!(parse_net("fd00::/8").is_some());
        assert!(parse_net("192.168.1.1").is_some());
        assert!(parse_net("10.0.0.0/33").is_none());
        assert!(parse_net("example.com").is_none());
    }
}
