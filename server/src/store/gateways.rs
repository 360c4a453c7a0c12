//! Gateways in the run's PostgreSQL store: `astraea serve --gateway`
//! processes that hold volunteers and run the chains of the mediators the
//! leader places on them, giving back one partial each
//! ([`astraea_core::engine::hierarchy`]).
//!
//! Two tables (the store's second migration):
//! - `gateways`: each gateway's heartbeat (ready clients, clients), every
//!   250 ms; the leader counts a gateway seen in the last 3 s.
//! - `gateway_work`: one row per round and gateway, with the term of the
//!   leader that placed it. Its `state` moves only by conditional writes
//!   (`UPDATE … WHERE state = expected RETURNING`), never a read then a
//!   write: `placed` → `taken` (the gateway claims it) → `returned` (its
//!   partial, while the row is still `taken` at the term it took) →
//!   `folded` (the leader read it, once); whatever is still `placed` or
//!   `taken` when the leader closes the round becomes `closed`, and a
//!   partial that comes after that is refused, not counted. A new leader
//!   places the round again at its term; a partial of the old term is
//!   refused.
//!
//! Models and partials travel as blobs (little-endian f32, content
//! addressed in `blobs`, never rewritten); the leader deletes a round's
//! rows and the blobs nothing else refers to once the next round is folded.
//! The leader's calls go through a store fenced by its lease
//! ([`super::PgStore::fence`]): an ex-leader places and folds nothing.

use std::time::Duration;

use postgres::GenericClient;
use serde::Serialize;

use astraea_core::engine::declared::Declared;

use super::StoreError;
use super::postgres::{PgStore, blob_name};

/// A gateway as the leader saw it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GatewaySeen {
    /// Its name (`gateway pid … at …`).
    pub name: String,
    /// Its ready clients (reported their label counts, not pausing).
    pub ready: u64,
    /// Its clients.
    pub clients: u64,
    /// Seconds since its last heartbeat.
    pub seen_s_ago: f64,
    /// The round it is training, from taking its work until giving back
    /// (`None`: free).
    pub busy_round: Option<u32>,
    /// The fingerprint of its training settings.
    #[serde(skip)]
    pub config: String,
    /// Its clients' label counts before any augmentation plan, as the
    /// plan reads them (`engine::declared::Declared`); `None` once it
    /// holds the plan, when it said none, or when what it said does not
    /// read back.
    #[serde(skip)]
    pub declared: Option<Declared>,
    /// Whether it holds the run's augmentation plan (sent it to its
    /// clients): until it does, a run with a plan draws none of its
    /// clients.
    pub planned: bool,
    /// Its ready clients' totals (samples), counted: how many clients
    /// declared each (the run's cap on an own-data client's word is taken
    /// over every server's, `engine::declared::declared_cap_of`).
    #[serde(skip)]
    pub totals: Vec<(u64, u64)>,
}

/// What a gateway says in each heartbeat.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Heartbeat<'a> {
    /// Its ready clients (reported their label counts, not pausing).
    pub ready: usize,
    /// Its clients.
    pub clients: usize,
    /// The fingerprint of its training settings
    /// (`ServeConfig::training_fingerprint`).
    pub config: &'a str,
    /// Its clients' label counts (see [`GatewaySeen::declared`]), written
    /// only where `declared_changed` (the row keeps the last written:
    /// before the plan they may be one vector per own-data client).
    pub declared: Option<&'a Declared>,
    /// Whether `declared` differs from what the row holds.
    pub declared_changed: bool,
    /// Whether it holds the run's augmentation plan.
    pub planned: bool,
    /// Its ready clients' totals, counted ([`GatewaySeen::totals`]);
    /// `None` when unchanged since its last heartbeat (the row keeps
    /// them).
    pub totals: Option<&'a [(u64, u64)]>,
}

/// Work the leader placed on a gateway: train `participants` of its
/// clients from `model` in round `round`.
#[derive(Debug, Clone, PartialEq)]
pub struct Work {
    /// The round.
    pub round: u32,
    /// The term of the leader that placed it.
    pub term: i64,
    /// How many participants to draw.
    pub participants: usize,
    /// The round's global weights.
    pub model: Vec<f32>,
    /// The fingerprint of the leader's training settings
    /// (`ServeConfig::training_fingerprint`): a gateway whose own differs
    /// refuses the work.
    pub config: String,
    /// The leader's hop deadline now (its admin may have changed it), in
    /// seconds: the gateway's chains take it.
    pub hop_deadline_s: f64,
    /// The run's cap on an own-data client's word, in samples
    /// (`engine::declared`), as the leader took it over every server's
    /// clients: the gateway's draw and weights take it instead of its own.
    pub cap: Option<u64>,
}

/// Work a gateway still owes.
#[derive(Debug, Clone, PartialEq)]
pub struct Outstanding {
    /// The gateway.
    pub gateway: String,
    /// Whether it took the work (else it is still placed).
    pub taken: bool,
    /// Seconds since the work was placed or taken.
    pub waiting_s: f64,
}

/// A gateway's part of a round, as the leader folds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Folded {
    /// The gateway.
    pub gateway: String,
    /// What it gave back (weights, samples), `None` when it gave back
    /// nothing usable or nothing in time: its partial, or, where `each`
    /// is not empty, its mediators' results laid end to end.
    pub partial: Option<(Vec<f32>, u64)>,
    /// See [`Answer::each`].
    pub each: Vec<u64>,
    /// See [`Answer::largest`] (0 for work not back in time).
    pub largest: u64,
    /// Why there is no partial (its detail, or `not back in time`).
    pub detail: Option<String>,
    /// What its share cost, as it said when it gave back in time (zero
    /// for work not back in time).
    pub traffic: Traffic,
}

/// A round as its leader recorded it: accuracy, loss, and under
/// client-level DP the epsilon spent.
pub type RoundOutcome = (f64, f64, Option<f64>);

