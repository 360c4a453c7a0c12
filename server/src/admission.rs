//! Joins rate-limited per source: a hundred sybils that join and say
//! `ready` cost every hop they are drawn into its stall timeout, so one
//! address may open only so many volunteer sockets a minute (issue 22).
//!
//! The limit is a token bucket per source (GCRA, the `governor` crate): a
//! burst of `burst` joins, then one every `60 / per_minute` seconds. A
//! refused upgrade is answered `429 Too Many Requests` with `Retry-After`
//! before any WebSocket exists, so a refused source costs the server one
//! HTTP exchange; the tab's reconnect back-off retries it.
//!
//! What a source is: the peer's address, an IPv6 address by its /64 (one
//! host is handed a whole /64). A peer on this machine (loopback) is the
//! operator's own (a swarm, a benchmark, the tests) and is not limited,
//! unless it is a reverse proxy that says whom it forwards: then the
//! address it appended last to `X-Forwarded-For` (nginx's
//! `$proxy_add_x_forwarded_for`, deploy/nginx.conf) is the source.
//! Anything before that entry was written by the client and is ignored;
//! the header from a peer on another machine is ignored too.
//!
//! What it does not do: volunteers behind one NAT (a lecture hall, a
//! carrier-grade NAT) share one bucket, so one of them joining in a loop
//! slows the others' joins too; a holder of a whole /48 has 65,536 /64s,
//! each with its burst; it limits joins, not the sockets a source holds
//! open at once; and it trusts whatever reaches the server over loopback
//! — behind a proxy that passes the client's own `X-Forwarded-For` through
//! unchanged (nginx's `$proxy_add_x_forwarded_for` appends, so is safe)
//! the header is the client's to choose.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;

use axum::http::HeaderMap;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};

/// Most joins a minute per source that `--join-rate` accepts.
pub const MAX_JOINS_PER_MINUTE: u32 = 60_000;
/// Largest burst that `--join-burst` accepts.
pub const MAX_JOIN_BURST: u32 = 100_000;
/// Sources remembered before the idle ones are forgotten (a source whose
/// bucket is full again is idle: forgetting it changes nothing).
const FORGET_ABOVE: usize = 10_000;
/// Joins between two sweeps of the idle sources (past [`FORGET_ABOVE`]).
const SWEEP_EVERY: u64 = 1_024;

/// How many joins one source may make: `per_minute` sustained after a
/// burst of `burst`. `per_minute` 0 turns the limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JoinRate {
    /// Joins a minute, sustained; 0: no limit.
    pub per_minute: u32,
    /// Joins at once from a source that joined none for a while.
    pub burst: u32,
}

impl Default for JoinRate {
    /// 30 a minute after a burst of 30: a lecture hall behind one NAT
    /// joins in a minute or two, a script of sybils in a trickle.
    fn default() -> Self {
        Self {
            per_minute: 30,
            burst: 30,
        }
    }
}

impl JoinRate {
    /// Checks the bounds: `per_minute` at most [`MAX_JOINS_PER_MINUTE`],
    /// `burst` 1 to [`MAX_JOIN_BURST`] when the limit is on.
    ///
    /// # Errors
    /// A message naming the bound that is broken.
    pub fn validate(self) -> Result<Self, String> {
        if self.per_minute > MAX_JOINS_PER_MINUTE {
            return Err(format!(
                "--join-rate {} is above {MAX_JOINS_PER_MINUTE} joins a minute (0 turns the limit off)",
                self.per_minute
            ));
        }
        if self.per_minute > 0 && !(1..=MAX_JOIN_BURST).contains(&self.burst) {
            return Err(format!(
                "--join-burst {} must be 1 to {MAX_JOIN_BURST}",
                self.burst
            ));
        }
        Ok(self)
    }
}

/// Where a join comes from, as far as the limit is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// A peer on this machine that forwards no one: not limited.
    Local,
    /// An address (IPv6 cut to its /64).
    Remote(IpAddr),
}

