//! The leader's lease on a run, in PostgreSQL: exactly one server process
//! leads a run (forms its mediators, closes its rounds, adopts its models);
//! the others wait and one takes over within seconds when it goes.
//!
//! Two things make it, each for one way a leader goes:
//! - **an advisory lock** (`pg_try_advisory_lock(key)`, the key 64 bits of
//!   the SHA-256 of the run's name) held by a connection of the lease's
//!   own, never pooled and used for nothing else: when the leader's process
//!   dies or its session is cut, PostgreSQL releases the lock and the next
//!   follower's poll takes it;
//! - **a term and an expiry** in the `leases` row: the new holder raises
//!   the term in the same statement that records it, and renews the expiry
//!   every third of the time to live. A leader that is paused (SIGSTOP, a
//!   frozen VM) keeps its session and so its lock; once its expiry passed,
//!   a follower cuts that session (`pg_terminate_backend`, checked against
//!   the session's start time so a reused process id is never cut) and
//!   takes the lock at its next poll.
//!
//! The term fences the leader's writes ([`super::postgres::PgStore::fence`]):
//! when an ex-leader wakes up, whatever it still tries to commit is refused,
//! which marks its lease lost, and so does its next renewal; and a leader
//! whose renewals have not succeeded for two thirds of the time to live
//! (a cut network: the call may hang) counts its lease lost on its own
//! clock, before any follower may take it over ([`Lease::lost`]).
//!
//! Every server of a run connects as the same role (one may end another's
//! session only then, without superuser rights) and directly, not through
//! a transaction-mode pooler (session advisory locks need sessions).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use postgres::Client;
use sha2::{Digest, Sha256};

use super::StoreError;

/// Raised (set to `true`) when a lease is lost; a fenced store raises it
/// when a write finds the term gone.
pub type LostSignal = Arc<tokio::sync::watch::Sender<bool>>;

/// The advisory lock key of `run`'s lease: 64 bits of the SHA-256 of
/// `astraea-lease:` and the name (two runs sharing a key would wait on
/// each other; at 64 bits they do not meet).
pub fn lease_key(run: &str) -> i64 {
    let digest = Sha256::digest(format!("astraea-lease:{run}"));
    i64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// The lease connection's session: a claim waits at most 1 s for a row
/// lock (a paused ex-leader's last write holding the lease row) and tries
/// again at the next poll.
const LEASE_SESSION: &str = "SET lock_timeout = '1s'; SET statement_timeout = '10s'";

/// How a lease is held.
#[derive(Debug, Clone, Copy)]
pub struct LeaseSettings {
    /// How long a lease lasts unrenewed: a paused leader is taken over
    /// after this (a dead one at the next poll). Renewed every third of it.
    pub ttl: Duration,
    /// How often a follower tries to take the lease.
    pub poll: Duration,
}

impl Default for LeaseSettings {
    /// 3 s to live, polled every 250 ms: a dead leader is replaced within a
    /// poll, a paused one within about 3.5 s.
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(3),
            poll: Duration::from_millis(250),
        }
    }
}

/// Who holds a lease, as a follower sees it while it waits.
#[derive(Debug, Clone, PartialEq)]
pub struct Holder {
    /// The holder's name (its host, process and address).
    pub name: String,
    /// Its term.
    pub term: i64,
    /// Seconds until its lease expires unless renewed (negative: expired).
    pub expires_in_s: f64,
}

/// A server of a run as the servers table last saw it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ServerSeen {
    /// Its name (its process and address).
    pub name: String,
    /// `leading` or `following`.
    pub role: String,
    /// The term it leads at (leaders only).
    pub term: Option<i64>,
    /// Seconds since it last said so.
    pub seen_s_ago: f64,
}