/// What a gateway's share of a round cost, so that the leader's round
/// records count the whole federation: samples its clients trained (each
/// epoch counts, as `train_samples` does) and bytes received from and
/// sent to its clients while it held the work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Samples trained.
    pub trained: u64,
    /// Bytes received from its clients.
    pub bytes_up: u64,
    /// Bytes sent to its clients.
    pub bytes_down: u64,
}

/// What the leader places: the round's model, the fingerprint of its
/// training settings, and its hop deadline now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placement<'a> {
    /// The round's global weights.
    pub model: &'a [f32],
    /// `ServeConfig::training_fingerprint`.
    pub config: &'a str,
    /// The leader's hop deadline, seconds.
    pub hop_deadline_s: f64,
    /// The run's cap on an own-data client's word ([`Work::cap`]).
    pub cap: Option<u64>,
}

/// A gateway's answer for a round it took.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Answer<'a> {
    /// What it gives back (weights, samples), if anything: one partial
    /// (its mediators' sample-weighted mean), or, in a run whose rule
    /// needs every result (`ServeConfig::gateways_give_back_every_result`),
    /// its mediators' results laid end to end, with their samples summed.
    pub partial: Option<(&'a [f32], u64)>,
    /// Empty for a partial; else the samples of each result laid end to
    /// end in `partial`, in order.
    pub each: &'a [u64],
    /// The most clients in one of its mediators (client-level DP's
    /// sensitivity is taken over the round's largest).
    pub largest: u64,
    /// Mediators whose results are in it.
    pub mediators: u64,
    /// Mediators that failed.
    pub failures: u64,
    /// Why there is no partial.
    pub detail: Option<&'a str>,
    /// What the share cost.
    pub traffic: Traffic,
}

/// A gateway's client ids are `block << BLOCK_BITS | n` (its block from
/// [`PgStore::client_id_block`], from 1): every id at or above
/// `1 << BLOCK_BITS` is a gateway's, every id below it a leader's.
pub const BLOCK_BITS: u32 = 32;

/// How recently a gateway must have been heard from to be given work.
pub const GATEWAY_SEEN_WITHIN: Duration = Duration::from_secs(3);

fn to_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn from_bytes(bytes: &[u8]) -> Result<Vec<f32>, StoreError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(StoreError::Checkpoint {
            name: blob_name(bytes),
            reason: format!("{} bytes is not a whole number of f32s", bytes.len()),
        });
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Keeps `values` as a blob (if absent) and answers its name.
fn put_blob(tx: &mut impl GenericClient, values: &[f32]) -> Result<String, StoreError> {
    let bytes = to_bytes(values);
    let hash = blob_name(&bytes);
    tx.execute(
        "INSERT INTO blobs (hash, bytes) VALUES ($1, $2) ON CONFLICT (hash) DO NOTHING",
        &[&hash, &bytes],
    )?;
    Ok(hash)
}

fn get_blob(tx: &mut impl GenericClient, hash: &str) -> Result<Vec<f32>, StoreError> {
    let row = tx.query_opt("SELECT bytes FROM blobs WHERE hash = $1", &[&hash])?;
    let Some(row) = row else {
        return Err(StoreError::Checkpoint {
            name: hash.to_string(),
            reason: "missing".into(),
        });
    };
    from_bytes(&row.get::<_, Vec<u8>>(0))
}

fn owned(run: &str, name: &str) -> (String, String) {
    (run.to_string(), name.to_string())
}

impl PgStore {
    /// A gateway's heartbeat: `name`, a gateway of `run`, says what
    /// [`Heartbeat`] holds.
    ///
    /// # Errors
    /// The database failed.
    pub fn gateway_heartbeat(
        &self,
        (run, name): (&str, &str),
        beat: Heartbeat<'_>,
    ) -> Result<(), StoreError> {
        let (run, name) = owned(run, name);
        let config = beat.config.to_string();
        let (ready, clients) = (beat.ready as i64, beat.clients as i64);
        let counts = beat
            .declared
            .map(|c| serde_json::to_string(c).expect("numbers serialise"));
        let (planned, declared_changed) = (beat.planned, beat.declared_changed);
        let totals = beat
            .totals
            .map(|t| serde_json::to_string(t).expect("numbers serialise"));
        self.call(move |client| {
            client.execute(
                "INSERT INTO gateways (run, name, ready, clients, config, declared, planned, totals, seen_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now())
                 ON CONFLICT (run, name) DO UPDATE
                 SET ready = excluded.ready, clients = excluded.clients,
                     config = excluded.config,
                     declared = CASE WHEN $9 THEN excluded.declared ELSE gateways.declared END,
                     planned = excluded.planned,
                     totals = COALESCE(excluded.totals, gateways.totals), seen_at = now()",
                &[&run, &name, &ready, &clients, &config, &counts, &planned, &totals, &declared_changed],
            )?;
            Ok(())
        })
    }

    /// The augmentation plan of the run called `run` (the ratios its
    /// leader saved), `None` while it has none; a plan that does not read
    /// back as numbers is none, as a resuming leader takes it
    /// (`store::assemble`).
    ///
    /// # Errors
    /// The database failed.
    pub fn run_plan(&self, run: &str) -> Result<Option<Vec<f64>>, StoreError> {
        let run = run.to_string();
        self.call(move |client| {
            let plan: Option<String> = client
                .query_opt("SELECT plan FROM runs WHERE name = $1", &[&run])?
                .and_then(|row| row.get(0));
            Ok(plan.and_then(|p| {
                serde_json::from_str(&p)
                    .inspect_err(|e| {
                        // Read again every second: said once.
                        static SAID: std::sync::Once = std::sync::Once::new();
                        SAID.call_once(|| {
                            tracing::error!("the run's plan does not read back ({e}): {p}")
                        });
                    })
                    .ok()
            }))
        })
    }

