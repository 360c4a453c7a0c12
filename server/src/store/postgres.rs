//! The shared store: PostgreSQL, so several server processes can keep one
//! run and a new leader goes on from the last round the old one committed.
//!
//! - **One connection on a thread of its own.** The blocking client
//!   (`postgres`, tokio-postgres underneath, which needs no database at
//!   build time) runs its own small runtime, which must never run inside
//!   the server's; so a thread owns the connection and every call is a job
//!   sent to it. The connection is reopened when it was closed (a restart
//!   of the database, `pg_terminate_backend`), at the next call. It is
//!   never pooled and never holds the leader's lease (that has its own
//!   connection: [`super::lease`]).
//! - **Migrations under an advisory lock**, taken and released on the
//!   connection that runs them, each migration and its version in one
//!   transaction: servers started at once migrate once.
//! - **Models content-addressed**: a checkpoint is a row of `blobs` keyed by
//!   the SHA-256 of its bytes, inserted if absent and never rewritten; a
//!   round's row names the hash. The blob and the round's rows commit in
//!   one transaction.
//! - **Fenced writes**: once [`PgStore::fence`] gave it the run's lease,
//!   every write (the run's creation, the plan, a round, the finish, an
//!   event, a client) reads the lease row `FOR SHARE` last in its own
//!   transaction and commits only while the term is still this server's.
//!   A paused or cut-off ex-leader's writes are refused with
//!   [`StoreError::Fenced`], change nothing, and mark its lease lost.
//! - **A run is begun once**: a finished run is never started again under
//!   the same name ([`StoreError::Finished`]), so a server that waited for
//!   the lease while the leader finished does not wipe the results.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::time::Duration;

use astraea_core::metrics::RoundRecord;
use astraea_core::weights::ParamShape;
use postgres::{Client, GenericClient, NoTls};
use sha2::{Digest, Sha256};

use super::{
    COUNTED, Joined, Move, Resumed, RoundState, RunStore, StoreError, StoredRound, assemble,
    token_hash,
};

/// Schema versions, applied in order; `astraea_schema` records which ran.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE runs (
        id BIGSERIAL PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        config TEXT NOT NULL,
        plan TEXT,
        finished BOOLEAN NOT NULL DEFAULT false,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE TABLE blobs (
        hash TEXT PRIMARY KEY,
        bytes BYTEA NOT NULL,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE TABLE rounds (
        run_id BIGINT NOT NULL REFERENCES runs(id),
        round BIGINT NOT NULL,
        accuracy DOUBLE PRECISION NOT NULL,
        loss DOUBLE PRECISION NOT NULL,
        bytes_up BIGINT NOT NULL,
        bytes_down BIGINT NOT NULL,
        mean_kl DOUBLE PRECISION NOT NULL,
        wall_s DOUBLE PRECISION NOT NULL,
        skipped_hops BIGINT NOT NULL,
        checkpoint TEXT NOT NULL REFERENCES blobs(hash),
        guard TEXT,
        accountant TEXT,
        epsilon DOUBLE PRECISION,
        model_clip DOUBLE PRECISION,
        train_samples BIGINT NOT NULL,
        train_s DOUBLE PRECISION NOT NULL,
        hops TEXT,
        term BIGINT,
        finished_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (run_id, round)
    );
    CREATE TABLE mediators (
        run_id BIGINT NOT NULL REFERENCES runs(id),
        round BIGINT NOT NULL,
        mediator BIGINT NOT NULL,
        members TEXT NOT NULL,
        kl DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (run_id, round, mediator)
    );
    CREATE TABLE clients (
        run_id BIGINT NOT NULL REFERENCES runs(id),
        client_id BIGINT NOT NULL,
        backend TEXT NOT NULL,
        token_hash TEXT,
        demo BOOLEAN NOT NULL,
        joined_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        left_at TIMESTAMPTZ
    );
    CREATE INDEX clients_by_token ON clients (run_id, token_hash);
    CREATE TABLE events (
        id BIGSERIAL PRIMARY KEY,
        run_id BIGINT NOT NULL REFERENCES runs(id),
        round BIGINT,
        kind TEXT NOT NULL,
        detail TEXT NOT NULL,
        at TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE TABLE leases (
        run TEXT PRIMARY KEY,
        term BIGINT NOT NULL,
        holder TEXT NOT NULL,
        holder_pid INTEGER NOT NULL,
        holder_started TIMESTAMPTZ,
        expires_at TIMESTAMPTZ NOT NULL
    );
    CREATE TABLE servers (
        run TEXT NOT NULL,
        name TEXT NOT NULL,
        role TEXT NOT NULL,
        term BIGINT,
        seen_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (run, name)
    );",
    // Gateways (`serve --gateway`) and the work the leader places on them
    // (`super::gateways`).
    "CREATE TABLE gateways (
        run TEXT NOT NULL,
        name TEXT NOT NULL,
        ready BIGINT NOT NULL,
        clients BIGINT NOT NULL,
        busy_round BIGINT,
        config TEXT NOT NULL DEFAULT '',
        seen_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (run, name)
    );
    CREATE TABLE gateway_work (
        run TEXT NOT NULL,
        round BIGINT NOT NULL,
        gateway TEXT NOT NULL,
        term BIGINT NOT NULL,
        model TEXT NOT NULL,
        participants BIGINT NOT NULL,
        state TEXT NOT NULL,
        partial TEXT,
        samples BIGINT,
        mediators BIGINT,
        failures BIGINT,
        detail TEXT,
        config TEXT NOT NULL DEFAULT '',
        hop_deadline_s DOUBLE PRECISION NOT NULL DEFAULT 60,
        updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (run, round, gateway)
    );
    CREATE SEQUENCE client_id_blocks;",
    // What a gateway's share cost (samples trained, bytes to and from its
    // clients), folded into the leader's round records.
    "ALTER TABLE gateway_work
        ADD COLUMN trained BIGINT NOT NULL DEFAULT 0,
        ADD COLUMN bytes_up BIGINT NOT NULL DEFAULT 0,
        ADD COLUMN bytes_down BIGINT NOT NULL DEFAULT 0;",
    // The run's demo slots, counted across its servers
    // (`RunStore::take_demo_slot`), and each demo client's.
    "CREATE TABLE demo_slots (
        run TEXT PRIMARY KEY,
        taken BIGINT NOT NULL
    );
    ALTER TABLE clients ADD COLUMN demo_slot BIGINT;",
    // The run's feed of clients resuming on its servers
    // (`RunStore::client_moved`), read by every server of the run.
    "CREATE TABLE client_moves (
        seq BIGSERIAL PRIMARY KEY,
        run TEXT NOT NULL,
        client_id BIGINT NOT NULL,
        server TEXT NOT NULL,
        at TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE INDEX client_moves_by_run ON client_moves (run, seq);
    CREATE INDEX client_moves_by_time ON client_moves (run, at);",
    // A gateway's clients' label counts (summed) while the run has no
    // augmentation plan, and whether it holds the plan: the leader plans
    // from every server's clients (`gateways::Heartbeat`). A gateway's
    // answer in a run that needs every result: each result's samples, and
    // its largest mediator (`gateways::Answer`).
    "ALTER TABLE gateways
        ADD COLUMN declared TEXT,
        ADD COLUMN planned BOOLEAN NOT NULL DEFAULT false;
    ALTER TABLE gateway_work
        ADD COLUMN each TEXT,
        ADD COLUMN largest BIGINT;",
    // The run's cap on an own-data client's word (`engine::declared`):
    // each gateway's clients' totals, counted, and the cap the leader
    // places with the work, so a liar alone on a gateway is held to the
    // run's median, not its own.
    "ALTER TABLE gateways ADD COLUMN totals TEXT;
    ALTER TABLE gateway_work ADD COLUMN cap BIGINT;",
];

