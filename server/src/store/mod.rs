//! Durability: the run's store. Runs, rounds, clients, mediator assignments
//! and events in a database, and the global model after each completed
//! round, so a killed server resumes from its last completed round.
//!
//! One contract, [`RunStore`], two stores behind it:
//! - [`sqlite::SqliteStore`], the embedded default: `astraea.db` and atomic
//!   safetensors checkpoint files in the state directory;
//! - [`postgres::PgStore`], when several server processes share one run:
//!   PostgreSQL, checkpoints content-addressed in it, the leader's writes
//!   fenced by its [`lease::Lease`]'s term.
//!
//! A round is committed checkpoint first, rows second: a crash between the
//! two leaves an unreferenced checkpoint and the previous round as the last
//! completed one, so nothing recorded is ever lost or half-done.

pub mod gateways;
pub mod lease;
pub mod listen;
pub mod outage;
pub mod postgres;
pub mod sqlite;

use astraea_core::metrics::RoundRecord;
use astraea_core::weights::{ParamShape, Weights};

use crate::state::MediatorStatus;

pub use lease::{Lease, LeaseSettings};
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("database error: {0}")]
    Sql(#[from] rusqlite::Error),
    /// PostgreSQL failed (or could not be reached).
    #[error("database error: {0}")]
    Postgres(#[from] ::postgres::Error),
    /// A write of the leader's, refused because another server took the
    /// run's lease: this one leads no more and changed nothing.
    #[error("refused: this server's lease (term {term}) was taken over (term now {current})")]
    Fenced {
        /// The term this server led at.
        term: i64,
        /// The lease's term now (0: no lease row).
        current: i64,
    },
    /// The store's connection thread has gone.
    #[error("the store's connection thread has stopped")]
    Closed,
    /// A store call panicked (a row of a shape the store did not write);
    /// the connection thread goes on.
    #[error("a store call panicked")]
    Panicked,
    /// The run of this name finished; in a store several servers share, a
    /// finished run is not begun again (it would wipe its results): a new
    /// run takes a new name.
    #[error("run {name:?} has finished; start a new run under another --run-name")]
    Finished {
        /// The run's name.
        name: String,
    },
    /// The file system failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// What happened.
        source: std::io::Error,
    },
    /// A checkpoint does not fit the model.
    #[error("checkpoint {name} does not fit the model: {reason}")]
    Checkpoint {
        /// The checkpoint (a file, or a blob's hash).
        name: String,
        /// Why.
        reason: String,
    },
    /// The privacy accountant kept with the last round does not read back:
    /// resuming would have to guess what the run spent, and might guess
    /// low.
    #[error("round {round}'s privacy accountant is damaged; the run cannot resume")]
    Accountant {
        /// The round.
        round: usize,
    },
}

/// What a completed round leaves beside its record, to resume from.
#[derive(Debug, Clone, Copy)]
pub struct RoundState<'a> {
    /// Skipped hops counted so far.
    pub skipped_hops: u64,
    /// The round's mediators.
    pub mediators: &'a [MediatorStatus],
    /// The global model after the round, as a safetensors file.
    pub checkpoint: &'a [u8],
    /// The update guard's history.
    pub guard: &'a [f64],
    /// The privacy accountant after the round (client-level DP runs).
    pub accountant: Option<&'a astraea_core::privacy::RdpAccountant>,
    /// The clip the next round uses (client-level DP runs; under adaptive
    /// clipping, where it has moved to).
    pub model_clip: Option<f64>,
    /// The run's last round: the run is marked finished with it, in the
    /// same transaction (a gateway reading the round's outcome sees that
    /// the run finished with it, and tells its clients `last`).
    pub last: bool,
}

/// A run as found in (or created in) the database.
#[derive(Debug, Clone)]
pub struct Resumed {
    /// The run's row id.
    pub run_id: i64,
    /// Rounds already completed, in order.
    pub history: Vec<RoundRecord>,
    /// The plan already sent, if any.
    pub plan: Option<Vec<f64>>,
    /// The global model after the last completed round, if any.
    pub weights: Option<Weights>,
    /// Skipped hops counted so far.
    pub skipped_hops: u64,
    /// The update guard's history as of the last completed round.
    pub guard: Vec<f64>,
    /// The privacy accountant as of the last completed round, when it was
    /// kept (and reads back sound).
    pub accountant: Option<astraea_core::privacy::RdpAccountant>,
    /// The clip kept with the last completed round, when one was kept and
    /// it is a finite positive number.
    pub model_clip: Option<f64>,
    /// The largest client id the run has given (0: none), so ids given
    /// after a restart or a takeover are new ones.
    pub last_client_id: u64,
}