/// Records that `name` is `role` (at `term`) in `run`'s servers table and
/// answers the servers seen in the last minute, by name.
fn seen(
    client: &mut Client,
    run: &str,
    name: &str,
    (role, term): (&str, Option<i64>),
) -> Result<Vec<ServerSeen>, StoreError> {
    client.execute(
        "INSERT INTO servers (run, name, role, term, seen_at) VALUES ($1, $2, $3, $4, now())
         ON CONFLICT (run, name) DO UPDATE SET role = EXCLUDED.role, term = EXCLUDED.term, seen_at = now()",
        &[&run, &name, &role, &term],
    )?;
    Ok(client
        .query(
            "SELECT name, role, term, EXTRACT(EPOCH FROM now() - seen_at)::float8 FROM servers
             WHERE run = $1 AND seen_at > now() - interval '1 minute' ORDER BY name",
            &[&run],
        )?
        .iter()
        .map(|row| ServerSeen {
            name: row.get(0),
            role: row.get(1),
            term: row.get(2),
            seen_s_ago: row.get::<_, f64>(3).max(0.0),
        })
        .collect())
}

/// A held lease; dropping it releases it (its connection closes).
pub struct Lease {
    run: String,
    term: i64,
    lost: tokio::sync::watch::Receiver<bool>,
    signal: LostSignal,
    /// When the lease was taken, and how long after that the last renewal
    /// that succeeded was sent (ms): the leader's own clock.
    taken: Instant,
    renewed_ms: Arc<AtomicU64>,
    /// How long a renewal may be missing before the leader counts the
    /// lease lost: two thirds of the time to live.
    patience: Duration,
    /// The run's servers as the last renewal saw them.
    servers: Arc<std::sync::Mutex<Vec<ServerSeen>>>,
    /// Dropped with the lease, which ends the renewing thread.
    _stop: mpsc::Sender<()>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("run", &self.run)
            .field("term", &self.term)
            .field("lost", &self.is_lost())
            .finish()
    }
}

impl Lease {
    /// Blocks until this process holds `run`'s lease, calling `waiting`
    /// with the current holder at each poll it does not; then renews it on
    /// a thread of its own. The `leases` table must exist
    /// ([`super::postgres::PgStore::connect`] makes it).
    ///
    /// # Errors
    /// The database cannot be reached or refuses a statement.
    pub fn acquire(
        url: &str,
        run: &str,
        holder: &str,
        settings: LeaseSettings,
        mut waiting: impl FnMut(&Holder),
    ) -> Result<Self, StoreError> {
        let mut client = super::postgres::open(url, "astraea-lease", LEASE_SESSION)?;
        let ttl_s = settings.ttl.as_secs_f64();
        let term = loop {
            let taking = Instant::now();
            if let Some(term) = try_take(&mut client, run, holder, ttl_s)? {
                break (term, taking);
            }
            if let Some(current) = cut_off_stale(&mut client, run)? {
                waiting(&current);
            }
            // Operators see the waiting servers too (the leader lists them).
            seen(&mut client, run, holder, ("following", None))?;
            std::thread::sleep(settings.poll);
        };
        let (term, taken) = term;
        let (lost_tx, lost) = tokio::sync::watch::channel(false);
        let signal: LostSignal = Arc::new(lost_tx);
        let lost_tx = signal.clone();
        let renewed_ms = Arc::new(AtomicU64::new(0));
        let renewed = renewed_ms.clone();
        let (stop, stopped) = mpsc::channel::<()>();
        let (run_name, every) = (run.to_string(), settings.ttl / 3);
        let servers = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (listed, name) = (servers.clone(), holder.to_string());
        std::thread::Builder::new()
            .name("astraea-lease".into())
            .spawn(move || {
                loop {
                    match stopped.recv_timeout(every) {
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        // Released: the connection closes with this thread.
                        _ => return,
                    }
                    let sent = taken.elapsed().as_millis() as u64;
                    let renewal = client.execute(
                        "UPDATE leases SET expires_at = now() + make_interval(secs => $3)
                         WHERE run = $1 AND term = $2",
                        &[&run_name, &term, &ttl_s],
                    );
                    if matches!(renewal, Ok(1)) {
                        renewed.fetch_max(sent, Ordering::Relaxed);
                        // Bookkeeping: a failure here is not a lost lease.
                        if let Ok(now) =
                            seen(&mut client, &run_name, &name, ("leading", Some(term)))
                        {
                            *crate::state::lock(&listed) = now;
                        }
                    } else {
                        tracing::error!(
                            run = %run_name,
                            term,
                            "lost the lease ({}); this server leads no more",
                            match renewal {
                                Ok(_) => "another server took it".to_string(),
                                Err(e) => e.to_string(),
                            }
                        );
                        let _ = lost_tx.send(true);
                        return;
                    }
                }
            })
            .map_err(|source| StoreError::Io {
                path: "(the lease's thread)".into(),
                source,
            })?;
        Ok(Self {
            run: run.to_string(),
            term,
            lost,
            signal,
            taken,
            renewed_ms,
            patience: settings.ttl * 2 / 3,
            servers,
            _stop: stop,
        })
    }