/// The advisory lock (transaction-level) under which migrations run; the
/// leases take keys of their own ([`super::lease`]).
pub(crate) const MIGRATION_LOCK: i64 = 0x4153_5452_4145_4d47; // "ASTRAEMG"

/// Opens a connection to `url` named `name` (PostgreSQL's
/// `application_name`), with timeouts so a cut network is an error within
/// seconds rather than a hang (connect 5 s; unacknowledged data 10 s;
/// keepalives after 5 s idle), then runs `session` (its `SET`s).
pub(crate) fn open(url: &str, name: &str, session: &str) -> Result<Client, StoreError> {
    let mut config: postgres::Config = url.parse()?;
    config
        .application_name(name)
        .connect_timeout(Duration::from_secs(5))
        .tcp_user_timeout(Duration::from_secs(10))
        .keepalives_idle(Duration::from_secs(5));
    let mut client = config.connect(NoTls)?;
    client.batch_execute(session)?;
    Ok(client)
}

/// The store connection's session: a transaction left idle (its process
/// paused mid-write) is ended after 5 s, so it cannot hold a lock a new
/// leader waits for; no statement runs longer than a minute.
const STORE_SESSION: &str =
    "SET idle_in_transaction_session_timeout = '5s'; SET statement_timeout = '60s'";

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// The connection the store's thread owns.
struct Connection {
    url: String,
    client: Option<Client>,
}

impl Connection {
    /// The open connection, reopened if it was closed.
    fn client(&mut self) -> Result<&mut Client, StoreError> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = None;
            self.client = Some(open(&self.url, "astraea-store", STORE_SESSION)?);
        }
        Ok(self.client.as_mut().expect("just connected"))
    }

    /// Runs `job` on the connection; a panic is an error, not the end of
    /// the thread.
    fn run<R>(
        &mut self,
        job: &mut impl FnMut(&mut Client) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        std::panic::catch_unwind(AssertUnwindSafe(|| self.client().and_then(&mut *job)))
            .unwrap_or(Err(StoreError::Panicked))
    }
}

/// A run's store in PostgreSQL (see the module's documentation).
pub struct PgStore {
    jobs: mpsc::Sender<Job>,
    /// The run and the lease term the leader's writes are fenced by, and
    /// the lease's signal, raised when a write finds the term gone.
    fence: Option<(String, i64, super::lease::LostSignal)>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: never printed.
        f.debug_struct("PgStore")
            .field("fence", &self.fence)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects to `url` (`postgres://user:password@host:port/database`;
    /// plain TCP or a Unix socket, no TLS) and applies any migration not yet
    /// applied, under an advisory lock, so servers started at once migrate
    /// once.
    ///
    /// # Errors
    /// The URL does not parse, the database cannot be reached, or a
    /// migration failed (then none of it was applied).
    pub fn connect(url: &str) -> Result<Self, StoreError> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let url = url.to_string();
        let store = Self { jobs, fence: None };
        std::thread::Builder::new()
            .name("astraea-store".into())
            .spawn(move || {
                let mut connection = Connection { url, client: None };
                for job in queue {
                    job(&mut connection);
                }
            })
            .map_err(|source| StoreError::Io {
                path: "(the store's thread)".into(),
                source,
            })?;
        // Connects and migrates before answering, so a bad URL or an
        // unreachable database is an error of `connect`, not of the first
        // write.
        store.call(migrate)?;
        Ok(store)
    }

    /// From now on, every write commits only while the run's lease is
    /// still at `lease`'s term; a write that finds it gone is refused and
    /// marks `lease` lost at once.
    pub fn fence(&mut self, lease: &super::lease::Lease) {
        self.fence = Some((lease.run().to_string(), lease.term(), lease.signal()));
    }

    /// Runs `job` on the store's connection and waits for its answer. A
    /// job that finds the connection closed (the database restarted, the
    /// session cut) runs once more on a new one: every write is one
    /// transaction, so a failed one changed nothing.
    pub(super) fn call<R: Send + 'static>(
        &self,
        mut job: impl FnMut(&mut Client) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let (answer, answered) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |connection: &mut Connection| {
            let mut result = connection.run(&mut job);
            if matches!(&result, Err(StoreError::Postgres(e)) if e.is_closed()) {
                connection.client = None;
                result = connection.run(&mut job);
            }
            let _ = answer.send(result);
        });
        self.jobs.send(job).map_err(|_| StoreError::Closed)?;
        answered.recv().map_err(|_| StoreError::Closed)?
    }

    /// Like [`Self::call`], in one transaction that checks the fence last,
    /// just before it commits (so the lease row is held only for the
    /// commit, never while a checkpoint is written).
    pub(super) fn fenced<R: Send + 'static>(
        &self,
        mut job: impl FnMut(&mut postgres::Transaction<'_>) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let fence = self.fence.clone();
        self.call(move |client| {
            let mut tx = client.transaction()?;
            let result = job(&mut tx)?;
            if let Some((run, term, lost)) = &fence
                && let Err(refused) = check_fence(&mut tx, run, *term)
            {
                let _ = lost.send(true);
                return Err(refused);
            }
            tx.commit()?;
            Ok(result)
        })
    }

    /// Runs `sql` as it is (for tests that damage a stored row on purpose).
    #[doc(hidden)]
    pub fn execute_raw(&self, sql: &str) -> Result<(), StoreError> {
        let sql = sql.to_string();
        self.call(move |client| Ok(client.batch_execute(&sql)?))
    }
}