/// A client as the store keeps it, to be resumed by its token on any
/// server of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Joined<'a> {
    /// Its id in the run.
    pub id: u64,
    /// Its training backend, as it said.
    pub backend: &'a str,
    /// Its demo slot, when it trains a demo shard the server gave it
    /// rather than data of its own: it was the run's n-th demo client
    /// (from 1), and its shard is (n - 1) mod K ([`RunStore::take_demo_slot`]).
    pub demo: Option<u64>,
    /// Its resume token; the store keeps only its SHA-256
    /// ([`token_hash`]), never the token.
    pub token: &'a str,
}

/// How far back every read of the feed of moves looks again
/// ([`RunStore::moves_since`]): move numbers are given when a row is
/// written, not when it commits, so a later number can be read first.
pub const MOVES_OVERLAP: std::time::Duration = std::time::Duration::from_secs(5);

/// How long the feed of moves keeps a move ([`RunStore::prune_moves`]): a
/// server cut from the database for longer may miss a move, and then holds
/// that client until its old socket times out, as without the feed.
pub const MOVES_KEPT: std::time::Duration = std::time::Duration::from_secs(600);

/// A client resuming on a server of the run, as the run's feed of moves
/// keeps it ([`RunStore::client_moved`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    /// Its number in the feed: later moves have larger numbers.
    pub seq: u64,
    /// The client.
    pub client_id: u64,
    /// The server it resumed on.
    pub server: String,
}