    /// The id of the run called `run`, once a leader created it (a
    /// gateway records its clients under it, so their tokens resume on
    /// every server of the run).
    ///
    /// # Errors
    /// The database failed.
    pub fn run_id(&self, run: &str) -> Result<Option<i64>, StoreError> {
        let run = run.to_string();
        self.call(move |client| {
            Ok(client
                .query_opt("SELECT id FROM runs WHERE name = $1", &[&run])?
                .map(|row| row.get(0)))
        })
    }

    /// The gateways of `run` heard from within [`GATEWAY_SEEN_WITHIN`], by
    /// name.
    ///
    /// # Errors
    /// The database failed.
    pub fn live_gateways(&self, run: &str) -> Result<Vec<GatewaySeen>, StoreError> {
        let run = run.to_string();
        let within = GATEWAY_SEEN_WITHIN.as_secs_f64();
        self.call(move |client| {
            let rows = client.query(
                "SELECT name, ready, clients, EXTRACT(EPOCH FROM now() - seen_at)::float8,
                        busy_round, config, declared, planned, totals
                 FROM gateways WHERE run = $1 AND seen_at > now() - make_interval(secs => $2)
                 ORDER BY name",
                &[&run, &within],
            )?;
            Ok(rows
                .iter()
                .map(|row| GatewaySeen {
                    name: row.get(0),
                    ready: row.get::<_, i64>(1).max(0) as u64,
                    clients: row.get::<_, i64>(2).max(0) as u64,
                    seen_s_ago: row.get(3),
                    busy_round: row.get::<_, Option<i64>>(4).map(|r| r as u32),
                    config: row.get(5),
                    // A gateway is the operator's own server; counts it
                    // wrote that do not parse are left out, not trusted.
                    declared: row
                        .get::<_, Option<String>>(6)
                        .and_then(|c| serde_json::from_str(&c).ok()),
                    planned: row.get(7),
                    totals: row
                        .get::<_, Option<String>>(8)
                        .and_then(|t| serde_json::from_str(&t).ok())
                        .unwrap_or_default(),
                })
                .collect())
        })
    }

    /// A block of client ids of the database's own: a gateway gives ids
    /// from `block << 32` on, so no two servers give one id.
    ///
    /// # Errors
    /// The database failed.
    pub fn client_id_block(&self) -> Result<u64, StoreError> {
        self.call(|client| {
            let block: i64 = client
                .query_one("SELECT nextval('client_id_blocks')", &[])?
                .get(0);
            Ok(block as u64)
        })
    }

    /// The leader places round `round` (at lease term `term`) on gateways:
    /// each `(name, participants)` of `shares` trains from `model`. Work
    /// of this round a past term placed is replaced; work of other rounds
    /// still out is closed. Fenced: an ex-leader places nothing.
    ///
    /// # Errors
    /// The database failed, or the lease was taken ([`StoreError::Fenced`]).
    pub fn place_work(
        &self,
        run: &str,
        (round, term): (u32, i64),
        placement: Placement<'_>,
        shares: &[(String, usize)],
    ) -> Result<(), StoreError> {
        let run = run.to_string();
        let Placement {
            model,
            config,
            hop_deadline_s,
            cap,
        } = placement;
        let cap = cap.map(|c| i64::try_from(c).unwrap_or(i64::MAX));
        let config = config.to_string();
        let model = model.to_vec();
        let shares = shares.to_vec();
        self.fenced(move |tx| {
            let round = i64::from(round);
            // Work still out of other rounds, or of this round at an
            // earlier term (a new leader's shares may leave a gateway out),
            // is closed: no gateway trains dead work.
            tx.execute(
                "UPDATE gateway_work SET state = 'closed', updated_at = now()
                 WHERE run = $1 AND (round <> $2 OR term < $3) AND state IN ('placed', 'taken')",
                &[&run, &round, &term],
            )?;
            let hash = put_blob(tx, &model)?;
            for (gateway, participants) in &shares {
                tx.execute(
                    "INSERT INTO gateway_work
                         (run, round, gateway, term, model, participants, state, config,
                          hop_deadline_s, cap)
                     VALUES ($1, $2, $3, $4, $5, $6, 'placed', $7, $8, $9)
                     ON CONFLICT (run, round, gateway) DO UPDATE
                     SET term = excluded.term, model = excluded.model, config = excluded.config,
                         hop_deadline_s = excluded.hop_deadline_s, cap = excluded.cap,
                         participants = excluded.participants, state = 'placed',
                         partial = NULL, samples = NULL, mediators = NULL,
                         failures = NULL, detail = NULL, trained = 0, bytes_up = 0,
                         bytes_down = 0, each = NULL, largest = NULL, updated_at = now()
                     WHERE gateway_work.term < excluded.term",
                    &[
                        &run,
                        &round,
                        gateway,
                        &term,
                        &hash,
                        &(*participants as i64),
                        &config,
                        &hop_deadline_s,
                        &cap,
                    ],
                )?;
            }
            // The gateways, idle, take it now.
            super::listen::notify(tx, &run)?;
            Ok(())
        })
    }

    /// The gateways that still owe round `round` (placed at `term`) their
    /// partial, by name, with whether each has taken its work and the
    /// seconds since its row last moved.
    ///
    /// # Errors
    /// The database failed.
    pub fn work_outstanding(
        &self,
        run: &str,
        (round, term): (u32, i64),
    ) -> Result<Vec<Outstanding>, StoreError> {
        let run = run.to_string();
        self.call(move |client| {
            let rows = client.query(
                "SELECT gateway, state = 'taken', EXTRACT(EPOCH FROM now() - updated_at)::float8
                 FROM gateway_work
                 WHERE run = $1 AND round = $2 AND term = $3 AND state IN ('placed', 'taken')
                 ORDER BY gateway",
                &[&run, &i64::from(round), &term],
            )?;
            Ok(rows
                .iter()
                .map(|row| Outstanding {
                    gateway: row.get(0),
                    taken: row.get(1),
                    waiting_s: row.get(2),
                })
                .collect())
        })
    }