/// Refuses unless `run`'s lease is at `term`, holding the lease row until
/// the transaction ends so no new term can begin before it commits.
fn check_fence(tx: &mut impl GenericClient, run: &str, term: i64) -> Result<(), StoreError> {
    let current: Option<i64> = tx
        .query_opt("SELECT term FROM leases WHERE run = $1 FOR SHARE", &[&run])?
        .map(|row| row.get(0));
    match current {
        Some(current) if current == term => Ok(()),
        current => Err(StoreError::Fenced {
            term,
            current: current.unwrap_or(0),
        }),
    }
}

/// Applies what is missing of [`MIGRATIONS`] in one transaction under
/// [`MIGRATION_LOCK`] (released with it, whatever happens; PostgreSQL's
/// DDL is transactional, so a failed migration leaves the schema as it
/// was).
fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS astraea_schema (
            version INTEGER PRIMARY KEY,
            applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
        )",
    )?;
    let applied: i64 = tx
        .query_one("SELECT COUNT(*) FROM astraea_schema", &[])?
        .get(0);
    for (version, migration) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        tx.batch_execute(migration)?;
        tx.execute(
            "INSERT INTO astraea_schema (version) VALUES ($1)",
            &[&(version as i32 + 1)],
        )?;
    }
    tx.commit()?;
    Ok(())
}

