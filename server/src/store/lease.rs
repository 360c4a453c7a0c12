//! The leader's lease on a run, in PostgreSQL: exactly one server process
//! leads a run (forms its mediators, closes its rounds, adopts its models);
//! the others wait and one takes over within seconds when it goes.
//!
//! Two things make it, each for one way a leader goes:
//! - **an advisory lock** (`pg_try_advisory_lock(LEASE_LOCK,
//!   hashtext(run))`) held by a connection of the lease's own, never pooled
//!   and used for nothing else: when the leader's process dies or its
//!   session is cut, PostgreSQL releases the lock and the next follower's
//!   poll takes it;
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
//! and its next renewal finds the lease gone, so it stops
//! ([`Lease::lost`]).

use std::sync::mpsc;
use std::time::Duration;

use postgres::{Client, NoTls};

use super::StoreError;

/// The first key of the lease's advisory lock (the second is the run
/// name's `hashtext`; two runs whose names hash alike take turns leading,
/// which is slower, never unsafe: the term is per run).
pub const LEASE_LOCK: i32 = 0x4153_544c; // "ASTL"

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

/// A held lease; dropping it releases it (its connection closes).
pub struct Lease {
    run: String,
    term: i64,
    lost: tokio::sync::watch::Receiver<bool>,
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
        let mut client = Client::connect(url, NoTls)?;
        let ttl_s = settings.ttl.as_secs_f64();
        let term = loop {
            if let Some(term) = try_take(&mut client, run, holder, ttl_s)? {
                break term;
            }
            if let Some(current) = cut_off_stale(&mut client, run)? {
                waiting(&current);
            }
            std::thread::sleep(settings.poll);
        };
        let (lost_tx, lost) = tokio::sync::watch::channel(false);
        let (stop, stopped) = mpsc::channel::<()>();
        let (run_name, every) = (run.to_string(), settings.ttl / 3);
        std::thread::Builder::new()
            .name("astraea-lease".into())
            .spawn(move || {
                loop {
                    match stopped.recv_timeout(every) {
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        // Released: the connection closes with this thread.
                        _ => return,
                    }
                    let renewed = client.execute(
                        "UPDATE leases SET expires_at = now() + make_interval(secs => $3)
                         WHERE run = $1 AND term = $2",
                        &[&run_name, &term, &ttl_s],
                    );
                    if !matches!(renewed, Ok(1)) {
                        tracing::error!(
                            run = %run_name,
                            term,
                            "lost the lease ({}); this server leads no more",
                            match renewed {
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
            _stop: stop,
        })
    }

    /// The term this lease was taken at (1 for the run's first leader).
    pub fn term(&self) -> i64 {
        self.term
    }

    /// Whether a renewal failed: another server leads now, or the
    /// database could not be reached before the lease would expire.
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Resolves once the lease is lost (never, while it is held).
    pub async fn lost(&self) {
        let mut lost = self.lost.clone();
        // An error means the renewing thread ended without losing it,
        // which only a release does: then it is not lost, so wait forever.
        if lost.wait_for(|lost| *lost).await.is_err() {
            std::future::pending::<()>().await;
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
    let locked: bool = client
        .query_one(
            "SELECT pg_try_advisory_lock($1, hashtext($2))",
            &[&LEASE_LOCK, &run],
        )?
        .get(0);
    if !locked {
        return Ok(None);
    }
    let term: i64 = client
        .query_one(
            "INSERT INTO leases (run, term, holder, holder_pid, holder_started, expires_at)
             SELECT $1, 1, $2, pid, backend_start, now() + make_interval(secs => $3)
               FROM pg_stat_activity WHERE pid = pg_backend_pid()
             ON CONFLICT (run) DO UPDATE SET term = leases.term + 1, holder = EXCLUDED.holder,
               holder_pid = EXCLUDED.holder_pid, holder_started = EXCLUDED.holder_started,
               expires_at = EXCLUDED.expires_at
             RETURNING term",
            &[&run, &holder, &ttl_s],
        )?
        .get(0);
    Ok(Some(term))
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