    /// The leader closes round `round` (placed at `term`): every partial
    /// returned is read, once (`folded`); every gateway that has not
    /// returned one is closed out (a later partial is refused). Rows and
    /// blobs of earlier rounds are deleted. Fenced.
    ///
    /// # Errors
    /// The database failed, a partial's blob is missing, or the lease was
    /// taken ([`StoreError::Fenced`]).
    pub fn fold_work(
        &self,
        run: &str,
        (round, term): (u32, i64),
    ) -> Result<Vec<Folded>, StoreError> {
        let run = run.to_string();
        self.fenced(move |tx| {
            let round = i64::from(round);
            tx.execute(
                "UPDATE gateway_work
                 SET state = CASE WHEN state = 'returned' THEN 'folded' ELSE 'closed' END,
                     updated_at = now()
                 WHERE run = $1 AND round = $2 AND term = $3
                   AND state IN ('placed', 'taken', 'returned')",
                &[&run, &round, &term],
            )?;
            // Read back as a second statement, so that this call run again
            // (its first answer lost with a connection) answers the same.
            let rows = tx.query(
                "SELECT gateway, state, partial, samples, detail, trained, bytes_up, bytes_down,
                        each, largest
                 FROM gateway_work
                 WHERE run = $1 AND round = $2 AND term = $3 AND state IN ('folded', 'closed')",
                &[&run, &round, &term],
            )?;
            let mut folded = Vec::new();
            for row in rows {
                let (gateway, state): (String, String) = (row.get(0), row.get(1));
                let hash: Option<String> = row.get(2);
                let samples: Option<i64> = row.get(3);
                let detail: Option<String> = row.get(4);
                let count = |i: usize| row.get::<_, i64>(i).max(0) as u64;
                let traffic = match state.as_str() {
                    "folded" => Traffic {
                        trained: count(5),
                        bytes_up: count(6),
                        bytes_down: count(7),
                    },
                    _ => Traffic::default(),
                };
                let partial = match (state.as_str(), hash, samples) {
                    ("folded", Some(hash), Some(samples)) if samples > 0 => {
                        Some((get_blob(tx, &hash)?, samples as u64))
                    }
                    _ => None,
                };
                let (each, largest) = match state.as_str() {
                    "folded" => (
                        row.get::<_, Option<String>>(8)
                            .and_then(|e| serde_json::from_str(&e).ok())
                            .unwrap_or_default(),
                        row.get::<_, Option<i64>>(9).unwrap_or(0).max(0) as u64,
                    ),
                    _ => (Vec::new(), 0),
                };
                let detail = match state.as_str() {
                    "closed" => Some("its partial was not back in time".to_string()),
                    _ if partial.is_none() => {
                        Some(detail.unwrap_or_else(|| "no partial".to_string()))
                    }
                    _ => None,
                };
                folded.push(Folded {
                    gateway,
                    partial,
                    each,
                    largest,
                    detail,
                    traffic,
                });
            }
            folded.sort_by(|a, b| a.gateway.cmp(&b.gateway));
            // Earlier rounds' work, and the blobs nothing refers to now.
            let gone = tx.query(
                "DELETE FROM gateway_work WHERE run = $1 AND round < $2 RETURNING model, partial",
                &[&run, &round],
            )?;
            let mut hashes: Vec<String> = Vec::new();
            for row in gone {
                hashes.push(row.get(0));
                hashes.extend(row.get::<_, Option<String>>(1));
            }
            hashes.sort();
            hashes.dedup();
            tx.execute(
                "DELETE FROM gateways WHERE run = $1 AND seen_at < now() - interval '1 hour'",
                &[&run],
            )?;
            if !hashes.is_empty() {
                tx.execute(
                    "DELETE FROM blobs b WHERE b.hash = ANY($1)
                     AND NOT EXISTS (SELECT 1 FROM rounds r WHERE r.checkpoint = b.hash)
                     AND NOT EXISTS (SELECT 1 FROM gateway_work w
                                     WHERE w.model = b.hash OR w.partial = b.hash)",
                    &[&hashes],
                )?;
            }
            Ok(folded)
        })
    }

    /// A gateway claims the latest work placed on it in `run`, if any.
    ///
    /// # Errors
    /// The database failed, or the model's blob is missing or misshapen.
    pub fn take_work(&self, run: &str, gateway: &str) -> Result<Option<Work>, StoreError> {
        let (run, gateway) = owned(run, gateway);
        self.call(move |client| {
            let mut tx = client.transaction()?;
            // Work already `taken` under this name is taken again: names
            // are one process's own (`client_id_block`), and a process asks
            // only while it trains nothing, so such a row is one whose first
            // answer was lost with a connection, or whose partial could not
            // be written; its partial still counts once.
            let row = tx.query_opt(
                "UPDATE gateway_work SET state = 'taken', updated_at = now()
                 WHERE (run, round, gateway) = (
                     SELECT run, round, gateway FROM gateway_work
                     WHERE run = $1 AND gateway = $2 AND state IN ('placed', 'taken')
                     ORDER BY round DESC LIMIT 1 FOR UPDATE SKIP LOCKED)
                   AND state IN ('placed', 'taken')
                 RETURNING round, term, participants, model, config, hop_deadline_s, cap",
                &[&run, &gateway],
            )?;
            let Some(row) = row else {
                // Asking means training nothing: whatever kept this
                // gateway busy (a give-back that never got through) is over.
                tx.execute(
                    "UPDATE gateways SET busy_round = NULL WHERE run = $1 AND name = $2
                       AND busy_round IS NOT NULL",
                    &[&run, &gateway],
                )?;
                tx.commit()?;
                return Ok(None);
            };
            let model = get_blob(&mut tx, &row.get::<_, String>(3))?;
            // Busy from now on, in the same transaction: the leader never
            // sees this gateway free while it holds work.
            tx.execute(
                "UPDATE gateways SET busy_round = $3 WHERE run = $1 AND name = $2",
                &[&run, &gateway, &row.get::<_, i64>(0)],
            )?;
            tx.commit()?;
            Ok(Some(Work {
                round: row.get::<_, i64>(0) as u32,
                term: row.get(1),
                participants: row.get::<_, i64>(2).max(0) as usize,
                model,
                config: row.get(4),
                hop_deadline_s: row.get(5),
                cap: row.get::<_, Option<i64>>(6).map(|c| c.max(1) as u64),
            }))
        })
    }

