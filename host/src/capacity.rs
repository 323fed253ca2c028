//! What one client may hold at once: open WebSocket connections, per client
//! address and in total. A connection holds a [`ConnectionPermit`] for its
//! whole life; refusals are typed and the server renders them (HTTP 503).
//!
//! Also what "one client" means for every per-address limit: an IPv4
//! address, or an IPv6 /64 (one subscriber's allocation, inside which a
//! client can pick addresses freely).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

/// The address per-client limits count against.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
    }
}

/// Why a new connection is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionRefused {
    #[error("rate-limited: {0} connections from your address are open, the most allowed; close one first")]
    PerClient(usize),
    #[error("rate-limited: the relay is at its limit of {0} connections; retry in a moment")]
    Total(usize),
}

/// Open connections, in total and per client.
pub struct ConnectionCounter {
    max_total: usize,
    max_per_client: usize,
    open: Arc<Mutex<Open>>,
}

#[derive(Default)]
struct Open {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
}

/// One admitted connection; dropping it frees its place.
pub struct ConnectionPermit {
    client: IpAddr,
    open: Arc<Mutex<Open>>,
}

impl ConnectionCounter {
    pub fn new(max_total: usize, max_per_client: usize) -> Self {
        Self { max_total, max_per_client, open: Arc::default() }
    }

    pub fn admit(&self, ip: IpAddr) -> Result<ConnectionPermit, ConnectionRefused> {
        let client = client_key(ip);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.total >= self.max_total {
            return Err(ConnectionRefused::Total(self.max_total));
        }
        let mine = open.per_client.entry(client).or_insert(0);
        if *mine >= self.max_per_client {
            return Err(ConnectionRefused::PerClient(self.max_per_client));
        }
        *mine += 1;
        open.total += 1;
        Ok(ConnectionPermit { client, open: self.open.clone() })
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                open.per_client.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_and_dropping_a_permit_frees_its_place() {
        let c = ConnectionCounter::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = c.admit(a).unwrap();
        let _second = c.admit(a).unwrap();
        assert_eq!(c.admit(a).err(), Some(ConnectionRefused::PerClient(2)));
        let _third = c.admit(b).unwrap();
        assert_eq!(c.admit(b).err(), Some(ConnectionRefused::Total(3)));
        drop(first);
        assert!(c.admit(a).is_ok());
        assert_eq!(client_key("2001:db8::1".parse().unwrap()), client_key("2001:db8::ffff".parse().unwrap()));
    }
}