/// The name a checkpoint is kept under: `sha256:` and its hash in hex.
pub fn blob_name(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl RunStore for PgStore {
    fn resume_or_create(
        &mut self,
        name: &str,
        config: &str,
        shapes: &[ParamShape],
    ) -> Result<Resumed, StoreError> {
        let (name, config) = (name.to_string(), config.to_string());
        let found = self.fenced(move |tx| {
            // Created if absent (a conditional write: of servers starting
            // at once one creates it, the others find it).
            tx.execute(
                "INSERT INTO runs (name, config) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                &[&name, &config],
            )?;
            let row = tx.query_one(
                "SELECT id, plan, finished FROM runs WHERE name = $1",
                &[&name],
            )?;
            if row.get::<_, bool>(2) {
                // Shared by several servers, a finished run is never begun
                // again by whichever waited longest: a new run takes a new
                // name.
                return Err(StoreError::Finished { name: name.clone() });
            }
            Ok((row.get::<_, i64>(0), row.get::<_, Option<String>>(1)))
        })?;
        let (run_id, plan) = found;
        let (rounds, mut mediators, last_client_id) = self.call(move |client| {
            let rounds = client
                .query(
                    "SELECT round, accuracy, loss, bytes_up, bytes_down, mean_kl, wall_s, skipped_hops, checkpoint,
                            guard, accountant, epsilon, model_clip, train_samples, train_s, hops
                     FROM rounds WHERE run_id = $1 ORDER BY round",
                    &[&run_id],
                )?
                .into_iter()
                .map(|row| StoredRound {
                    record: RoundRecord {
                        round: row.get::<_, i64>(0).max(0) as usize,
                        accuracy: row.get(1),
                        loss: row.get(2),
                        bytes_up: row.get::<_, i64>(3).max(0) as u64,
                        bytes_down: row.get::<_, i64>(4).max(0) as u64,
                        mean_kl: row.get(5),
                        wall_s: row.get(6),
                        train_samples: row.get::<_, i64>(13).max(0) as u64,
                        train_s: row.get(14),
                        clock_s: row.get(6),
                        epsilon: row.get(11),
                        mediators: Vec::new(),
                        hops: row
                            .get::<_, Option<String>>(15)
                            .and_then(|text| serde_json::from_str(&text).ok())
                            .unwrap_or_default(),
                    },
                    skipped: row.get::<_, i64>(7).max(0) as u64,
                    checkpoint: row.get(8),
                    guard: row.get(9),
                    accountant: row.get(10),
                    model_clip: row.get(12),
                })
                .collect::<Vec<_>>();
            let mut mediators: HashMap<usize, Vec<Vec<u64>>> = HashMap::new();
            for row in client.query(
                "SELECT round, members FROM mediators WHERE run_id = $1 ORDER BY round, mediator",
                &[&run_id],
            )? {
                // Ids the server wrote itself; an unreadable row is left out.
                if let Ok(ids) = serde_json::from_str(row.get::<_, &str>(1)) {
                    mediators
                        .entry(row.get::<_, i64>(0).max(0) as usize)
                        .or_default()
                        .push(ids);
                }
            }
            // The leaders' ids only: gateways record their clients too, in
            // blocks of their own, which a leader must never give again.
            let leaders_below = 1i64 << super::gateways::BLOCK_BITS;
            let last_client_id: i64 = client
                .query_one(
                    "SELECT COALESCE(MAX(client_id), 0)::BIGINT FROM clients
                     WHERE run_id = $1 AND client_id < $2",
                    &[&run_id, &leaders_below],
                )?
                .get(0);
            Ok((rounds, mediators, last_client_id.max(0) as u64))
        })?;
        assemble(
            (run_id, last_client_id),
            plan,
            rounds,
            |round| Ok(mediators.remove(&round).unwrap_or_default()),
            |hash| {
                let hash = hash.to_string();
                self.call(move |client| {
                    let row =
                        client.query_opt("SELECT bytes FROM blobs WHERE hash = $1", &[&hash])?;
                    row.map(|row| row.get::<_, Vec<u8>>(0))
                        .ok_or_else(|| StoreError::Checkpoint {
                            name: hash.clone(),
                            reason: "no such blob".into(),
                        })
                })
            },
            shapes,
        )
    }

    fn save_plan(&mut self, run_id: i64, ratios: &[f64]) -> Result<(), StoreError> {
        let plan = serde_json::to_string(ratios).expect("numbers serialise");
        self.fenced(move |tx| {
            tx.execute("UPDATE runs SET plan = $2 WHERE id = $1", &[&run_id, &plan])?;
            Ok(())
        })
    }

    fn save_round(
        &mut self,
        run_id: i64,
        record: &RoundRecord,
        kept: &RoundState<'_>,
    ) -> Result<(), StoreError> {
        let checkpoint = kept.checkpoint.to_vec();
        let hash = blob_name(&checkpoint);
        let round = to_i64(record.round as u64);
        let values = (
            record.accuracy,
            record.loss,
            to_i64(record.bytes_up),
            to_i64(record.bytes_down),
            record.mean_kl,
            record.wall_s,
            to_i64(kept.skipped_hops),
            serde_json::to_string(kept.guard).expect("numbers serialise"),
            kept.accountant.map(|a| a.to_json()),
            record.epsilon,
            kept.model_clip,
            to_i64(record.train_samples),
            record.train_s,
            serde_json::to_string(&record.hops).expect("counts serialise"),
        );
        let mediators: Vec<(String, f64)> = kept
            .mediators
            .iter()
            .map(|m| {
                (
                    serde_json::to_string(&m.members).expect("ids serialise"),
                    m.kl,
                )
            })
            .collect();
        let term = self.fence.as_ref().map(|(_, term, _)| *term);
        let last = kept.last;
        self.fenced(move |tx| {
            tx.execute(
                "INSERT INTO blobs (hash, bytes) VALUES ($1, $2) ON CONFLICT (hash) DO NOTHING",
                &[&hash, &checkpoint],
            )?;
            let (accuracy, loss, up, down, kl, wall, skipped, guard, accountant, epsilon, clip, samples, train_s, hops) =
                &values;
            tx.execute(
                "INSERT INTO rounds
                 (run_id, round, accuracy, loss, bytes_up, bytes_down, mean_kl, wall_s, skipped_hops, checkpoint,
                  guard, accountant, epsilon, model_clip, train_samples, train_s, hops, term)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)
                 ON CONFLICT (run_id, round) DO UPDATE SET
                   accuracy = EXCLUDED.accuracy, loss = EXCLUDED.loss, bytes_up = EXCLUDED.bytes_up,
                   bytes_down = EXCLUDED.bytes_down, mean_kl = EXCLUDED.mean_kl, wall_s = EXCLUDED.wall_s,
                   skipped_hops = EXCLUDED.skipped_hops, checkpoint = EXCLUDED.checkpoint, guard = EXCLUDED.guard,
                   accountant = EXCLUDED.accountant, epsilon = EXCLUDED.epsilon, model_clip = EXCLUDED.model_clip,
                   train_samples = EXCLUDED.train_samples, train_s = EXCLUDED.train_s, hops = EXCLUDED.hops,
                   term = EXCLUDED.term, finished_at = now()",
                &[
                    &run_id, &round, &accuracy, &loss, &up, &down, &kl, &wall, &skipped, &hash, &guard,
                    &accountant, &epsilon, &clip, &samples, &train_s, &hops, &term,
                ],
            )?;
            tx.execute(
                "DELETE FROM mediators WHERE run_id = $1 AND round = $2",
                &[&run_id, &round],
            )?;
            for (index, (members, kl)) in mediators.iter().enumerate() {
                tx.execute(
                    "INSERT INTO mediators (run_id, round, mediator, members, kl) VALUES ($1, $2, $3, $4, $5)",
                    &[&run_id, &round, &(index as i64), members, kl],
                )?;
            }
            if last {
                tx.execute("UPDATE runs SET finished = true WHERE id = $1", &[&run_id])?;
            }
            // The gateways that trained it tell their clients.
            super::listen::notify_run_id(tx, run_id)?;
            Ok(())
        })
    }

    fn finish(&mut self, run_id: i64) -> Result<(), StoreError> {
        self.fenced(move |tx| {
            tx.execute("UPDATE runs SET finished = true WHERE id = $1", &[&run_id])?;
            super::listen::notify_run_id(tx, run_id)?;
            Ok(())
        })
    }

    fn event(
        &mut self,
        run_id: i64,
        round: Option<u32>,
        kind: &str,
        detail: &str,
    ) -> Result<(), StoreError> {
        let (kind, detail) = (kind.to_string(), detail.to_string());
        let round = round.map(i64::from);
        self.fenced(move |tx| {
            tx.execute(
                "INSERT INTO events (run_id, round, kind, detail) VALUES ($1, $2, $3, $4)",
                &[&run_id, &round, &kind, &detail],
            )?;
            Ok(())
        })
    }

    fn client_joined(&mut self, run_id: i64, client: &Joined<'_>) -> Result<(), StoreError> {
        let (id, backend) = (to_i64(client.id), client.backend.to_string());
        let (demo, slot) = (client.demo.is_some(), client.demo.map(to_i64));
        let hash = token_hash(client.token);
        self.fenced(move |tx| {
            tx.execute(
                "INSERT INTO clients (run_id, client_id, backend, token_hash, demo, demo_slot)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[&run_id, &id, &backend, &hash, &demo, &slot],
            )?;
            Ok(())
        })
    }

    fn forget_token(&mut self, run_id: i64, client_id: u64) -> Result<(), StoreError> {
        let id = to_i64(client_id);
        self.fenced(move |tx| {
            tx.execute(
                "UPDATE clients SET token_hash = NULL WHERE run_id = $1 AND client_id = $2",
                &[&run_id, &id],
            )?;
            Ok(())
        })
    }

    fn client_by_token(
        &mut self,
        run_id: i64,
        token: &str,
    ) -> Result<Option<(u64, Option<u64>)>, StoreError> {
        let hash = token_hash(token);
        self.call(move |client| {
            Ok(client
                .query_opt(
                    "SELECT client_id, demo, demo_slot FROM clients
                     WHERE run_id = $1 AND token_hash = $2
                     ORDER BY joined_at DESC LIMIT 1",
                    &[&run_id, &hash],
                )?
                .map(|row| {
                    let id = row.get::<_, i64>(0).max(0) as u64;
                    // A row from before the slots were counted: its id.
                    let slot = row.get::<_, Option<i64>>(2).map_or(id, |s| s.max(1) as u64);
                    (id, row.get::<_, bool>(1).then_some(slot))
                }))
        })
    }

    fn client_moved(
        &mut self,
        run_name: &str,
        client_id: u64,
        server: &str,
    ) -> Result<Option<u64>, StoreError> {
        let (run, id, server) = (run_name.to_string(), to_i64(client_id), server.to_string());
        self.call(move |client| {
            let seq: i64 = client
                .query_one(
                    "INSERT INTO client_moves (run, client_id, server) VALUES ($1, $2, $3)
                     RETURNING seq",
                    &[&run, &id, &server],
                )?
                .get(0);
            Ok(Some(seq.max(0) as u64))
        })
    }

    fn moves_since(
        &mut self,
        run_name: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<Move>, u64), StoreError> {
        let run = run_name.to_string();
        self.call(move |client| {
            let Some(after) = after else {
                let last: i64 = client
                    .query_one(
                        "SELECT COALESCE(MAX(seq), 0) FROM client_moves WHERE run = $1",
                        &[&run],
                    )?
                    .get(0);
                return Ok((Vec::new(), last.max(0) as u64));
            };
            let (after, limit) = (to_i64(after), limit.min(i64::MAX as usize) as i64);
            let overlap = super::MOVES_OVERLAP.as_secs_f64();
            let as_move = |row: &postgres::Row| Move {
                seq: row.get::<_, i64>(0).max(0) as u64,
                client_id: row.get::<_, i64>(1).max(0) as u64,
                server: row.get(2),
            };
            // The new moves, a page of them; then the late ones: numbered
            // at or before `after` but written in the overlap (the latest
            // page of them).
            let new: Vec<Move> = client
                .query(
                    "SELECT seq, client_id, server FROM client_moves
                     WHERE run = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                    &[&run, &after, &limit],
                )?
                .iter()
                .map(as_move)
                .collect();
            let mut late: Vec<Move> = client
                .query(
                    "SELECT seq, client_id, server FROM client_moves
                     WHERE run = $1 AND seq <= $2 AND at > now() - make_interval(secs => $4)
                     ORDER BY seq DESC LIMIT $3",
                    &[&run, &after, &limit, &overlap],
                )?
                .iter()
                .map(as_move)
                .collect();
            late.reverse();
            let last = new.last().map_or(after.max(0) as u64, |m| m.seq);
            late.extend(new);
            Ok((late, last))
        })
    }

    fn prune_moves(
        &mut self,
        run_name: &str,
        kept: std::time::Duration,
    ) -> Result<u64, StoreError> {
        let (run, kept) = (run_name.to_string(), kept.as_secs_f64());
        self.call(move |client| {
            Ok(client.execute(
                "DELETE FROM client_moves WHERE run = $1 AND at < now() - make_interval(secs => $2)",
                &[&run, &kept],
            )?)
        })
    }

    fn take_demo_slot(&mut self, run_name: &str) -> Result<Option<u64>, StoreError> {
        // One statement, a conditional write: two servers taking slots at
        // once each get their own (never a read, then a write).
        let run = run_name.to_string();
        self.call(move |client| {
            let taken: i64 = client
                .query_one(
                    "INSERT INTO demo_slots (run, taken) VALUES ($1, 1)
                     ON CONFLICT (run) DO UPDATE SET taken = demo_slots.taken + 1
                     RETURNING taken",
                    &[&run],
                )?
                .get(0);
            Ok(Some(taken.max(1) as u64))
        })
    }

    fn count(&mut self, table: &str, run_id: i64) -> Result<i64, StoreError> {
        assert!(COUNTED.contains(&table), "unknown table {table}");
        let sql = format!("SELECT COUNT(*) FROM {table} WHERE run_id = $1");
        self.call(move |client| Ok(client.query_one(&sql, &[&run_id])?.get(0)))
    }

    fn events(
        &mut self,
        run_id: i64,
        kind: &str,
    ) -> Result<Vec<(Option<u32>, String)>, StoreError> {
        let kind = kind.to_string();
        self.call(move |client| {
            Ok(client
                .query(
                    "SELECT round, detail FROM events WHERE run_id = $1 AND kind = $2 ORDER BY id",
                    &[&run_id, &kind],
                )?
                .into_iter()
                .map(|row| {
                    (
                        row.get::<_, Option<i64>>(0)
                            .and_then(|r| u32::try_from(r).ok()),
                        row.get(1),
                    )
                })
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::contract::{self, bare, record, weights};
    use super::super::lease::{Holder, Lease, LeaseSettings};
    use super::*;
    use crate::testing::PgCluster;
    use std::time::{Duration, Instant};

    fn cluster() -> (PgCluster, String) {
        PgCluster::with_database()
    }

    #[test]
    fn a_reopened_store_resumes_the_unfinished_run_from_its_last_round() {
        let (_cluster, url) = cluster();
        contract::a_reopened_store_resumes_the_unfinished_run_from_its_last_round(&|| {
            Box::new(PgStore::connect(&url).unwrap())
        });
    }

    #[test]
    fn a_client_is_found_by_its_token() {
        let (_cluster, url) = cluster();
        contract::a_client_is_found_by_its_token(&|| Box::new(PgStore::connect(&url).unwrap()));
    }

    #[test]
    fn a_new_leader_gives_ids_after_the_leaders_not_in_a_gateways_block() {
        // The bug: a leader resumed its ids after the largest recorded,
        // a gateway's (`block << 32 | n`), and gave that gateway's next
        // ids to other volunteers.
        let (_cluster, url) = cluster();
        let weights = weights();
        let mut store = PgStore::connect(&url).unwrap();
        let run = store
            .resume_or_create("ids", "{}", &weights.shapes)
            .unwrap();
        let gateways_first = 1u64 << super::super::gateways::BLOCK_BITS;
        for (id, token) in [(3, "a".repeat(32)), (gateways_first | 5, "b".repeat(32))] {
            let joined = Joined {
                id,
                backend: "flex",
                demo: Some(id),
                token: &token,
            };
            store.client_joined(run.run_id, &joined).unwrap();
        }

        let resumed = store
            .resume_or_create("ids", "{}", &weights.shapes)
            .unwrap();

        assert_eq!(resumed.last_client_id, 3);
        // The gateway's client still resumes by its token.
        assert_eq!(
            store.client_by_token(run.run_id, &"b".repeat(32)).unwrap(),
            Some((gateways_first | 5, Some(gateways_first | 5)))
        );
    }

    #[test]
    fn demo_slots_are_taken_in_turn_by_every_server_of_a_run() {
        // Two servers' stores taking slots at once: each slot once, none
        // skipped; another run counts its own; a client's recorded slot is
        // what its token finds, on the other server too.
        let (_cluster, url) = cluster();
        let weights = weights();
        let mut a = PgStore::connect(&url).unwrap();
        let mut b = PgStore::connect(&url).unwrap();
        let run = a.resume_or_create("slots", "{}", &weights.shapes).unwrap();

        let mut taken: Vec<u64> = std::thread::scope(|scope| {
            let takers: Vec<_> = [&mut a, &mut b]
                .map(|store| {
                    scope.spawn(move || {
                        (0..50)
                            .map(|_| store.take_demo_slot("slots").unwrap().unwrap())
                            .collect::<Vec<u64>>()
                    })
                })
                .into_iter()
                .collect();
            takers.into_iter().flat_map(|t| t.join().unwrap()).collect()
        });
        taken.sort_unstable();
        let other = a.take_demo_slot("other").unwrap();
        let gateways_first = 1u64 << super::super::gateways::BLOCK_BITS;
        let joined = Joined {
            id: gateways_first | 1,
            backend: "flex",
            demo: Some(2),
            token: &"d".repeat(32),
        };
        a.client_joined(run.run_id, &joined).unwrap();

        assert_eq!(taken, (1..=100).collect::<Vec<u64>>());
        assert_eq!(other, Some(1));
        assert_eq!(
            b.client_by_token(run.run_id, &"d".repeat(32)).unwrap(),
            Some((gateways_first | 1, Some(2)))
        );
    }

    /// The new moves of a read of the feed (numbered after `after`).
    fn new_of(read: &(Vec<Move>, u64), after: u64) -> Vec<(u64, u64, String)> {
        read.0
            .iter()
            .filter(|m| m.seq > after)
            .map(|m| (m.seq, m.client_id, m.server.clone()))
            .collect()
    }

    #[test]
    fn every_server_of_a_run_reads_its_moves_in_order_from_where_it_stood() {
        // A server starts reading where the feed stands, then gets each
        // later move as new once, in order, from any server, only its
        // run's, in pages of `limit`; the moves of the overlap come again
        // as late ones (numbered at or before where it stood).
        let (_cluster, url) = cluster();
        let mut a = PgStore::connect(&url).unwrap();
        let mut b = PgStore::connect(&url).unwrap();
        let before = a.client_moved("run", 1, "a").unwrap().unwrap();
        let (nothing, stood) = b.moves_since("run", None, 10).unwrap();
        let seqs: Vec<u64> = [(2, "a"), (3, "b"), (2, "b")]
            .iter()
            .map(|&(id, server)| a.client_moved("run", id, server).unwrap().unwrap())
            .collect();
        a.client_moved("another run", 2, "a").unwrap();
        let first = b.moves_since("run", Some(stood), 2).unwrap();
        let rest = b.moves_since("run", Some(first.1), 2).unwrap();
        let after_all = b.moves_since("run", Some(rest.1), 2).unwrap();

        assert!(nothing.is_empty());
        assert_eq!(stood, before);
        let mut new = new_of(&first, stood);
        new.extend(new_of(&rest, first.1));
        let expected = [(2, "a"), (3, "b"), (2, "b")]
            .iter()
            .zip(&seqs)
            .map(|(&(id, server), &seq)| (seq, id, server.to_string()))
            .collect::<Vec<_>>();
        assert_eq!(new, expected);
        assert_eq!((first.1, rest.1, after_all.1), (seqs[1], seqs[2], seqs[2]));
        assert!(new_of(&after_all, rest.1).is_empty());
        // Late: the move from before it stood, within the overlap.
        assert!(first.0.iter().any(|m| m.seq == before && m.client_id == 1));
        for read in [&first, &rest, &after_all] {
            assert!(read.0.iter().all(|m| m.server == "a" || m.server == "b"));
            assert!(
                read.0
                    .iter()
                    .all(|m| m.client_id != 2 || m.server != "a" || m.seq == seqs[0])
            );
        }
    }

    #[test]
    fn the_feed_of_moves_forgets_only_what_is_older_than_it_keeps() {
        let (_cluster, url) = cluster();
        let mut store = PgStore::connect(&url).unwrap();
        let old = store.client_moved("run", 1, "a").unwrap().unwrap();
        let other_run = store.client_moved("another run", 1, "a").unwrap().unwrap();
        let recent = store.client_moved("run", 2, "a").unwrap().unwrap();
        let mut admin = postgres::Client::connect(&url, NoTls).unwrap();
        admin
            .execute(
                "UPDATE client_moves SET at = now() - interval '1 hour' WHERE seq = ANY($1)",
                &[&vec![old as i64, other_run as i64]],
            )
            .unwrap();

        let pruned = store.prune_moves("run", super::super::MOVES_KEPT).unwrap();
        let left: Vec<i64> = admin
            .query("SELECT seq FROM client_moves ORDER BY seq", &[])
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();

        assert_eq!(pruned, 1);
        assert_eq!(left, vec![other_run as i64, recent as i64]);
    }

    #[test]
    fn a_move_committed_after_a_later_one_is_still_read() {
        // The race: move numbers are given when a row is written, not when
        // it commits. A move held in an open transaction takes a number,
        // a later move commits and is read, then the first commits: the
        // next read still brings it (as a late one), not never.
        let (_cluster, url) = cluster();
        let mut reader = PgStore::connect(&url).unwrap();
        let mut writer = PgStore::connect(&url).unwrap();
        let (_, stood) = reader.moves_since("run", None, 10).unwrap();
        let mut slow = postgres::Client::connect(&url, NoTls).unwrap();
        let mut held = slow.transaction().unwrap();
        let early: i64 = held
            .query_one(
                "INSERT INTO client_moves (run, client_id, server) VALUES ('run', 7, 'slow')
                 RETURNING seq",
                &[],
            )
            .unwrap()
            .get(0);
        let later = writer.client_moved("run", 8, "fast").unwrap().unwrap();
        let seen = reader.moves_since("run", Some(stood), 10).unwrap();
        held.commit().unwrap();
        let next = reader.moves_since("run", Some(seen.1), 10).unwrap();

        assert!(later > early as u64);
        assert_eq!(seen.1, later);
        assert!(seen.0.iter().all(|m| m.client_id != 7), "not committed yet");
        assert!(
            next.0
                .iter()
                .any(|m| m.client_id == 7 && m.seq == early as u64),
            "the early move, committed late, was never read: {next:?}"
        );
    }

    #[test]
    fn a_finished_run_is_not_begun_again_under_its_name() {
        // The bug: a server that waited for the lease while the leader
        // finished took it over, found no unfinished run, and began the
        // finished one again, deleting its rounds.
        let (_cluster, url) = cluster();
        let weights = weights();
        let checkpoint = weights.to_safetensors();
        let mut store = PgStore::connect(&url).unwrap();
        let run = store
            .resume_or_create("done", "{}", &weights.shapes)
            .unwrap();
        store
            .save_round(run.run_id, &record(1, 0.3), &bare(&checkpoint, None))
            .unwrap();
        store.finish(run.run_id).unwrap();

        let again = store.resume_or_create("done", "{}", &weights.shapes);

        assert!(
            matches!(&again, Err(StoreError::Finished { name }) if name == "done"),
            "{again:?}"
        );
        assert_eq!(store.count("rounds", run.run_id).unwrap(), 1);
        let other = store
            .resume_or_create("next", "{}", &weights.shapes)
            .unwrap();
        assert!(other.history.is_empty() && other.run_id != run.run_id);

        // Finished by saving its last round, without `finish`: the run is
        // marked finished in the round's own transaction (a leader that
        // dies between the two has finished it all the same, and a
        // gateway reading the round reads that it was the last).
        let ended = store
            .resume_or_create("ended", "{}", &weights.shapes)
            .unwrap();
        let last = RoundState {
            last: true,
            ..bare(&checkpoint, None)
        };
        store
            .save_round(ended.run_id, &record(1, 0.3), &last)
            .unwrap();
        let again = store.resume_or_create("ended", "{}", &weights.shapes);
        assert!(
            matches!(&again, Err(StoreError::Finished { name }) if name == "ended"),
            "{again:?}"
        );
    }

    #[test]
    fn a_write_that_finds_another_term_marks_the_lease_lost_at_once() {
        // Prepare: a lease renewed every 10 s, its store fenced by it; then
        // another term begins (as a takeover would) before any renewal.
        let (_cluster, url) = cluster();
        let weights = weights();
        drop(PgStore::connect(&url).unwrap());
        let slow = LeaseSettings {
            ttl: Duration::from_secs(30),
            poll: Duration::from_millis(50),
        };
        let lease = Lease::acquire(&url, "run", "a", slow, |_| {}).unwrap();
        let mut store = PgStore::connect(&url).unwrap();
        store.fence(&lease);
        let run = store
            .resume_or_create("run", "{}", &weights.shapes)
            .unwrap();
        store
            .execute_raw("UPDATE leases SET term = term + 1 WHERE run = 'run'")
            .unwrap();
        assert!(!lease.is_lost());

        // Execute
        let refused = store.event(run.run_id, None, "late", "from an ex-leader");

        // Assert: refused, nothing written, and the lease knows.
        assert!(
            matches!(
                refused,
                Err(StoreError::Fenced {
                    term: 1,
                    current: 2
                })
            ),
            "{refused:?}"
        );
        assert!(lease.is_lost());
        store.fence = None;
        assert_eq!(store.count("events", run.run_id).unwrap(), 0);
    }

    #[test]
    fn a_leader_paused_mid_write_delays_the_takeover_but_does_not_block_it() {
        // Prepare: a leader paused inside its last write's transaction,
        // holding the lease row (its store session, as the store opens it),
        // its lease session also paused and expired after 1 s.
        let (_cluster, url) = cluster();
        drop(PgStore::connect(&url).unwrap());
        let _lease_session = paused_leader(&url); // held: the session keeps the lock
        let mut store_session = open(&url, "astraea-store", STORE_SESSION).unwrap();
        store_session
            .batch_execute("BEGIN; SELECT term FROM leases WHERE run = 'run' FOR SHARE;")
            .unwrap();

        // Execute
        let started = Instant::now();
        let leader = Lease::acquire(&url, "run", "b", fast(), |_| {}).unwrap();

        // Assert: taken over once the idle transaction was ended (5 s).
        assert_eq!(leader.term(), 2);
        let waited = started.elapsed();
        assert!(waited < Duration::from_secs(9), "{waited:?}");
        assert!(store_session.execute("SELECT 1", &[]).is_err());
    }

    #[test]
    fn a_damaged_clip_is_dropped_and_a_damaged_accountant_stops_the_resume() {
        // Prepare: a private run's round, with a clip and an accountant.
        let (_cluster, url) = cluster();
        let weights = weights();
        let mut store = PgStore::connect(&url).unwrap();
        let run = store.resume_or_create("dp", "{}", &weights.shapes).unwrap();
        let mut spent = astraea_core::privacy::RdpAccountant::new();
        spent.compose(1.0, 2.0, 1);
        let checkpoint = weights.to_safetensors();
        let kept = RoundState {
            accountant: Some(&spent),
            ..bare(&checkpoint, Some(0.31))
        };
        store
            .save_round(run.run_id, &record(1, 0.3), &kept)
            .unwrap();
        let resumed = store.resume_or_create("dp", "{}", &weights.shapes).unwrap();
        assert_eq!(resumed.model_clip, Some(0.31));
        assert_eq!(resumed.accountant.as_ref(), Some(&spent));

        // Execute and assert: a clip that is not a finite positive number
        // is dropped (PostgreSQL's doubles hold NaN and infinities too)...
        for damaged in ["0", "-1", "'NaN'", "'Infinity'"] {
            store
                .execute_raw(&format!("UPDATE rounds SET model_clip = {damaged}"))
                .unwrap();
            let resumed = store.resume_or_create("dp", "{}", &weights.shapes).unwrap();
            assert_eq!(resumed.model_clip, None, "{damaged}");
        }
        // ...but an accountant that does not read back stops the resume.
        store
            .execute_raw("UPDATE rounds SET accountant = '{\"orders\":[2]}'")
            .unwrap();
        let resumed = store.resume_or_create("dp", "{}", &weights.shapes);
        assert!(
            matches!(resumed, Err(StoreError::Accountant { round: 1 })),
            "{resumed:?}"
        );
    }

    #[test]
    fn checkpoints_are_kept_once_by_their_hash_and_a_missing_one_stops_the_resume() {
        // Prepare: three rounds, the first and third with the same model.
        let (_cluster, url) = cluster();
        let (first, second) = (weights(), weights());
        let mut store = PgStore::connect(&url).unwrap();
        let run = store
            .resume_or_create("blobs", "{}", &first.shapes)
            .unwrap();
        let (a, b) = (first.to_safetensors(), second.to_safetensors());
        for (round, bytes) in [(1, &a), (2, &b), (3, &a)] {
            store
                .save_round(run.run_id, &record(round, 0.1), &bare(bytes, None))
                .unwrap();
        }

        // Execute
        let resumed = store
            .resume_or_create("blobs", "{}", &first.shapes)
            .unwrap();

        // Assert: two blobs, each under its own bytes' hash; the third
        // round resumes the first round's model.
        assert_eq!(resumed.weights.as_ref(), Some(&first));
        let check = store.call(|client| {
            let rows = client.query("SELECT hash, bytes FROM blobs ORDER BY hash", &[])?;
            Ok(rows
                .iter()
                .map(|r| (r.get::<_, String>(0), blob_name(&r.get::<_, Vec<u8>>(1))))
                .collect::<Vec<_>>())
        });
        let blobs = check.unwrap();
        assert_eq!(blobs.len(), 2, "{blobs:?}");
        assert!(blobs.iter().all(|(hash, of_bytes)| hash == of_bytes));
        // A round naming a blob that is not there cannot be written...
        let dangling = store.execute_raw(&format!(
            "UPDATE rounds SET checkpoint = 'sha256:00' WHERE run_id = {}",
            run.run_id
        ));
        assert!(dangling.is_err(), "the foreign key must refuse it");
    }

    #[test]
    fn servers_started_at_once_migrate_once() {
        let (_cluster, url) = cluster();
        let opened: Vec<_> = (0..6)
            .map(|_| {
                let url = url.clone();
                std::thread::spawn(move || PgStore::connect(&url).map(|_| ()))
            })
            .collect();
        for store in opened {
            store.join().unwrap().unwrap();
        }
        let store = PgStore::connect(&url).unwrap();
        let versions = store
            .call(|client| {
                Ok(client
                    .query("SELECT version FROM astraea_schema ORDER BY version", &[])?
                    .iter()
                    .map(|r| r.get::<_, i32>(0))
                    .collect::<Vec<_>>())
            })
            .unwrap();
        assert_eq!(versions, (1..=MIGRATIONS.len() as i32).collect::<Vec<_>>());
    }

    /// Waits (polling) until `done`, for at most `within`.
    fn eventually(within: Duration, what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + within;
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn fast() -> LeaseSettings {
        LeaseSettings {
            ttl: Duration::from_millis(900),
            poll: Duration::from_millis(50),
        }
    }

    /// Runs `acquire` on a thread; answers when it has the lease.
    fn would_be_leader(url: &str, name: &str) -> std::thread::JoinHandle<Lease> {
        let (url, name) = (url.to_string(), name.to_string());
        std::thread::spawn(move || Lease::acquire(&url, "run", &name, fast(), |_| {}).unwrap())
    }

    #[test]
    fn when_the_leaders_session_is_cut_the_follower_leads_and_the_ex_leader_writes_nothing() {
        // Prepare: a leader (term 1) with a fenced store, and a follower.
        let (_cluster, url) = cluster();
        let weights = weights();
        let checkpoint = weights.to_safetensors();
        let mut old_store = PgStore::connect(&url).unwrap();
        let leader = Lease::acquire(&url, "run", "a", fast(), |_| {}).unwrap();
        assert_eq!(leader.term(), 1);
        old_store.fence(&leader);
        let run = old_store
            .resume_or_create("run", "{}", &weights.shapes)
            .unwrap();
        old_store
            .save_round(run.run_id, &record(1, 0.2), &bare(&checkpoint, None))
            .unwrap();
        let follower = would_be_leader(&url, "b");
        std::thread::sleep(Duration::from_millis(300));
        assert!(!follower.is_finished(), "two leaders at once");

        // Execute: cut the leader's lease session, as a crash would.
        let mut admin = postgres::Client::connect(&url, NoTls).unwrap();
        admin
            .execute(
                "SELECT pg_terminate_backend(holder_pid) FROM leases WHERE run = 'run'",
                &[],
            )
            .unwrap();
        let started = Instant::now();
        let new_leader = follower.join().unwrap();

        // Assert: the follower leads at term 2 within a poll or two; the
        // old leader learns it lost the lease; its writes are refused and
        // change nothing, the new leader's go through.
        assert_eq!(new_leader.term(), 2);
        assert!(started.elapsed() < Duration::from_secs(2));
        eventually(Duration::from_secs(3), "the old leader to notice", || {
            leader.is_lost()
        });
        let refused = old_store.save_round(run.run_id, &record(2, 0.9), &bare(&checkpoint, None));
        assert!(
            matches!(
                refused,
                Err(StoreError::Fenced {
                    term: 1,
                    current: 2
                })
            ),
            "{refused:?}"
        );
        assert!(matches!(
            old_store.finish(run.run_id),
            Err(StoreError::Fenced { .. })
        ));
        let mut new_store = PgStore::connect(&url).unwrap();
        new_store.fence(&new_leader);
        let resumed = new_store
            .resume_or_create("run", "{}", &weights.shapes)
            .unwrap();
        assert_eq!(
            resumed.run_id, run.run_id,
            "the new leader goes on with the same run"
        );
        let saved = RoundRecord {
            mediators: vec![],
            ..record(1, 0.2)
        };
        assert_eq!(resumed.history, vec![saved]);
        new_store
            .save_round(run.run_id, &record(2, 0.4), &bare(&checkpoint, None))
            .unwrap();
        assert_eq!(new_store.count("rounds", run.run_id).unwrap(), 2);
    }

    /// A "paused" leader of run `run`, as the database sees one: a session
    /// that took the lock and the lease (term 1, expiring in 1 s) and then
    /// says nothing.
    fn paused_leader(url: &str) -> postgres::Client {
        let mut paused = postgres::Client::connect(url, NoTls).unwrap();
        paused
            .batch_execute(&format!(
                "SELECT pg_advisory_lock({});
                 INSERT INTO leases (run, term, holder, holder_pid, holder_started, expires_at)
                 SELECT 'run', 1, 'paused', pid, backend_start, now() + interval '1 second'
                   FROM pg_stat_activity WHERE pid = pg_backend_pid();",
                super::super::lease::lease_key("run")
            ))
            .unwrap();
        paused
    }

    #[test]
    fn a_paused_leader_is_cut_off_once_its_lease_expires_and_only_then() {
        // Prepare: a "paused" leader, as the database sees one: a session
        // that took the lock and the lease (term 1) and then says nothing.
        let (_cluster, url) = cluster();
        drop(PgStore::connect(&url).unwrap());
        let mut paused = paused_leader(&url);
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Holder>::new()));

        // Execute
        let started = Instant::now();
        let leader = {
            let seen = seen.clone();
            Lease::acquire(&url, "run", "b", fast(), move |h| {
                seen.lock().unwrap().push(h.clone())
            })
            .unwrap()
        };

        // Assert: not before the paused lease expired (1 s), soon after;
        // the waiting follower saw who held it; the paused session is gone,
        // so when it wakes nothing it sends goes through.
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(900), "{waited:?}");
        assert!(waited < Duration::from_secs(3), "{waited:?}");
        assert_eq!(leader.term(), 2);
        assert!(
            seen.lock()
                .unwrap()
                .iter()
                .any(|h| h.name == "paused" && h.term == 1)
        );
        assert!(paused.execute("SELECT 1", &[]).is_err());
    }

    #[test]
    fn the_leader_lists_the_servers_of_its_run_with_their_roles() {
        let (_cluster, url) = cluster();
        drop(PgStore::connect(&url).unwrap());
        let leader = Lease::acquire(&url, "run", "a", fast(), |_| {}).unwrap();
        let follower = would_be_leader(&url, "b");
        eventually(Duration::from_secs(5), "both servers listed", || {
            leader.servers().len() == 2
        });
        let servers = leader.servers();
        assert_eq!(
            servers
                .iter()
                .map(|s| (s.name.as_str(), s.role.as_str(), s.term))
                .collect::<Vec<_>>(),
            vec![("a", "leading", Some(1)), ("b", "following", None)]
        );
        assert!(servers.iter().all(|s| s.seen_s_ago < 2.0), "{servers:?}");
        drop(leader);
        assert_eq!(follower.join().unwrap().term(), 2);
    }

    #[test]
    fn a_released_lease_goes_to_the_next_follower_at_once() {
        let (_cluster, url) = cluster();
        drop(PgStore::connect(&url).unwrap());
        let first = Lease::acquire(&url, "run", "a", LeaseSettings::default(), |_| {}).unwrap();
        let follower = would_be_leader(&url, "b");
        std::thread::sleep(Duration::from_millis(200));
        let started = Instant::now();
        drop(first);
        let second = follower.join().unwrap();
        assert_eq!(second.term(), 2);
        assert!(started.elapsed() < Duration::from_secs(1));
        // A different run has a lease of its own.
        let other = Lease::acquire(&url, "other", "a", fast(), |_| {}).unwrap();
        assert_eq!(other.term(), 1);
    }
}