    /// A gateway gives back its `answer` for round `round`, taken at
    /// `term`; `false` when the leader no longer waits for it (it closed
    /// the round, or a new leader placed it again): then nothing of it
    /// counts.
    ///
    /// # Errors
    /// The database failed.
    pub fn give_back_work(
        &self,
        run: &str,
        gateway: &str,
        (round, term): (u32, i64),
        answer: Answer<'_>,
    ) -> Result<bool, StoreError> {
        let (run, gateway) = owned(run, gateway);
        let partial = answer.partial.map(|(w, n)| (w.to_vec(), n as i64));
        let (mediators, failures) = (answer.mediators as i64, answer.failures as i64);
        let each = (!answer.each.is_empty())
            .then(|| serde_json::to_string(answer.each).expect("numbers serialise"));
        let largest = i64::try_from(answer.largest).unwrap_or(i64::MAX);
        let detail = answer.detail.map(str::to_string);
        let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let traffic = [
            clamp(answer.traffic.trained),
            clamp(answer.traffic.bytes_up),
            clamp(answer.traffic.bytes_down),
        ];
        let (hash, samples) = match &partial {
            Some((weights, samples)) => (Some(blob_name(&to_bytes(weights))), Some(*samples)),
            None => (None, None),
        };
        self.call(move |client| {
            let mut tx = client.transaction()?;
            let mut accepted = tx
                .query_opt(
                    "UPDATE gateway_work
                     SET state = 'returned', partial = $5, samples = $6, mediators = $7,
                         failures = $8, detail = $9, trained = $10, bytes_up = $11,
                         bytes_down = $12, each = $13, largest = $14, updated_at = now()
                     WHERE run = $1 AND round = $2 AND gateway = $3 AND term = $4
                       AND state = 'taken'
                     RETURNING 1",
                    &[
                        &run,
                        &i64::from(round),
                        &gateway,
                        &term,
                        &hash,
                        &samples,
                        &mediators,
                        &failures,
                        &detail,
                        &traffic[0],
                        &traffic[1],
                        &traffic[2],
                        &each,
                        &largest,
                    ],
                )?
                .is_some();
            if accepted {
                if let Some((weights, _)) = &partial {
                    put_blob(&mut tx, weights)?;
                }
                // The leader, waiting for the partials, reads them now.
                super::listen::notify(&mut tx, &run)?;
            } else {
                // Given back already (this call run again after its answer
                // was lost with a connection): the same answer.
                accepted = tx
                    .query_opt(
                        "SELECT 1 FROM gateway_work
                         WHERE run = $1 AND round = $2 AND gateway = $3 AND term = $4
                           AND state IN ('returned', 'folded')
                           AND partial IS NOT DISTINCT FROM $5
                           AND samples IS NOT DISTINCT FROM $6",
                        &[&run, &i64::from(round), &gateway, &term, &hash, &samples],
                    )?
                    .is_some();
            }
            // Free again, accepted or not, in the transaction that gives
            // back: the leader never sees it busy after.
            tx.execute(
                "UPDATE gateways SET busy_round = NULL WHERE run = $1 AND name = $2",
                &[&run, &gateway],
            )?;
            tx.commit()?;
            Ok(accepted)
        })
    }

    /// The last round of `run` its leader recorded (round, accuracy), if
    /// any.
    ///
    /// # Errors
    /// The database failed.
    pub fn last_round(&self, run: &str) -> Result<Option<(u32, f64)>, StoreError> {
        let run = run.to_string();
        self.call(move |client| {
            Ok(client
                .query_opt(
                    "SELECT r.round, r.accuracy FROM rounds r JOIN runs ON runs.id = r.run_id
                     WHERE runs.name = $1 ORDER BY r.round DESC LIMIT 1",
                    &[&run],
                )?
                .map(|row| (row.get::<_, i64>(0) as u32, row.get(1))))
        })
    }

