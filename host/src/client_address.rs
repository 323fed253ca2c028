//! Which address a client is known by: the socket's peer, or, when the
//! relay runs behind a proxy the operator names (Cloud Run's front end, a
//! load balancer), the client address that proxy put in a header. Limits per
//! address, blocks, and the `remote-addr` plugins see all use it.
//!
//! Off by default: a relay reachable directly would otherwise let any client
//! pick its own address by sending the header.

use std::net::{IpAddr, SocketAddr};

use hyper::HeaderMap;

use crate::config::ServerConfig;

/// The address to count `peer`'s request under. With
/// `server.client_address_header` set and `peer` among
/// `server.trusted_proxies` (empty: any peer), the header's entry
/// `client_address_hops` from the right (1: the last, the address the
/// nearest proxy saw; entries to its left are whatever the client sent);
/// otherwise, or when that entry is missing or not an address, `peer`.
pub fn resolve(headers: &HeaderMap, peer: SocketAddr, server: &ServerConfig) -> SocketAddr {
    if server.client_address_header.is_empty() {
        return peer;
    }
    if !server.trusted_proxies.is_empty() && !server.trusted_proxies.iter().any(|net| net.contains(&peer.ip())) {
        return peer;
    }
    let entries: Vec<&str> = headers
        .get_all(server.client_address_header.as_str())
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let hops = server.client_address_hops.max(1);
    let Some(entry) = entries.len().checked_sub(hops).map(|i| entries[i]) else {
        tracing::debug!(%peer, header = %server.client_address_header, "no client address in the header; using the peer");
        return peer;
    };
    match parse_entry(entry) {
        Some(ip) => SocketAddr::new(ip, peer.port()),
        None => {
            tracing::debug!(%peer, entry, "the client address header holds no address; using the peer");
            peer
        }
    }
}

/// `203.0.113.7`, `203.0.113.7:4711`, `2001:db8::1` or `[2001:db8::1]:4711`.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    entry.parse::<IpAddr>().ok().or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(header: &str, hops: usize, trusted: &[&str]) -> ServerConfig {
        ServerConfig {
            client_address_header: header.into(),
            client_address_hops: hops,
            trusted_proxies: trusted.iter().map(|n| n.parse().unwrap()).collect(),
            ..ServerConfig::default()
        }
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    const PEER: &str = "10.0.0.2:5000";

    fn ip(s: SocketAddr) -> String {
        s.ip().to_string()
    }

    #[test]
    fn the_header_counts_only_when_configured_and_from_a_trusted_peer() {
        let peer: SocketAddr = PEER.parse().unwrap();
        let h = headers(&["198.51.100.9, 203.0.113.7"]);
        assert_eq!(ip(resolve(&h, peer, &server("", 1, &[]))), "10.0.0.2", "off by default");
        assert_eq!(ip(resolve(&h, peer, &server("x-forwarded-for", 1, &[]))), "203.0.113.7", "the last entry");
        assert_eq!(ip(resolve(&h, peer, &server("x-forwarded-for", 2, &[]))), "198.51.100.9");
        assert_eq!(ip(resolve(&h, peer, &server("X-Forwarded-For", 1, &["10.0.0.0/8"]))), "203.0.113.7");
        assert_eq!(ip(resolve(&h, peer, &server("x-forwarded-for", 1, &["192.168.0.0/16"]))), "10.0.0.2");
    }

    #[test]
    fn odd_headers_fall_back_to_the_peer() {
        let peer: SocketAddr = PEER.parse().unwrap();
        let on = server("x-forwarded-for", 1, &[]);
        assert_eq!(ip(resolve(&HeaderMap::new(), peer, &on)), "10.0.0.2", "missing");
        assert_eq!(ip(resolve(&headers(&["unknown"]), peer, &on)), "10.0.0.2", "not an address");
        assert_eq!(ip(resolve(&headers(&["203.0.113.7"]), peer, &server("x-forwarded-for", 3, &[]))), "10.0.0.2");
        // Several header lines are one list; ports and brackets are allowed.
        assert_eq!(ip(resolve(&headers(&["1.2.3.4", "[2001:db8::1]:443"]), peer, &on)), "2001:db8::1");
        assert_eq!(ip(resolve(&headers(&["203.0.113.7:8080"]), peer, &on)), "203.0.113.7");
    }
}