impl Source {
    /// The source of a request from `peer` with `headers`.
    pub fn of(peer: SocketAddr, headers: &HeaderMap) -> Self {
        let ip = peer.ip().to_canonical();
        if !ip.is_loopback() {
            return Self::Remote(prefix(ip));
        }
        // The proxy appends the address it saw: the last entry of the last
        // header. An entry that is not an address (a proxy's `unknown`)
        // leaves the peer as the source: the limit never loosens on it.
        let forwarded = headers
            .get_all("x-forwarded-for")
            .iter()
            .next_back()
            .and_then(|value| value.to_str().ok())
            .and_then(|list| list.rsplit(',').next())
            .map(str::trim);
        match forwarded {
            None => Self::Local,
            Some(entry) => match entry.parse::<IpAddr>() {
                Ok(ip) if ip.to_canonical().is_loopback() => Self::Local,
                Ok(ip) => Self::Remote(prefix(ip.to_canonical())),
                Err(_) => Self::Remote(ip),
            },
        }
    }
}

/// An IPv6 address cut to its /64; IPv4 unchanged.
fn prefix(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
    }
}

/// One GCRA bucket per source address, on clock `C`.
type SourceBuckets<C> =
    RateLimiter<IpAddr, HashMapStateStore<IpAddr>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// The per-source join limit of a server (or of a test, on a clock it
/// drives: [`JoinLimiter::with_clock`]).
pub struct JoinLimiter<C: Clock = DefaultClock> {
    limiter: Option<SourceBuckets<C>>,
    clock: C,
    /// Joins counted, for the sweeps.
    joins: std::sync::atomic::AtomicU64,
}

impl<C: Clock> std::fmt::Debug for JoinLimiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinLimiter")
            .field("on", &self.limiter.is_some())
            .field("sources", &self.limiter.as_ref().map_or(0, |l| l.len()))
            .finish()
    }
}

impl JoinLimiter {
    /// A limiter at `rate` on the system's monotonic clock.
    pub fn new(rate: JoinRate) -> Self {
        Self::with_clock(rate, DefaultClock::default())
    }
}

impl<C: Clock + Clone> JoinLimiter<C> {
    /// A limiter at `rate` on `clock`.
    pub fn with_clock(rate: JoinRate, clock: C) -> Self {
        let limiter = NonZeroU32::new(rate.per_minute).map(|per_minute| {
            let burst = NonZeroU32::new(rate.burst.max(1)).expect("at least 1");
            let quota = Quota::per_minute(per_minute).allow_burst(burst);
            RateLimiter::new(quota, HashMapStateStore::default(), clock.clone())
        });
        Self {
            limiter,
            clock,
            joins: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Counts a join from `source`: `Err(wait)` when the source has used its
    /// burst and must wait `wait` (at least a second, in whole seconds, as
    /// `Retry-After` says it) before the next join is taken.
    pub fn admit(&self, source: Source) -> Result<(), Duration> {
        let (Some(limiter), Source::Remote(ip)) = (&self.limiter, source) else {
            return Ok(());
        };
        // The idle ones are forgotten in one sweep under the store's lock:
        // at most once every [`SWEEP_EVERY`] joins, so a flood of sources
        // does not make every join sweep them all.
        let joins = self
            .joins
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if joins.is_multiple_of(SWEEP_EVERY) && limiter.len() > FORGET_ABOVE {
            limiter.retain_recent();
        }
        limiter.check_key(&ip).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            Duration::from_secs(wait.as_secs_f64().ceil().max(1.0) as u64)
        })
    }

