//! Wake-ups for a round's phases over PostgreSQL's LISTEN/NOTIFY, so the
//! servers of a run hear at once what they would otherwise poll for: the
//! leader placed a round on the gateways, a gateway gave its partial back,
//! the leader recorded a round or finished the run.
//!
//! A notification is only ever a hint to re-read the tables, never the
//! news itself, because LISTEN/NOTIFY loses what is sent while nobody
//! listens (a listener's session cut, its reconnect under way) and takes a
//! global lock at every commit that notifies. So:
//! - only rare events notify (a few per round and gateway, from
//!   [`notify`] inside the transaction that makes the change: sent at its
//!   commit, never for a rolled-back one), one channel, the run's name as
//!   the payload;
//! - the listener holds a connection of its own (never the store's, the
//!   lease's or a pooled one), on a thread of its own; every time it is
//!   listening again after a cut it wakes its waiters too
//!   ([`Wake::Reconnected`]), since whatever was sent meanwhile is lost;
//! - waiters wait at most a fallback period and re-read after every
//!   wake-up of any kind, so a silently dead listener costs latency,
//!   never a round.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use postgres::GenericClient;
use postgres::fallible_iterator::FallibleIterator;

use super::StoreError;

/// The channel every server of a database listens on; the payload names
/// the run.
pub const CHANNEL: &str = "astraea_work";

/// Tells the listeners of `run` that its work moved, when the transaction
/// `tx` commits.
///
/// # Errors
/// The database failed.
pub(crate) fn notify(tx: &mut impl GenericClient, run: &str) -> Result<(), StoreError> {
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &run])?;
    Ok(())
}

/// Like [`notify`], for the run whose row id is `run_id`.
///
/// # Errors
/// The database failed.
pub(crate) fn notify_run_id(tx: &mut impl GenericClient, run_id: i64) -> Result<(), StoreError> {
    tx.execute(
        "SELECT pg_notify($1, name) FROM runs WHERE id = $2",
        &[&CHANNEL, &run_id],
    )?;
    Ok(())
}

/// Why a [`Waker::wait`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// A notification for the run arrived.
    Notified,
    /// The listener is listening again after a cut (or for the first
    /// time): what was sent meanwhile is lost, so re-read.
    Reconnected,
    /// Nothing came within the wait's time.
    TimedOut,
}

/// What the listener has heard so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Heard {
    notified: u64,
    listening: u64,
}

/// How long the listener's thread blocks for a notification before it
/// looks whether it should stop.
const LISTEN_SLICE: Duration = Duration::from_millis(250);

/// A quiet connection is pinged this often, so a dead one is found (and
/// replaced) within the connection's own timeouts, not never.
const PING_EVERY: Duration = Duration::from_secs(5);

/// The listener of one run: a thread with a connection of its own that
/// LISTENs on [`CHANNEL`] and reconnects (backing off from 50 ms to 2 s)
/// whenever the connection is lost. Dropping it ends the thread within
/// [`LISTEN_SLICE`].
#[derive(Debug)]
pub struct Wakes {
    heard: tokio::sync::watch::Receiver<Heard>,
    stop: Arc<AtomicBool>,
}

impl Wakes {
    /// Starts listening for `run` on the database at `url` (in the
    /// background: the first connection's failure is retried, not
    /// returned).
    ///
    /// # Errors
    /// The thread could not be started.
    pub fn start(url: &str, run: &str) -> Result<Self, StoreError> {
        let (tell, heard) = tokio::sync::watch::channel(Heard::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (url, run, stopping) = (url.to_string(), run.to_string(), stop.clone());
        std::thread::Builder::new()
            .name("astraea-listen".into())
            .spawn(move || listen(&url, &run, &tell, &stopping))
            .map_err(|source| StoreError::Io {
                path: "(the listener's thread)".into(),
                source,
            })?;
        Ok(Self { heard, stop })
    }

    /// A waiter that wakes for what the listener hears from now on.
    pub fn waker(&self) -> Waker {
        let mut heard = self.heard.clone();
        let last = *heard.borrow_and_update();
        Waker { heard, last }
    }
}

impl Drop for Wakes {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One waiter on a [`Wakes`].
#[derive(Debug)]
pub struct Waker {
    heard: tokio::sync::watch::Receiver<Heard>,
    last: Heard,
}

impl Waker {
    /// Waits until the listener hears something it had not when this
    /// waiter last woke (or was made), at most `at_most`. The caller
    /// re-reads whatever it waits for after any answer.
    pub async fn wait(&mut self, at_most: Duration) -> Wake {
        match tokio::time::timeout(at_most, self.heard.changed()).await {
            Ok(Ok(())) => {
                let now = *self.heard.borrow_and_update();
                let before = std::mem::replace(&mut self.last, now);
                if now.listening > before.listening {
                    Wake::Reconnected
                } else {
                    Wake::Notified
                }
            }
            // The listener is gone (it never ends while its `Wakes` lives):
            // only the fallback is left.
            Ok(Err(_)) => {
                tokio::time::sleep(at_most).await;
                Wake::TimedOut
            }
            Err(_) => Wake::TimedOut,
        }
    }
}

/// The listener's thread: (re)connects, LISTENs, and raises `tell` for
/// every notification of `run` and every time it listens anew, until
/// `stop`.
fn listen(url: &str, run: &str, tell: &tokio::sync::watch::Sender<Heard>, stop: &AtomicBool) {
    let mut backoff = Duration::from_millis(50);
    let mut down_since: Option<std::time::Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        let session = format!("SET statement_timeout = '10s'; LISTEN {CHANNEL}");
        let mut client = match super::postgres::open(url, "astraea-listen", &session) {
            Ok(client) => client,
            Err(e) => {
                if down_since.is_none() {
                    tracing::warn!("listening for the run's work: {e}; retrying");
                    down_since = Some(std::time::Instant::now());
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        if let Some(since) = down_since.take() {
            tracing::info!(
                "listening for the run's work again after {:.1} s",
                since.elapsed().as_secs_f64()
            );
        }
        backoff = Duration::from_millis(50);
        // Listening from now on; anything sent before is lost: waiters
        // re-read.
        tell.send_modify(|heard| heard.listening += 1);
        let mut quiet = std::time::Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let next = client.notifications().timeout_iter(LISTEN_SLICE).next();
            match next {
                Ok(Some(notification)) => {
                    quiet = std::time::Instant::now();
                    if notification.payload() == run {
                        tell.send_modify(|heard| heard.notified += 1);
                    }
                }
                Ok(None) if client.is_closed() => break,
                Ok(None) => {
                    if quiet.elapsed() >= PING_EVERY {
                        quiet = std::time::Instant::now();
                        if client.simple_query("").is_err() {
                            break;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!("listening for the run's work: {e}; reconnecting");
                    break;
                }
            }
        }
    }
}