    /// Round `round` of `run` as its leader recorded it (accuracy, loss,
    /// and under client-level DP the epsilon spent), once it has; and
    /// whether the run has finished.
    ///
    /// # Errors
    /// The database failed.
    pub fn round_outcome(
        &self,
        run: &str,
        round: u32,
    ) -> Result<(Option<RoundOutcome>, bool), StoreError> {
        let run = run.to_string();
        self.call(move |client| {
            // The outcome first: a run finished with its last round is
            // marked so in the round's own transaction, so a round read
            // here comes with the `finished` it was saved with.
            let outcome = client
                .query_opt(
                    "SELECT r.accuracy, r.loss, r.epsilon FROM rounds r JOIN runs ON runs.id = r.run_id
                     WHERE runs.name = $1 AND r.round = $2",
                    &[&run, &i64::from(round)],
                )?
                .map(|row| (row.get(0), row.get(1), row.get(2)));
            let finished = client
                .query_opt("SELECT finished FROM runs WHERE name = $1", &[&run])?
                .is_some_and(|row| row.get(0));
            Ok((outcome, finished))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::lease::{Lease, LeaseSettings};
    use super::*;
    use crate::testing::PgCluster;

    fn cluster() -> (PgCluster, String) {
        PgCluster::with_database()
    }

    /// A leader's store fenced by a lease of `run` held for 30 s.
    fn leader(url: &str) -> (PgStore, Lease) {
        drop(PgStore::connect(url).unwrap());
        let slow = LeaseSettings {
            ttl: Duration::from_secs(30),
            poll: Duration::from_millis(50),
        };
        let lease = Lease::acquire(url, "run", "leader", slow, |_| {}).unwrap();
        let mut store = PgStore::connect(url).unwrap();
        store.fence(&lease);
        (store, lease)
    }

    fn placement(model: &[f32]) -> Placement<'_> {
        Placement {
            model,
            config: "c",
            hop_deadline_s: 30.0,
            cap: Some(300),
        }
    }

    /// What a test's gateway says its share cost.
    const TRAFFIC: Traffic = Traffic {
        trained: 60,
        bytes_up: 2_000,
        bytes_down: 3_000,
    };

    fn answer(partial: Option<(&[f32], u64)>) -> Answer<'_> {
        Answer {
            partial,
            each: &[],
            largest: 1,
            mediators: 1,
            failures: 0,
            detail: None,
            traffic: TRAFFIC,
        }
    }

    #[test]
    fn a_partial_counts_once_and_one_after_the_round_closed_not_at_all() {
        // Prepare: round 4 placed on gateways a (2 participants) and b (1).
        let (_cluster, url) = cluster();
        let (leader, lease) = leader(&url);
        let gateway = PgStore::connect(&url).unwrap();
        let term = lease.term();
        let model = [0.5f32, -1.0, 2.0];
        let shares = [("a".to_string(), 2), ("b".to_string(), 1)];
        leader
            .place_work("run", (4, term), placement(&model), &shares)
            .unwrap();

        // Execute: both take it; a gives back (twice), b only after the
        // leader folded the round.
        gateway.gateway_heartbeat(("run", "a"), beat(2, 2)).unwrap();
        let taken_a = gateway.take_work("run", "a").unwrap().unwrap();
        let busy = leader.live_gateways("run").unwrap()[0].busy_round;
        gateway.gateway_heartbeat(("run", "b"), beat(1, 1)).unwrap();
        let taken_b = gateway.take_work("run", "b").unwrap().unwrap();
        // Asked again (as after an answer lost with a connection): the
        // same work.
        let again_taken = gateway.take_work("run", "a").unwrap();
        let key = (4, term);
        let partial = [1.0f32, 1.5, -0.5];
        let first = gateway
            .give_back_work("run", "a", key, answer(Some((&partial, 30))))
            .unwrap();
        let again = gateway
            .give_back_work("run", "a", key, answer(Some((&[9.0, 9.0, 9.0], 999))))
            .unwrap();
        let free = leader.live_gateways("run").unwrap()[0].busy_round;
        let owing = leader.work_outstanding("run", key).unwrap();
        let folded = leader.fold_work("run", key).unwrap();
        // b's give-back never got through; asking for work again (it is
        // idle) frees it.
        let b_busy = |store: &PgStore| {
            store
                .live_gateways("run")
                .unwrap()
                .into_iter()
                .find(|g| g.name == "b")
                .unwrap()
                .busy_round
        };
        let b_busy_before = b_busy(&leader);
        assert_eq!(gateway.take_work("run", "b").unwrap(), None);
        let b_busy_after = b_busy(&leader);
        let late = gateway
            .give_back_work("run", "b", key, answer(Some((&partial, 10))))
            .unwrap();
        let folded_again = leader.fold_work("run", key).unwrap();

        // Assert
        assert_eq!(
            (
                taken_a.round,
                taken_a.participants,
                taken_a.model.as_slice()
            ),
            (4, 2, &model[..])
        );
        assert_eq!((taken_b.participants, taken_b.term), (1, term));
        assert_eq!(again_taken.as_ref(), Some(&taken_a));
        assert_eq!(gateway.take_work("run", "c").unwrap(), None);
        assert_eq!(
            taken_a.cap,
            Some(300),
            "the run's cap travels with the work"
        );
        assert!(first && !again, "a partial is taken once");
        assert!(
            gateway
                .give_back_work("run", "a", key, answer(Some((&partial, 30))))
                .unwrap(),
            "the same partial again (a retried call) gets the same answer"
        );
        assert_eq!(
            (busy, free),
            (Some(4), None),
            "busy from taking to giving back"
        );
        assert_eq!(
            owing
                .iter()
                .map(|o| (o.gateway.as_str(), o.taken))
                .collect::<Vec<_>>(),
            vec![("b", true)]
        );
        assert_eq!(
            folded,
            vec![
                Folded {
                    gateway: "a".into(),
                    partial: Some((partial.to_vec(), 30)),
                    each: vec![],
                    largest: 1,
                    detail: None,
                    traffic: TRAFFIC,
                },
                Folded {
                    gateway: "b".into(),
                    partial: None,
                    each: vec![],
                    largest: 0,
                    detail: Some("its partial was not back in time".into()),
                    traffic: Traffic::default(),
                },
            ]
        );
        assert!(!late, "a partial after the fold is refused");
        assert_eq!((b_busy_before, b_busy_after), (Some(4), None));
        assert_eq!(folded_again, folded, "folding again answers the same");
    }

    #[test]
    fn every_result_given_back_is_folded_with_its_own_samples() {
        // Prepare: round 1 placed on gateway a and taken.
        let (_cluster, url) = cluster();
        let (leader, lease) = leader(&url);
        let gateway = PgStore::connect(&url).unwrap();
        let term = lease.term();
        let model = [0.0f32, 0.0];
        leader
            .place_work("run", (1, term), placement(&model), &[("a".into(), 3)])
            .unwrap();
        gateway.take_work("run", "a").unwrap().unwrap();

        // Execute: it gives back its three mediators' results, end to end.
        let laid = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let every = Answer {
            partial: Some((&laid, 60)),
            each: &[10, 20, 30],
            largest: 4,
            ..answer(None)
        };
        let given = gateway
            .give_back_work("run", "a", (1, term), every)
            .unwrap();
        let again = gateway
            .give_back_work("run", "a", (1, term), every)
            .unwrap();
        let folded = leader.fold_work("run", (1, term)).unwrap();

        // Verify
        assert!(given && again);
        assert_eq!(folded[0].partial, Some((laid.to_vec(), 60)));
        assert_eq!(
            (folded[0].each.as_slice(), folded[0].largest),
            (&[10, 20, 30][..], 4)
        );
    }

    #[test]
    fn a_round_placed_again_by_a_new_leader_refuses_the_old_terms_partial() {
        // Prepare: round 2 placed at term 1 and taken.
        let (_cluster, url) = cluster();
        let (leader, lease) = leader(&url);
        let gateway = PgStore::connect(&url).unwrap();
        let old = lease.term();
        leader
            .place_work(
                "run",
                (2, old),
                placement(&[1.0]),
                &[("a".into(), 1), ("b".into(), 1)],
            )
            .unwrap();
        gateway.take_work("run", "a").unwrap().unwrap();
        // A new leader (term + 1) places round 2 again; the old one is
        // fenced from now on.
        leader
            .execute_raw("UPDATE leases SET term = term + 1 WHERE run = 'run'")
            .unwrap();
        let new = PgStore::connect(&url).unwrap();
        new.place_work("run", (2, old + 1), placement(&[2.0]), &[("a".into(), 3)])
            .unwrap();

        // Execute
        let stale = gateway
            .give_back_work("run", "a", (2, old), answer(Some((&[5.0], 10))))
            .unwrap();
        let retaken = gateway.take_work("run", "a").unwrap().unwrap();
        // b, left out of the new leader's shares, has no dead work to train.
        let left_out = gateway.take_work("run", "b").unwrap();
        let ex_leader_places =
            leader.place_work("run", (3, old), placement(&[3.0]), &[("a".into(), 1)]);
        let ex_leader_folds = leader.fold_work("run", (2, old));
        let fresh = gateway
            .give_back_work("run", "a", (2, old + 1), answer(Some((&[6.0], 10))))
            .unwrap();
        let folded = new.fold_work("run", (2, old + 1)).unwrap();

        // Assert
        assert!(!stale, "the old term's partial does not count");
        assert_eq!(left_out, None);
        assert_eq!(
            (retaken.term, retaken.participants, retaken.model),
            (old + 1, 3, vec![2.0])
        );
        assert!(matches!(ex_leader_places, Err(StoreError::Fenced { .. })));
        assert!(matches!(ex_leader_folds, Err(StoreError::Fenced { .. })));
        assert!(fresh);
        assert_eq!(folded.len(), 1);
        assert_eq!(folded[0].partial, Some((vec![6.0], 10)));
    }

    #[test]
    fn folding_a_round_deletes_earlier_rounds_and_their_blobs_only() {
        let (_cluster, url) = cluster();
        let (leader, lease) = leader(&url);
        let gateway = PgStore::connect(&url).unwrap();
        let term = lease.term();
        let blobs = || {
            let (tx, rx) = std::sync::mpsc::channel();
            leader
                .call(move |client| {
                    let n: i64 = client.query_one("SELECT COUNT(*) FROM blobs", &[])?.get(0);
                    let w: i64 = client
                        .query_one("SELECT COUNT(*) FROM gateway_work", &[])?
                        .get(0);
                    let _ = tx.send((n, w));
                    Ok(())
                })
                .unwrap();
            rx.recv().unwrap()
        };
        for round in 1..=3u32 {
            let model = [round as f32];
            leader
                .place_work("run", (round, term), placement(&model), &[("a".into(), 1)])
                .unwrap();
            gateway.take_work("run", "a").unwrap().unwrap();
            let partial = [round as f32 + 0.5];
            assert!(
                gateway
                    .give_back_work("run", "a", (round, term), answer(Some((&partial, 1))))
                    .unwrap()
            );
            leader.fold_work("run", (round, term)).unwrap();
        }
        // Round 3's row and its model and partial remain.
        assert_eq!(blobs(), (2, 1));
    }

    /// A heartbeat of `ready` ready clients of `clients`, settings "c",
    /// no label counts, no plan.
    fn beat(ready: usize, clients: usize) -> Heartbeat<'static> {
        Heartbeat {
            ready,
            clients,
            config: "c",
            declared: None,
            declared_changed: true,
            planned: false,
            totals: None,
        }
    }

