//! Keeping one plugin available under abuse: a circuit breaker that opens
//! after repeated failures and probes again by itself (half-open), and a
//! per-client tally so that failures one client causes cost that client.
//!
//! A failure counts toward the breaker only when it is the first, within a
//! minute, of the client that caused it (or comes from the relay's own
//! `tick`): however many connections one address opens, it moves the
//! breaker by one. Once an address has caused `client_failures_per_minute`
//! failures, its requests to the plugin are refused with `rate-limited:`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A breaker opened this many times in a row stays open at most this many
/// times its base period.
const MAX_BACKOFF_FACTOR: u32 = 32;
/// A probe that has not reported within this time (its caller went away)
/// no longer holds the half-open slot.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// The window of the per-client tally.
const CLIENT_WINDOW: Duration = Duration::from_secs(60);
/// Client addresses tallied at once; beyond that new addresses are not
/// tracked until old entries expire (the breaker still protects the relay).
const MAX_TRACKED_CLIENTS: usize = 16_384;

/// Whether a call may go to the plugin now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed circuit: call normally.
    Call,
    /// Half-open: this call is the one probe; its outcome closes or reopens.
    Probe,
    /// Open circuit: do not call; it probes again in about this long.
    Open(Duration),
}

pub struct Breaker {
    threshold: u32,
    base_open: Duration,
    state: Mutex<BreakerState>,
}

#[derive(Default)]
struct BreakerState {
    consecutive: u32,
    open_until: Option<Instant>,
    /// How long the circuit stays open next time it opens.
    open_for: Duration,
    probe_started: Option<Instant>,
}

impl Breaker {
    pub fn new(threshold: u32, base_open: Duration) -> Self {
        let state = BreakerState { open_for: base_open, ..Default::default() };
        Self { threshold: threshold.max(1), base_open, state: Mutex::new(state) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn admit(&self) -> Admission {
        let mut s = self.state();
        let Some(until) = s.open_until else { return Admission::Call };
        let now = Instant::now();
        if now < until {
            return Admission::Open(until - now);
        }
        match s.probe_started {
            Some(started) if now.duration_since(started) < PROBE_TIMEOUT => Admission::Open(Duration::from_secs(1)),
            _ => {
                s.probe_started = Some(now);
                Admission::Probe
            }
        }
    }

    /// A call succeeded. Returns true when this closed an open circuit.
    pub fn succeeded(&self, admission: Admission) -> bool {
        let mut s = self.state();
        s.consecutive = 0;
        if admission == Admission::Probe && s.open_until.is_some() {
            s.open_until = None;
            s.probe_started = None;
            s.open_for = self.base_open;
            return true;
        }
        false
    }

    /// A call failed; `counts` says whether it counts toward opening the
    /// circuit. Returns how long the circuit is now open, if this opened it.
    pub fn failed(&self, admission: Admission, counts: bool) -> Option<Duration> {
        let mut s = self.state();
        let now = Instant::now();
        if admission == Admission::Probe && s.open_until.is_some() {
            s.probe_started = None;
            s.open_for = (s.open_for * 2).min(self.base_open * MAX_BACKOFF_FACTOR);
            let open_for = s.open_for;
            s.open_until = Some(now + open_for);
            return Some(open_for);
        }
        if !counts || s.open_until.is_some() {
            return None;
        }
        s.consecutive += 1;
        if s.consecutive < self.threshold {
            return None;
        }
        let open_for = s.open_for;
        s.open_until = Some(now + open_for);
        Some(open_for)
    }

    /// Closes the circuit (a new version was swapped in, or an operator
    /// enabled the plugin).
    pub fn reset(&self) {
        let mut s = self.state();
        *s = BreakerState { open_for: self.base_open, ..Default::default() };
    }

    /// `"closed"`, `"open"` or `"half-open"`, for operators.
    pub fn describe(&self) -> &'static str {
        let s = self.state();
        match s.open_until {
            None => "closed",
            Some(until) if Instant::now() < until => "open",
            Some(_) => "half-open",
        }
    }

    pub fn is_open(&self) -> bool {
        self.state().open_until.is_some()
    }
}

/// Failures each client address caused in the last minute.
pub struct ClientFailures {
    per_minute: u32,
    tally: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl ClientFailures {
    pub fn new(per_minute: u32) -> Self {
        Self { per_minute: per_minute.max(1), tally: Mutex::new(HashMap::new()) }
    }

    fn tally(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, (u32, Instant)>> {
        self.tally.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long until `ip` may use the plugin again, if it is refused now.
    pub fn refused_for(&self, ip: IpAddr) -> Option<Duration> {
        let tally = self.tally();
        let (count, since) = tally.get(&crate::capacity::client_key(ip))?;
        let age = since.elapsed();
        (*count >= self.per_minute && age < CLIENT_WINDOW).then(|| CLIENT_WINDOW - age)
    }

    /// Records a failure caused by `ip`. Returns whether it is that client's
    /// first within the window (only those count toward the breaker).
    pub fn record(&self, ip: IpAddr) -> bool {
        let mut tally = self.tally();
        let now = Instant::now();
        let key = crate::capacity::client_key(ip);
        if let Some((count, since)) = tally.get_mut(&key) {
            if now.duration_since(*since) < CLIENT_WINDOW {
                *count += 1;
                return false;
            }
            *count = 1;
            *since = now;
            return true;
        }
        if tally.len() >= MAX_TRACKED_CLIENTS {
            tally.retain(|_, (_, since)| now.duration_since(*since) < CLIENT_WINDOW);
        }
        if tally.len() < MAX_TRACKED_CLIENTS {
            tally.insert(key, (1, now));
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_and_a_successful_probe_closes_it() {
        let b = Breaker::new(3, Duration::from_millis(20));
        for _ in 0..2 {
            assert_eq!(b.failed(Admission::Call, true), None);
        }
        assert_eq!(b.failed(Admission::Call, false), None, "uncounted failures do not open it");
        assert!(b.failed(Admission::Call, true).is_some());
        assert!(matches!(b.admit(), Admission::Open(_)));
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(b.admit(), Admission::Probe);
        assert!(matches!(b.admit(), Admission::Open(_)), "one probe at a time");
        assert!(b.succeeded(Admission::Probe));
        assert_eq!(b.admit(), Admission::Call);
    }

    #[test]
    fn a_failed_probe_reopens_for_longer() {
        let b = Breaker::new(1, Duration::from_millis(10));
        assert_eq!(b.failed(Admission::Call, true), Some(Duration::from_millis(10)));
        std::thread::sleep(Duration::from_millis(15));
        assert_eq!(b.admit(), Admission::Probe);
        assert_eq!(b.failed(Admission::Probe, true), Some(Duration::from_millis(20)));
        assert!(matches!(b.admit(), Admission::Open(_)));
    }

    #[test]
    fn a_client_counts_once_per_window_and_is_refused_past_its_allowance() {
        let c = ClientFailures::new(3);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(c.record(ip));
        assert!(!c.record(ip));
        assert!(c.refused_for(ip).is_none());
        assert!(!c.record(ip));
        assert!(c.refused_for(ip).is_some());
        assert!(c.refused_for("10.0.0.2".parse().unwrap()).is_none());
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::2".parse().unwrap();
        assert!(c.record(a));
        assert!(!c.record(b), "one /64 is one client");
    }
}