    /// Sources remembered now.
    pub fn sources(&self) -> usize {
        self.limiter.as_ref().map_or(0, |limiter| limiter.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn peer(address: &str) -> SocketAddr {
        SocketAddr::new(address.parse().unwrap(), 40_000)
    }

    fn forwarded(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append("x-forwarded-for", value.parse().unwrap());
        }
        headers
    }

    #[test]
    fn a_remote_peer_is_its_address_whatever_it_claims_to_forward() {
        let claims = forwarded(&["203.0.113.9"]);
        assert_eq!(
            Source::of(peer("198.51.100.7"), &claims),
            Source::Remote("198.51.100.7".parse().unwrap())
        );
    }

    #[test]
    fn a_local_proxy_names_the_source_in_the_last_entry_it_appended() {
        let none = HeaderMap::new();
        assert_eq!(Source::of(peer("127.0.0.1"), &none), Source::Local);
        assert_eq!(Source::of(peer("::1"), &none), Source::Local);
        // The client wrote the first entries; nginx appended the last.
        let chain = forwarded(&["10.0.0.1, 192.0.2.1", "203.0.113.5"]);
        assert_eq!(
            Source::of(peer("127.0.0.1"), &chain),
            Source::Remote("203.0.113.5".parse().unwrap())
        );
        let list = forwarded(&["10.0.0.1, 203.0.113.6 "]);
        assert_eq!(
            Source::of(peer("127.0.0.1"), &list),
            Source::Remote("203.0.113.6".parse().unwrap())
        );
        // A proxy's "unknown" does not make the join local.
        let unknown = forwarded(&["unknown"]);
        assert_eq!(
            Source::of(peer("127.0.0.1"), &unknown),
            Source::Remote("127.0.0.1".parse().unwrap())
        );
        let local = forwarded(&["127.0.0.1"]);
        assert_eq!(Source::of(peer("127.0.0.1"), &local), Source::Local);
    }

    #[test]
    fn an_ipv6_host_is_its_slash_64_and_a_mapped_ipv4_is_the_ipv4() {
        let none = HeaderMap::new();
        assert_eq!(
            Source::of(peer("2001:db8:1:2:aaaa::1"), &none),
            Source::of(peer("2001:db8:1:2:bbbb::9"), &none)
        );
        assert_ne!(
            Source::of(peer("2001:db8:1:2::1"), &none),
            Source::of(peer("2001:db8:1:3::1"), &none)
        );
        assert_eq!(
            Source::of(peer("::ffff:198.51.100.7"), &none),
            Source::Remote("198.51.100.7".parse().unwrap())
        );
    }

    #[test]
    fn a_source_gets_its_burst_then_one_join_per_interval_and_others_are_untouched() {
        let clock = FakeRelativeClock::default();
        let limiter = JoinLimiter::with_clock(
            JoinRate {
                per_minute: 6,
                burst: 3,
            },
            clock.clone(),
        );
        let a = Source::Remote("198.51.100.7".parse().unwrap());
        let b = Source::Remote("198.51.100.8".parse().unwrap());
        for _ in 0..3 {
            assert_eq!(limiter.admit(a), Ok(()));
        }
        assert_eq!(limiter.admit(a), Err(Duration::from_secs(10)));
        assert_eq!(limiter.admit(b), Ok(()));
        assert_eq!(limiter.admit(Source::Local), Ok(()));
        clock.advance(Duration::from_secs(4));
        assert_eq!(limiter.admit(a), Err(Duration::from_secs(6)));
        clock.advance(Duration::from_secs(6));
        assert_eq!(limiter.admit(a), Ok(()));
        assert_eq!(limiter.admit(a), Err(Duration::from_secs(10)));
        assert_eq!(limiter.sources(), 2);
    }

    #[test]
    fn a_rate_of_zero_admits_everyone_and_out_of_bounds_rates_are_refused() {
        let limiter = JoinLimiter::new(JoinRate {
            per_minute: 0,
            burst: 0,
        });
        let a = Source::Remote("198.51.100.7".parse().unwrap());
        for _ in 0..1000 {
            assert_eq!(limiter.admit(a), Ok(()));
        }
        assert!(
            JoinRate {
                per_minute: MAX_JOINS_PER_MINUTE + 1,
                burst: 1
            }
            .validate()
            .is_err()
        );
        assert!(
            JoinRate {
                per_minute: 10,
                burst: 0
            }
            .validate()
            .is_err()
        );
        assert!(JoinRate::default().validate().is_ok());
    }
}