    #[test]
    fn a_gateways_label_counts_and_its_plan_go_through_the_store() {
        // Prepare: a run whose leader saved no plan yet, and a gateway
        // that says its clients' counts.
        let (_cluster, url) = cluster();
        let store = PgStore::connect(&url).unwrap();
        store
            .execute_raw("INSERT INTO runs (name, config) VALUES ('run', '')")
            .unwrap();
        let mut counts = Declared::default();
        counts.add(&[30, 0, u32::MAX as usize + 7], true);
        counts.add(&[1, 2, 3], false);
        let unplanned = Heartbeat {
            declared: Some(&counts),
            ..beat(2, 2)
        };
        store.gateway_heartbeat(("run", "a"), unplanned).unwrap();
        let seen = store.live_gateways("run").unwrap();
        assert_eq!(seen[0].declared.as_ref(), Some(&counts));
        assert!(!seen[0].planned);
        assert_eq!(store.run_plan("run").unwrap(), None);
        assert_eq!(store.run_plan("no such run").unwrap(), None);

        // Execute: the leader keeps a plan; the gateway says it holds it
        // and sends no counts.
        store
            .execute_raw("UPDATE runs SET plan = '[0.0, 1.5, 0.25]' WHERE name = 'run'")
            .unwrap();
        let plan = store.run_plan("run").unwrap();
        let planned = Heartbeat {
            planned: true,
            ..beat(1, 2)
        };
        store.gateway_heartbeat(("run", "a"), planned).unwrap();

        // Its clients' totals: kept while a heartbeat says nothing new.
        let totals = [(120u64, 3u64), (9_000_000, 1)];
        let with_totals = Heartbeat {
            totals: Some(&totals),
            ..beat(4, 4)
        };
        store.gateway_heartbeat(("run", "a"), with_totals).unwrap();
        store.gateway_heartbeat(("run", "a"), planned).unwrap();
        let kept = store.live_gateways("run").unwrap()[0].totals.clone();

        // Verify
        assert_eq!(kept, totals.to_vec());
        assert_eq!(plan, Some(vec![0.0, 1.5, 0.25]));
        let seen = store.live_gateways("run").unwrap();
        assert_eq!(seen[0].declared, None);
        assert!(seen[0].planned);
        assert_eq!(seen[0].ready, 1);
    }