/// What the store keeps of a resume token: its SHA-256, in hex. A token
/// is 128 random bits, so its hash can be looked up by equality without
/// leaking anything a timing could tell.
pub fn token_hash(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

impl Resumed {
    /// A run with nothing completed yet.
    pub fn fresh(run_id: i64) -> Self {
        Self {
            run_id,
            history: vec![],
            plan: None,
            weights: None,
            skipped_hops: 0,
            guard: vec![],
            accountant: None,
            model_clip: None,
            last_client_id: 0,
        }
    }
}

/// What every store keeps of a run, whatever the database. Every method
/// either does all of its write or none of it.
pub trait RunStore: Send + std::fmt::Debug {
    /// The unfinished run called `name`, with what it completed, or a new
    /// one. A finished run of that name starts again, empty, in the store
    /// one server keeps (SQLite); a store several servers share refuses it
    /// ([`StoreError::Finished`]), since the server asking may only have
    /// waited while another finished it. `config` is stored for the
    /// record; `shapes` check the last checkpoint.
    ///
    /// # Errors
    /// The database, a checkpoint that does not fit `shapes`, a damaged
    /// privacy accountant ([`StoreError::Accountant`]), a finished run in a
    /// shared store, or a fenced write ([`StoreError::Fenced`]).
    fn resume_or_create(
        &mut self,
        name: &str,
        config: &str,
        shapes: &[ParamShape],
    ) -> Result<Resumed, StoreError>;

    /// Records the plan sent to the clients.
    fn save_plan(&mut self, run_id: i64, ratios: &[f64]) -> Result<(), StoreError>;

    /// Commits a completed round: the checkpoint (a safetensors file, as
    /// `export::ModelCard::export` writes it) first, then its rows.
    fn save_round(
        &mut self,
        run_id: i64,
        record: &RoundRecord,
        kept: &RoundState<'_>,
    ) -> Result<(), StoreError>;

    /// Marks the run finished: a restart of the one server that keeps it
    /// begins a new one; a shared store refuses its name from then on.
    fn finish(&mut self, run_id: i64) -> Result<(), StoreError>;

    /// Records an event (a skip, a rejection, a resume).
    fn event(
        &mut self,
        run_id: i64,
        round: Option<u32>,
        kind: &str,
        detail: &str,
    ) -> Result<(), StoreError>;

    /// Records a client joining (with its token's hash, so it can resume
    /// on whichever server leads the run next).
    fn client_joined(&mut self, run_id: i64, client: &Joined<'_>) -> Result<(), StoreError>;

    /// Forgets client `client_id`'s resume token (a refused client: its
    /// token must not bring it back, on this server or another).
    fn forget_token(&mut self, run_id: i64, client_id: u64) -> Result<(), StoreError>;

    /// The client of run `run_id` whose resume token is `token`: its id
    /// and, when it trains a demo shard, its demo slot ([`Joined::demo`]);
    /// `None` for a token the run never gave.
    fn client_by_token(
        &mut self,
        run_id: i64,
        token: &str,
    ) -> Result<Option<(u64, Option<u64>)>, StoreError>;

    /// The next demo slot of run `run_name` (from 1), counted across every
    /// server that shares this store, so that the run's demo clients take
    /// the demo shards in turn wherever they join (a gateway's n-th client
    /// and the leader's n-th do not share a shard); `None` where the store
    /// is one server's alone, whose client ids number its demo clients.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be written.
    fn take_demo_slot(&mut self, run_name: &str) -> Result<Option<u64>, StoreError> {
        let _ = run_name;
        Ok(None)
    }

    /// Records that client `client_id` of run `run_name` resumed on
    /// server `server` (its token, on a new socket): the move's number in
    /// the run's feed of moves, which every server of the run reads
    /// ([`RunStore::moves_since`]) to let go of a client that is now held
    /// elsewhere; `None` where the store is one server's alone.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be written.
    fn client_moved(
        &mut self,
        run_name: &str,
        client_id: u64,
        server: &str,
    ) -> Result<Option<u64>, StoreError> {
        let _ = (run_name, client_id, server);
        Ok(None)
    }

    /// Deletes the moves of run `run_name` written more than `kept` ago
    /// (the feed only has to reach back to where its slowest reader
    /// stands); how many. Nothing where the store is one server's alone.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be written.
    fn prune_moves(
        &mut self,
        run_name: &str,
        kept: std::time::Duration,
    ) -> Result<u64, StoreError> {
        let _ = (run_name, kept);
        Ok(0)
    }

    /// The moves of run `run_name` after move `after` (at most `limit`),
    /// after those at or before it written in the last [`MOVES_OVERLAP`]
    /// (at most `limit`, the latest), each part oldest first ([`Move`]),
    /// and the number to read after next time; with `after` `None`, no
    /// moves, only where the feed stands.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be read.
    fn moves_since(
        &mut self,
        run_name: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<Move>, u64), StoreError> {
        let _ = (run_name, limit);
        Ok((Vec::new(), after.unwrap_or(0)))
    }

    /// Counts rows of `rounds`, `mediators`, `clients` or `events` for a
    /// run (for tests and the dashboard).
    ///
    /// # Panics
    /// On any other table name (a caller's bug, never a client's input).
    fn count(&mut self, table: &str, run_id: i64) -> Result<i64, StoreError>;

    /// Events of a kind, as (round, detail), oldest first.
    fn events(&mut self, run_id: i64, kind: &str)
    -> Result<Vec<(Option<u32>, String)>, StoreError>;
}

/// The store a server writes to.
pub type Store = Box<dyn RunStore>;

/// The tables [`RunStore::count`] may count.
pub(crate) const COUNTED: [&str; 4] = ["rounds", "mediators", "clients", "events"];

/// One completed round's row as a store reads it back, before its
/// mediators and checkpoint are joined in.
#[derive(Debug)]
pub(crate) struct StoredRound {
    /// The record, its mediators still empty.
    pub record: RoundRecord,
    /// Skipped hops counted so far.
    pub skipped: u64,
    /// Where the checkpoint is (a file name, or a blob's hash).
    pub checkpoint: String,
    /// The guard's history, as JSON.
    pub guard: Option<String>,
    /// The accountant, as JSON.
    pub accountant: Option<String>,
    /// The clip, unchecked.
    pub model_clip: Option<f64>,
}

/// Joins a run's stored rounds (in order) into what the server resumes
/// from, with one rule for every store: an unreadable guard history or hop
/// tally reads as empty, a clip that is not a finite positive number is
/// dropped, but an accountant that was kept and does not read back stops
/// the resume, and so does a checkpoint that does not fit `shapes`.
pub(crate) fn assemble(
    (run_id, last_client_id): (i64, u64),
    plan: Option<String>,
    rounds: Vec<StoredRound>,
    mut mediators: impl FnMut(usize) -> Result<Vec<Vec<u64>>, StoreError>,
    checkpoint: impl FnOnce(&str) -> Result<Vec<u8>, StoreError>,
    shapes: &[ParamShape],
) -> Result<Resumed, StoreError> {
    let mut history = Vec::with_capacity(rounds.len());
    let mut last = None;
    for mut round in rounds {
        round.record.mediators = mediators(round.record.round)?;
        history.push(round.record.clone());
        last = Some(round);
    }
    let mut resumed = Resumed::fresh(run_id);
    resumed.last_client_id = last_client_id;
    resumed.plan = plan.and_then(|p| serde_json::from_str(&p).ok());
    let Some(last) = last else {
        return Ok(resumed);
    };
    resumed.guard = last
        .guard
        .as_deref()
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or_default();
    // Kept but unreadable is not the same as never kept (a database from
    // before accountants were saved): refuse rather than guess.
    resumed.accountant = match last.accountant.as_deref() {
        None => None,
        Some(text) => Some(astraea_core::privacy::RdpAccountant::from_json(text).ok_or(
            StoreError::Accountant {
                round: last.record.round,
            },
        )?),
    };
    resumed.model_clip = last.model_clip.filter(|c| c.is_finite() && *c > 0.0);
    resumed.skipped_hops = last.skipped;
    let bytes = checkpoint(&last.checkpoint)?;
    resumed.weights =
        Some(
            Weights::from_safetensors(&bytes, shapes).map_err(|e| StoreError::Checkpoint {
                name: last.checkpoint.clone(),
                reason: e.to_string(),
            })?,
        );
    resumed.history = history;
    Ok(resumed)
}

/// Behaviour every [`RunStore`] owes, as test bodies each store's tests
/// call with a way to open it (again, as after a crash).
#[cfg(test)]
pub(crate) mod contract {
    use super::*;
    use astraea_core::model::ModelConfig;
    use burn::prelude::*;

    pub fn record(round: usize, accuracy: f64) -> RoundRecord {
        RoundRecord {
            round,
            accuracy,
            loss: 1.0,
            bytes_up: 10 * round as u64,
            bytes_down: 20 * round as u64,
            mean_kl: 0.2,
            wall_s: round as f64,
            train_samples: 300 * round as u64,
            train_s: 0.5 * round as f64,
            clock_s: round as f64,
            epsilon: None,
            // As the tests' `RoundState`s keep them.
            mediators: vec![vec![1, 2]],
            hops: astraea_core::engine::HopTally {
                accepted: 3,
                refused: 1,
                discarded: 0,
                skipped: round as u64,
            },
        }
    }

    /// The papers' CNN, freshly initialised.
    pub fn weights() -> Weights {
        Weights::from_model(&ModelConfig::new(10).init(&Device::flex()))
    }

    /// A round's state with nothing but a checkpoint and a clip.
    pub fn bare(checkpoint: &[u8], model_clip: Option<f64>) -> RoundState<'_> {
        RoundState {
            skipped_hops: 0,
            mediators: &[],
            checkpoint,
            guard: &[],
            accountant: None,
            model_clip,
            last: false,
        }
    }

    /// Two rounds saved, then opened again: the run, its rounds, plan,
    /// model, skipped hops and guard come back.
    pub fn a_reopened_store_resumes_the_unfinished_run_from_its_last_round(
        open: &dyn Fn() -> Store,
    ) {
        // Prepare
        let weights = Weights::from_model(&ModelConfig::new(10).init(&Device::flex()));
        let mediators = vec![MediatorStatus {
            members: vec![1, 2],
            kl: 0.1,
            counts: vec![30, 10],
            hops: 4,
            hops_done: 4,
            current: None,
        }];
        let run_id = {
            let mut store = open();
            let run = store
                .resume_or_create("demo", "{}", &weights.shapes)
                .unwrap();
            store.save_plan(run.run_id, &[1.0, 2.5]).unwrap();
            store
                .save_round(
                    run.run_id,
                    &record(1, 0.3),
                    &RoundState {
                        skipped_hops: 0,
                        mediators: &mediators,
                        checkpoint: &weights.to_safetensors(),
                        guard: &[0.5],
                        accountant: None,
                        model_clip: None,
                        last: false,
                    },
                )
                .unwrap();
            store
                .save_round(
                    run.run_id,
                    &record(2, 0.5),
                    &RoundState {
                        skipped_hops: 1,
                        mediators: &mediators,
                        checkpoint: &weights.to_safetensors(),
                        guard: &[0.5, 0.75],
                        accountant: None,
                        model_clip: None,
                        last: false,
                    },
                )
                .unwrap();
            run.run_id
        };

        // Execute: open again, as after a crash.
        let mut store = open();
        let resumed = store
            .resume_or_create("demo", "{}", &weights.shapes)
            .unwrap();

        // Assert
        assert_eq!(resumed.run_id, run_id);
        assert_eq!(resumed.history, vec![record(1, 0.3), record(2, 0.5)]);
        assert_eq!(resumed.plan, Some(vec![1.0, 2.5]));
        assert_eq!(resumed.weights.as_ref(), Some(&weights));
        assert_eq!(resumed.skipped_hops, 1);
        assert_eq!(resumed.guard, vec![0.5, 0.75]);
        assert_eq!(store.count("mediators", run_id).unwrap(), 2);
    }

    /// A finished run of the same name starts again, empty (a store one
    /// server keeps): finished by `finish`, or by saving its last round
    /// (`RoundState::last`, without `finish`: a server that dies between
    /// the two has finished the run all the same).
    pub fn a_finished_run_is_not_resumed(open: &dyn Fn() -> Store) {
        let weights = weights();
        let checkpoint = weights.to_safetensors();
        for by_last_round in [true, false] {
            {
                let mut store = open();
                let run = store
                    .resume_or_create("demo", "{}", &weights.shapes)
                    .unwrap();
                let kept = RoundState {
                    last: by_last_round,
                    ..bare(&checkpoint, None)
                };
                store
                    .save_round(run.run_id, &record(1, 0.3), &kept)
                    .unwrap();
                if !by_last_round {
                    store.finish(run.run_id).unwrap();
                }
            }

            let mut store = open();
            let fresh = store
                .resume_or_create("demo", "{}", &weights.shapes)
                .unwrap();

            assert!(
                fresh.history.is_empty() && fresh.weights.is_none(),
                "finished by its last round: {by_last_round}"
            );
        }
    }

    /// A client recorded with its token is found by that token (its id
    /// and demo slot), in its run only; the run remembers the largest id
    /// given.
    pub fn a_client_is_found_by_its_token(open: &dyn Fn() -> Store) {
        let weights = weights();
        let mut store = open();
        let run = store
            .resume_or_create("tokens", "{}", &weights.shapes)
            .unwrap();
        let other = store
            .resume_or_create("other", "{}", &weights.shapes)
            .unwrap();
        for (id, demo, token) in [(1, Some(1), "a".repeat(32)), (7, None, "b".repeat(32))] {
            let joined = Joined {
                id,
                backend: "flex",
                demo,
                token: &token,
            };
            store.client_joined(run.run_id, &joined).unwrap();
        }

        let mut store = open();
        let found = store.client_by_token(run.run_id, &"a".repeat(32)).unwrap();
        let own = store.client_by_token(run.run_id, &"b".repeat(32)).unwrap();
        let unknown = store.client_by_token(run.run_id, &"c".repeat(32)).unwrap();
        let elsewhere = store
            .client_by_token(other.run_id, &"a".repeat(32))
            .unwrap();
        let resumed = store
            .resume_or_create("tokens", "{}", &weights.shapes)
            .unwrap();

        assert_eq!(found, Some((1, Some(1))));
        assert_eq!(own, Some((7, None)));
        assert_eq!((unknown, elsewhere), (None, None));
        assert_eq!(resumed.last_client_id, 7);
    }
}
