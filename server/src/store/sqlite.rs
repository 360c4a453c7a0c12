//! The embedded store: SQLite (`astraea.db`, WAL, synchronous FULL) and
//! atomic safetensors checkpoint files in the state directory.
//!
//! A round is committed in this order: the checkpoint file is written under
//! a temporary name, synced and renamed; then the round's row and its
//! mediators are inserted in one transaction naming that file.

use std::io::Write;
use std::path::{Path, PathBuf};

use astraea_core::metrics::RoundRecord;
use astraea_core::weights::ParamShape;
use rusqlite::{Connection, OptionalExtension, params};

use super::{
    COUNTED, Joined, Resumed, RoundState, RunStore, StoreError, StoredRound, assemble, token_hash,
};

/// Schema versions, applied in order; `PRAGMA user_version` records how
/// many have run.
const MIGRATIONS: &[&str] = &["CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        config TEXT NOT NULL,
        plan TEXT,
        finished INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL DEFAULT (datetime('now'))
    );
    CREATE TABLE rounds (
        run_id INTEGER NOT NULL REFERENCES runs(id),
        round INTEGER NOT NULL,
        accuracy REAL NOT NULL,
        loss REAL NOT NULL,
        bytes_up INTEGER NOT NULL,
        bytes_down INTEGER NOT NULL,
        mean_kl REAL NOT NULL,
        wall_s REAL NOT NULL,
        skipped_hops INTEGER NOT NULL,
        checkpoint TEXT NOT NULL,
        finished_at TEXT NOT NULL DEFAULT (datetime('now')),
        PRIMARY KEY (run_id, round)
    );
    CREATE TABLE mediators (
        run_id INTEGER NOT NULL REFERENCES runs(id),
        round INTEGER NOT NULL,
        mediator INTEGER NOT NULL,
        members TEXT NOT NULL,
        kl REAL NOT NULL,
        PRIMARY KEY (run_id, round, mediator)
    );
    CREATE TABLE clients (
        run_id INTEGER NOT NULL REFERENCES runs(id),
        client_id INTEGER NOT NULL,
        backend TEXT NOT NULL,
        joined_at TEXT NOT NULL DEFAULT (datetime('now')),
        left_at TEXT
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        run_id INTEGER NOT NULL REFERENCES runs(id),
        round INTEGER,
        kind TEXT NOT NULL,
        detail TEXT NOT NULL,
        at TEXT NOT NULL DEFAULT (datetime('now'))
    );",
    // 2: the update guard's history is saved with each round, so a restart
    // does not reset it; configurations stored before secrets were redacted
    // lose their admin token.
    "ALTER TABLE rounds ADD COLUMN guard TEXT;
    UPDATE runs SET config = '(redacted: stored before secrets were kept out)'
        WHERE config LIKE '%admin_token: Some(%' AND config NOT LIKE '%admin_token: Some(<redacted>)%';",
    // 3: the privacy accountant and the round's epsilon are saved with each
    // round, so a restart goes on from what was spent (before, it counted
    // every past round at the noise multiplier configured now).
    "ALTER TABLE rounds ADD COLUMN accountant TEXT;
    ALTER TABLE rounds ADD COLUMN epsilon REAL;",
    // 4: the clip adaptive clipping reached, so a restart goes on from it
    // instead of the configured starting clip.
    "ALTER TABLE rounds ADD COLUMN model_clip REAL;",
    // 5: what the round's record says of training (samples and seconds
    // so far) and of its hops (accepted, refused, discarded, skipped), so
    // /api/rounds shows them after a restart too.
    "ALTER TABLE rounds ADD COLUMN train_samples INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE rounds ADD COLUMN train_s REAL NOT NULL DEFAULT 0;
    ALTER TABLE rounds ADD COLUMN hops TEXT;",
    // 6: a client's resume token (its SHA-256) and kind, so a restarted
    // server takes its clients back as themselves (same id, same shard).
    "ALTER TABLE clients ADD COLUMN token_hash TEXT;
    ALTER TABLE clients ADD COLUMN demo INTEGER;
    CREATE INDEX clients_by_token ON clients (run_id, token_hash);",
];