    #[test]
    fn gateways_heard_from_lately_are_live_and_ids_come_in_blocks() {
        let (_cluster, url) = cluster();
        let store = PgStore::connect(&url).unwrap();
        store.gateway_heartbeat(("run", "a"), beat(3, 5)).unwrap();
        store.gateway_heartbeat(("run", "b"), beat(0, 1)).unwrap();
        store.gateway_heartbeat(("other", "c"), beat(9, 9)).unwrap();
        store
            .execute_raw(
                "UPDATE gateways SET seen_at = now() - interval '10 seconds' WHERE name = 'b'",
            )
            .unwrap();
        let live = store.live_gateways("run").unwrap();
        assert_eq!(live.len(), 1);
        assert_eq!(
            (live[0].name.as_str(), live[0].ready, live[0].clients),
            ("a", 3, 5)
        );
        let (first, second) = (
            store.client_id_block().unwrap(),
            PgStore::connect(&url).unwrap().client_id_block().unwrap(),
        );
        assert_ne!(first, second);
        assert!(first >= 1 && second >= 1);
    }

    /// Waits on `waker` for at most `at_most`, on a runtime of the test's.
    fn wait(
        waker: &mut super::super::listen::Waker,
        at_most: Duration,
    ) -> super::super::listen::Wake {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(waker.wait(at_most))
    }

    #[test]
    fn the_listener_wakes_for_the_runs_work_and_makes_good_what_it_missed_while_cut() {
        use super::super::listen::{CHANNEL, Wake, Wakes};
        // Prepare: a leader, a gateway's store, a listener of the run that
        // is listening, and an administrator's connection.
        let (cluster, url) = cluster();
        let (leader, lease) = leader(&url);
        let gateway = PgStore::connect(&url).unwrap();
        let term = lease.term();
        let model = [0.5f32, -1.0];
        let shares = [("a".to_string(), 1)];
        let wakes = Wakes::start(&url, "run").unwrap();
        let mut waker = wakes.waker();
        let long = Duration::from_secs(10);
        assert_eq!(wait(&mut waker, long), Wake::Reconnected, "listening");
        let database: String = gateway
            .call(|client| Ok(client.query_one("SELECT current_database()", &[])?.get(0)))
            .unwrap();
        // Connected elsewhere: a database's connections cannot be barred
        // from within it.
        let mut admin =
            postgres::Client::connect(&cluster.url("postgres"), postgres::NoTls).unwrap();
        let cut = |admin: &mut postgres::Client| {
            let cut = admin
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE application_name = 'astraea-listen'",
                    &[],
                )
                .unwrap();
            assert_eq!(cut, 1, "one listener's session");
        };
        let connections = |admin: &mut postgres::Client, allowed: bool| {
            let sql = format!("ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS {allowed}");
            admin.batch_execute(&sql).unwrap();
        };

        // Execute and assert: another run's notification wakes no one;
        // placing the run's work wakes the gateway, giving back wakes the
        // leader.
        gateway
            .execute_raw(&format!("SELECT pg_notify('{CHANNEL}', 'another run')"))
            .unwrap();
        assert_eq!(wait(&mut waker, Duration::from_millis(400)), Wake::TimedOut);
        leader
            .place_work("run", (1, term), placement(&model), &shares)
            .unwrap();
        assert_eq!(wait(&mut waker, long), Wake::Notified);
        assert_eq!(gateway.take_work("run", "a").unwrap().unwrap().round, 1);
        gateway
            .give_back_work("run", "a", (1, term), answer(Some((&model, 3))))
            .unwrap();
        assert_eq!(wait(&mut waker, long), Wake::Notified);
        assert_eq!(leader.fold_work("run", (1, term)).unwrap().len(), 1);

        // Cut, then placed: the work is placed while the listener's session
        // is gone and it cannot connect again, so its notification is
        // lost; listening again wakes the gateway, which re-reads and
        // finds the work.
        connections(&mut admin, false);
        cut(&mut admin);
        leader
            .place_work("run", (2, term), placement(&model), &shares)
            .unwrap();
        assert_eq!(
            wait(&mut waker, Duration::from_secs(1)),
            Wake::TimedOut,
            "nothing is heard while the listener cannot listen"
        );
        connections(&mut admin, true);
        assert_eq!(wait(&mut waker, long), Wake::Reconnected);
        assert_eq!(gateway.take_work("run", "a").unwrap().unwrap().round, 2);

        // Placed, then cut: heard before the cut; the cut wakes again (a
        // re-read that finds the same work, counted once).
        leader
            .place_work("run", (3, term), placement(&model), &shares)
            .unwrap();
        assert_eq!(wait(&mut waker, long), Wake::Notified);
        cut(&mut admin);
        assert_eq!(wait(&mut waker, long), Wake::Reconnected);
        let work = gateway.take_work("run", "a").unwrap().unwrap();
        assert_eq!(work.round, 3);
        let again = gateway.take_work("run", "a").unwrap().unwrap();
        assert_eq!(again, work, "re-read, the same work");
        gateway
            .give_back_work("run", "a", (3, term), answer(Some((&model, 3))))
            .unwrap();
        assert!(
            gateway
                .give_back_work("run", "a", (3, term), answer(Some((&model, 3))))
                .unwrap(),
            "a give-back sent again answers the same"
        );
        let folded = leader.fold_work("run", (3, term)).unwrap();
        assert_eq!(folded.len(), 1);
        assert_eq!(folded[0].partial.as_ref().map(|(_, n)| *n), Some(3));
    }
}