    /// The run's servers, the leader and those waiting, as the last
    /// renewal saw them (seen in the last minute).
    pub fn servers(&self) -> Vec<ServerSeen> {
        crate::state::lock(&self.servers).clone()
    }

    /// The run this lease is on.
    pub fn run(&self) -> &str {
        &self.run
    }

    /// The signal that marks this lease lost (for a fenced store).
    pub fn signal(&self) -> LostSignal {
        self.signal.clone()
    }

    /// Whether the last renewal that succeeded was sent longer ago than
    /// two thirds of the time to live, on this process's clock.
    fn overdue(&self) -> bool {
        let renewed = Duration::from_millis(self.renewed_ms.load(Ordering::Relaxed));
        self.taken.elapsed() > renewed + self.patience
    }

    /// The term this lease was taken at (1 for the run's first leader).
    pub fn term(&self) -> i64 {
        self.term
    }

    /// Whether the lease is lost: a renewal failed or found another term,
    /// a fenced write found another term, or no renewal has succeeded for
    /// two thirds of the time to live.
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow() || self.overdue()
    }

    /// Resolves once the lease is lost (never, while it is held).
    pub async fn lost(&self) {
        let mut lost = self.lost.clone();
        let check = (self.patience / 4).max(Duration::from_millis(10));
        loop {
            if self.is_lost() {
                return;
            }
            // Woken by the signal, or at the next look at the clock.
            let _ = tokio::time::timeout(check, lost.changed()).await;
        }
    }
}

/// Takes the lease when its lock is free, raising the term in the same
/// statement that records the new holder.
fn try_take(
    client: &mut Client,
    run: &str,
    holder: &str,
    ttl_s: f64,
) -> Result<Option<i64>, StoreError> {
    let key = lease_key(run);
    let locked: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&key])?
        .get(0);
    if !locked {
        return Ok(None);
    }
    let claimed = client.query_one(
        "INSERT INTO leases (run, term, holder, holder_pid, holder_started, expires_at)
             SELECT $1, 1, $2, pid, backend_start, now() + make_interval(secs => $3)
               FROM pg_stat_activity WHERE pid = pg_backend_pid()
             ON CONFLICT (run) DO UPDATE SET term = leases.term + 1, holder = EXCLUDED.holder,
               holder_pid = EXCLUDED.holder_pid, holder_started = EXCLUDED.holder_started,
               expires_at = EXCLUDED.expires_at
             RETURNING term",
        &[&run, &holder, &ttl_s],
    );
    match claimed {
        Ok(row) => Ok(Some(row.get(0))),
        // The row is locked (an ex-leader's last write): let the lock go
        // and try again at the next poll.
        Err(e) if e.code() == Some(&postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
            client.execute("SELECT pg_advisory_unlock($1)", &[&key])?;
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// The current holder; its session is cut when its lease has expired (a
/// paused leader), so the lock frees for the next poll.
fn cut_off_stale(client: &mut Client, run: &str) -> Result<Option<Holder>, StoreError> {
    let Some(row) = client.query_opt(
        "SELECT holder, term, EXTRACT(EPOCH FROM expires_at - now())::float8 FROM leases WHERE run = $1",
        &[&run],
    )?
    else {
        return Ok(None);
    };
    let current = Holder {
        name: row.get(0),
        term: row.get(1),
        expires_in_s: row.get(2),
    };
    if current.expires_in_s < 0.0 {
        client.execute(
            "SELECT pg_terminate_backend(a.pid)
               FROM leases l JOIN pg_stat_activity a
                 ON a.pid = l.holder_pid AND a.backend_start = l.holder_started
              WHERE l.run = $1 AND l.expires_at < now() AND a.pid <> pg_backend_pid()",
            &[&run],
        )?;
    }
    Ok(Some(current))
}