/// The database and the checkpoint folder.
#[derive(Debug)]
pub struct SqliteStore {
    db: Connection,
    checkpoints: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl SqliteStore {
    /// Opens (or creates) `dir/astraea.db` and `dir/checkpoints/`, applying
    /// any migration not yet applied.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let checkpoints = dir.join("checkpoints");
        std::fs::create_dir_all(&checkpoints).map_err(io(&checkpoints))?;
        let mut db = Connection::open(dir.join("astraea.db"))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        let applied: usize = db.pragma_query_value(None, "user_version", |row| row.get(0))?;
        // Each migration and its version in one transaction: a crash
        // half-way leaves the schema as it was, not half-migrated.
        for (version, migration) in MIGRATIONS.iter().enumerate().skip(applied) {
            let tx = db.transaction()?;
            tx.execute_batch(migration)?;
            tx.pragma_update(None, "user_version", version + 1)?;
            tx.commit()?;
        }
        Ok(Self { db, checkpoints })
    }
}

impl RunStore for SqliteStore {
    fn resume_or_create(
        &mut self,
        name: &str,
        config: &str,
        shapes: &[ParamShape],
    ) -> Result<Resumed, StoreError> {
        let existing: Option<(i64, Option<String>)> = self
            .db
            .query_row(
                "SELECT id, plan FROM runs WHERE name = ?1 AND finished = 0",
                params![name],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        let Some((run_id, plan)) = existing else {
            self.db.execute(
                "INSERT INTO runs (name, config) VALUES (?1, ?2)
                 ON CONFLICT(name) DO UPDATE SET config = ?2, finished = 0, plan = NULL",
                params![name, config],
            )?;
            let run_id =
                self.db
                    .query_row("SELECT id FROM runs WHERE name = ?1", params![name], |r| {
                        r.get(0)
                    })?;
            self.db
                .execute("DELETE FROM rounds WHERE run_id = ?1", params![run_id])?;
            self.db
                .execute("DELETE FROM mediators WHERE run_id = ?1", params![run_id])?;
            // A new run under an old name: the old run's clients are not
            // its clients (their tokens resume nothing, their ids are free).
            self.db
                .execute("DELETE FROM clients WHERE run_id = ?1", params![run_id])?;
            return Ok(Resumed::fresh(run_id));
        };
        let mut statement = self.db.prepare(
            "SELECT round, accuracy, loss, bytes_up, bytes_down, mean_kl, wall_s, skipped_hops, checkpoint, guard,
                    accountant, epsilon, model_clip, train_samples, train_s, hops
             FROM rounds WHERE run_id = ?1 ORDER BY round",
        )?;
        let rows = statement.query_map(params![run_id], |row| {
            Ok(StoredRound {
                record: RoundRecord {
                    round: row.get::<_, i64>(0)? as usize,
                    accuracy: row.get(1)?,
                    loss: row.get(2)?,
                    bytes_up: row.get::<_, i64>(3)? as u64,
                    bytes_down: row.get::<_, i64>(4)? as u64,
                    mean_kl: row.get(5)?,
                    wall_s: row.get(6)?,
                    train_samples: row.get::<_, i64>(13)? as u64,
                    train_s: row.get(14)?,
                    clock_s: row.get(6)?,
                    epsilon: row.get(11)?,
                    // Filled in by `assemble`, from the mediators table.
                    mediators: Vec::new(),
                    // Unreadable or from before it was kept: zero.
                    hops: row
                        .get::<_, Option<String>>(15)?
                        .and_then(|text| serde_json::from_str(&text).ok())
                        .unwrap_or_default(),
                },
                skipped: row.get::<_, i64>(7)? as u64,
                checkpoint: row.get(8)?,
                guard: row.get(9)?,
                accountant: row.get(10)?,
                // A clip that does not read as a number is dropped, not
                // fatal: the run goes on from the configured clip.
                model_clip: row.get::<_, Option<f64>>(12).unwrap_or(None),
            })
        })?;
        let rounds = rows.collect::<Result<Vec<_>, _>>()?;
        drop(statement);
        let checkpoints = self.checkpoints.clone();
        let last_client_id: i64 = self.db.query_row(
            "SELECT COALESCE(MAX(client_id), 0) FROM clients WHERE run_id = ?1",
            params![run_id],
            |row| row.get(0),
        )?;
        assemble(
            (run_id, last_client_id.max(0) as u64),
            plan,
            rounds,
            |round| self.mediators(run_id, round),
            |file| {
                let path = checkpoints.join(file);
                std::fs::read(&path).map_err(io(&path))
            },
            shapes,
        )
    }

    fn save_plan(&mut self, run_id: i64, ratios: &[f64]) -> Result<(), StoreError> {
        let plan = serde_json::to_string(ratios).expect("numbers serialise");
        self.db.execute(
            "UPDATE runs SET plan = ?2 WHERE id = ?1",
            params![run_id, plan],
        )?;
        Ok(())
    }

    fn save_round(
        &mut self,
        run_id: i64,
        record: &RoundRecord,
        kept: &RoundState<'_>,
    ) -> Result<(), StoreError> {
        let RoundState {
            skipped_hops,
            mediators,
            checkpoint,
            guard,
            accountant,
            model_clip,
            last,
        } = *kept;
        let file = format!("run{run_id}-round{:06}.safetensors", record.round);
        let path = self.checkpoints.join(&file);
        let temporary = self.checkpoints.join(format!("{file}.tmp"));
        {
            let mut out = std::fs::File::create(&temporary).map_err(io(&temporary))?;
            out.write_all(checkpoint).map_err(io(&temporary))?;
            out.sync_all().map_err(io(&temporary))?;
        }
        std::fs::rename(&temporary, &path).map_err(io(&path))?;
        let tx = self.db.transaction()?;
        tx.execute(
            "INSERT OR REPLACE INTO rounds
             (run_id, round, accuracy, loss, bytes_up, bytes_down, mean_kl, wall_s, skipped_hops, checkpoint, guard,
              accountant, epsilon, model_clip, train_samples, train_s, hops)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
            params![
                run_id,
                record.round as i64,
                record.accuracy,
                record.loss,
                record.bytes_up as i64,
                record.bytes_down as i64,
                record.mean_kl,
                record.wall_s,
                skipped_hops as i64,
                file,
                serde_json::to_string(guard).expect("numbers serialise"),
                accountant.map(|a| a.to_json()),
                record.epsilon,
                model_clip,
                record.train_samples as i64,
                record.train_s,
                serde_json::to_string(&record.hops).expect("counts serialise")
            ],
        )?;
        for (index, mediator) in mediators.iter().enumerate() {
            tx.execute(
                "INSERT OR REPLACE INTO mediators (run_id, round, mediator, members, kl)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    run_id,
                    record.round as i64,
                    index as i64,
                    serde_json::to_string(&mediator.members).expect("ids serialise"),
                    mediator.kl
                ],
            )?;
        }
        if last {
            tx.execute(
                "UPDATE runs SET finished = 1 WHERE id = ?1",
                params![run_id],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn finish(&mut self, run_id: i64) -> Result<(), StoreError> {
        self.db.execute(
            "UPDATE runs SET finished = 1 WHERE id = ?1",
            params![run_id],
        )?;
        Ok(())
    }

    fn event(
        &mut self,
        run_id: i64,
        round: Option<u32>,
        kind: &str,
        detail: &str,
    ) -> Result<(), StoreError> {
        self.db.execute(
            "INSERT INTO events (run_id, round, kind, detail) VALUES (?1, ?2, ?3, ?4)",
            params![run_id, round, kind, detail],
        )?;
        Ok(())
    }

    fn client_joined(&mut self, run_id: i64, client: &Joined<'_>) -> Result<(), StoreError> {
        self.db.execute(
            "INSERT INTO clients (run_id, client_id, backend, token_hash, demo) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                run_id,
                client.id as i64,
                client.backend,
                token_hash(client.token),
                client.demo.is_some()
            ],
        )?;
        Ok(())
    }

    fn forget_token(&mut self, run_id: i64, client_id: u64) -> Result<(), StoreError> {
        self.db.execute(
            "UPDATE clients SET token_hash = NULL WHERE run_id = ?1 AND client_id = ?2",
            params![run_id, client_id as i64],
        )?;
        Ok(())
    }

    fn client_by_token(
        &mut self,
        run_id: i64,
        token: &str,
    ) -> Result<Option<(u64, Option<u64>)>, StoreError> {
        // One server's store: its ids number its demo clients
        // (`RunStore::take_demo_slot` gives none), so a demo client's slot
        // is its id.
        Ok(self
            .db
            .query_row(
                "SELECT client_id, demo FROM clients WHERE run_id = ?1 AND token_hash = ?2
                 ORDER BY rowid DESC LIMIT 1",
                params![run_id, token_hash(token)],
                |row| {
                    let id = row.get::<_, i64>(0)?.max(0) as u64;
                    Ok((id, row.get::<_, bool>(1)?.then_some(id)))
                },
            )
            .optional()?)
    }

    fn count(&mut self, table: &str, run_id: i64) -> Result<i64, StoreError> {
        assert!(COUNTED.contains(&table), "unknown table {table}");
        Ok(self.db.query_row(
            &format!("SELECT COUNT(*) FROM {table} WHERE run_id = ?1"),
            params![run_id],
            |row| row.get(0),
        )?)
    }

    fn events(
        &mut self,
        run_id: i64,
        kind: &str,
    ) -> Result<Vec<(Option<u32>, String)>, StoreError> {
        let mut statement = self.db.prepare(
            "SELECT round, detail FROM events WHERE run_id = ?1 AND kind = ?2 ORDER BY id",
        )?;
        let rows =
            statement.query_map(params![run_id, kind], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

impl SqliteStore {
    /// The members of round `round`'s mediators in run `run_id`, in
    /// mediator order (none for a round of the asynchronous mode).
    fn mediators(&self, run_id: i64, round: usize) -> Result<Vec<Vec<u64>>, StoreError> {
        let mut statement = self.db.prepare_cached(
            "SELECT members FROM mediators WHERE run_id = ?1 AND round = ?2 ORDER BY mediator",
        )?;
        let rows =
            statement.query_map(params![run_id, round as i64], |row| row.get::<_, String>(0))?;
        let mut mediators = Vec::new();
        for members in rows {
            // Ids the server wrote itself; an unreadable row is left out.
            if let Ok(ids) = serde_json::from_str(&members?) {
                mediators.push(ids);
            }
        }
        Ok(mediators)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use astraea_core::model::ModelConfig;
    use astraea_core::weights::Weights;
    use burn::prelude::*;
    use std::path::PathBuf;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("astraea-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    use super::super::contract::{self, record};

    fn opener(dir: &Path) -> impl Fn() -> crate::store::Store + '_ {
        move || Box::new(SqliteStore::open(dir).unwrap())
    }

    #[test]
    fn a_reopened_store_resumes_the_unfinished_run_from_its_last_round() {
        let dir = temp_dir("resume");
        contract::a_reopened_store_resumes_the_unfinished_run_from_its_last_round(&opener(&dir));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_token_stored_by_an_older_version_is_redacted_on_open() {
        // Prepare: a database at schema 1 holding a configuration printed
        // with its admin token (the bug: `format!("{config:?}")` stored it).
        let dir = temp_dir("redact");
        std::fs::create_dir_all(&dir).unwrap();
        {
            let db = Connection::open(dir.join("astraea.db")).unwrap();
            db.execute_batch(MIGRATIONS[0]).unwrap();
            db.pragma_update(None, "user_version", 1).unwrap();
            db.execute(
                "INSERT INTO runs (name, config) VALUES ('old', 'ServeConfig { admin_token: Some(\"s3cret\") }')",
                [],
            )
            .unwrap();
        }

        // Execute
        let store = SqliteStore::open(&dir).unwrap();

        // Assert
        let config: String = store
            .db
            .query_row("SELECT config FROM runs WHERE name = 'old'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert!(!config.contains("s3cret"), "{config}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_clip_adaptive_clipping_reached_is_kept_and_a_damaged_one_is_dropped() {
        // Prepare: a private run's two rounds, the clip moved to 0.31.
        let dir = temp_dir("clip");
        let weights = Weights::from_model(&ModelConfig::new(10).init(&Device::flex()));
        let mut store = SqliteStore::open(&dir).unwrap();
        let run = store.resume_or_create("dp", "{}", &weights.shapes).unwrap();
        for (round, clip) in [(1, 0.4), (2, 0.31)] {
            let kept = RoundState {
                skipped_hops: 0,
                mediators: &[],
                checkpoint: &weights.to_safetensors(),
                guard: &[],
                accountant: None,
                model_clip: Some(clip),
                last: false,
            };
            store
                .save_round(run.run_id, &record(round, 0.3), &kept)
                .unwrap();
        }

        // Execute and assert: the last round's clip comes back; one that
        // is not a finite positive number does not.
        let resumed = store.resume_or_create("dp", "{}", &weights.shapes).unwrap();
        assert_eq!(resumed.model_clip, Some(0.31));
        for damaged in ["0", "-1", "'x'"] {
            store
                .db
                .execute(&format!("UPDATE rounds SET model_clip = {damaged}"), [])
                .unwrap();
            let resumed = store.resume_or_create("dp", "{}", &weights.shapes).unwrap();
            assert_eq!(resumed.model_clip, None, "{damaged}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_damaged_accountant_stops_the_resume_instead_of_guessing_the_spend() {
        // Prepare: a private run's round, its accountant then damaged.
        let dir = temp_dir("accountant");
        let weights = Weights::from_model(&ModelConfig::new(10).init(&Device::flex()));
        let mut spent = astraea_core::privacy::RdpAccountant::new();
        spent.compose(1.0, 2.0, 1);
        {
            let mut store = SqliteStore::open(&dir).unwrap();
            let run = store.resume_or_create("dp", "{}", &weights.shapes).unwrap();
            let kept = RoundState {
                skipped_hops: 0,
                mediators: &[],
                checkpoint: &weights.to_safetensors(),
                guard: &[],
                accountant: Some(&spent),
                model_clip: Some(0.5),
                last: false,
            };
            store
                .save_round(run.run_id, &record(1, 0.3), &kept)
                .unwrap();
            let resumed = store.resume_or_create("dp", "{}", &weights.shapes).unwrap();
            assert_eq!(resumed.accountant.as_ref(), Some(&spent));
            store
                .db
                .execute("UPDATE rounds SET accountant = '{\"orders\":[2]}'", [])
                .unwrap();
        }

        // Execute
        let mut store = SqliteStore::open(&dir).unwrap();
        let resumed = store.resume_or_create("dp", "{}", &weights.shapes);

        // Assert
        assert!(
            matches!(resumed, Err(StoreError::Accountant { round: 1 })),
            "{resumed:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_client_is_found_by_its_token() {
        let dir = temp_dir("tokens");
        contract::a_client_is_found_by_its_token(&opener(&dir));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_finished_run_is_not_resumed() {
        let dir = temp_dir("finished");
        contract::a_finished_run_is_not_resumed(&opener(&dir));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
