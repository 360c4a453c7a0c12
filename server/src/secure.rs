//! Secure aggregation on the server's side (`serve --secure-aggregation`,
//! `astraea_core::secagg`): the last client of each mediator's chain is a
//! masker; the server runs the key exchange beside the chains, sums the
//! masked results it cannot read and, once the chains are done, unmasks
//! the sum with the survivors' shares. What it learns of the round is the
//! sample-weighted mean of the mediators whose results arrived.
//!
//! Each step waits for every masker it asked, at most [`step_timeout`]; a
//! masker that does not answer in time is left out of that step (it drops
//! out, and its mediator's result with it).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use astraea_core::protocol::{ServerMessage, masked_values};
use astraea_core::secagg::{AdvertisedKeys, EncryptedShare, RevealedShare, SecAggParams, Unmasker};
use tokio::sync::{Notify, OnceCell};
use tokio::time::Instant;

use crate::state::{AppState, lock};

/// How long one step waits for its maskers: the stall timeout (a live
/// client answers a step in milliseconds), at least 2 s, at most 30 s.
pub fn step_timeout(state: &AppState) -> Duration {
    state
        .config
        .stall_timeout
        .clamp(Duration::from_secs(2), Duration::from_secs(30))
}

/// Where a round's secure aggregation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Keys,
    Shares,
    Masking,
    Reveal,
}

#[derive(Debug)]
struct Inner {
    step: Step,
    keys: BTreeMap<u32, AdvertisedKeys>,
    roster: BTreeSet<u32>,
    shares: BTreeMap<u32, Vec<EncryptedShare>>,
    unmasker: Unmasker,
    survivors: BTreeSet<u32>,
    reveals: BTreeMap<u32, Vec<RevealedShare>>,
    /// Each slot's weight in the sum, set as its masked hop goes out.
    weights: BTreeMap<u32, f64>,
    /// Maskers that dropped out with an `error` (no keys, a step that did
    /// not check out): no step waits for them.
    withdrawn: BTreeSet<u32>,
}

/// One round's secure aggregation.
#[derive(Debug)]
pub struct SecureRound {
    params: SecAggParams,
    /// Client id of the masker in each slot (slot `i + 1`).
    maskers: Vec<u64>,
    /// Samples the round's mediators hold in all: a slot's weight is the
    /// samples its chain trained over this.
    total_samples: u64,
    inner: Mutex<Inner>,
    changed: Notify,
    /// The maskers that shared keys, once the exchange is over (or why it
    /// failed).
    sharers: OnceCell<Result<BTreeSet<u32>, String>>,
    /// What its chains are held to (the engine's
    /// `round::secure_chain`): the DP clip and, under distributed DP, the
    /// noise each masker adds to its clipped result (`task.secure_noise`).
    chain: astraea_core::engine::SecureChain,
}

/// A secure-aggregation message that breaks the protocol (the sender is
/// refused); messages for another round or a step already closed are
/// ignored instead, as late ones.
pub type Violation = String;

impl SecureRound {
    /// A round whose maskers are the clients `maskers`, in slot order,
    /// whose mediators hold `total_samples` samples in all, summing vectors
    /// of `len` values; the threshold is `quorum` of the maskers, at least
    /// a majority (`SecAggParams::quorum`).
    ///
    /// # Errors
    /// No maskers, more than `secagg::MAX_MASKERS`, or a quorum outside
    /// (0, 1].
    pub fn new(
        round: u32,
        maskers: &[u64],
        total_samples: u64,
        len: usize,
        quorum: f64,
    ) -> Result<Self, String> {
        let params =
            SecAggParams::quorum(round, maskers.len() as u32, quorum).map_err(|e| e.to_string())?;
        Ok(Self {
            params,
            maskers: maskers.to_vec(),
            total_samples: total_samples.max(1),
            inner: Mutex::new(Inner {
                step: Step::Keys,
                keys: BTreeMap::new(),
                roster: BTreeSet::new(),
                shares: BTreeMap::new(),
                unmasker: Unmasker::new(params, len),
                survivors: BTreeSet::new(),
                reveals: BTreeMap::new(),
                weights: BTreeMap::new(),
                withdrawn: BTreeSet::new(),
            }),
            changed: Notify::new(),
            sharers: OnceCell::new(),
            chain: Default::default(),
        })
    }

    /// The round.
    pub fn round(&self) -> u32 {
        self.params.round
    }

    /// The fewest survivors with which the round's sum can be unmasked.
    pub fn min_survivors(&self) -> usize {
        self.params.min_survivors()
    }

    /// Sets what its chains are held to.
    pub fn set_chain(&mut self, chain: astraea_core::engine::SecureChain) {
        self.chain = chain;
    }

    /// What its chains are held to.
    pub fn chain(&self) -> astraea_core::engine::SecureChain {
        self.chain
    }

    /// The slot of mediator `index` (from 0).
    pub fn slot(&self, index: usize) -> u32 {
        index as u32 + 1
    }

    /// Masker `slot`'s weight under client-level DP: the same for every
    /// mediator (DP-FedAvg averages clipped updates without sample
    /// weights), one over the round's maskers.
    pub fn set_uniform_weight(&self, slot: u32) -> f64 {
        let weight = 1.0 / self.maskers.len().max(1) as f64;
        lock(&self.inner).weights.insert(slot, weight);
        weight
    }

    /// Sets slot `slot`'s weight from the samples its chain trained (the
    /// accepted hops' clients and the masker), as its masked hop goes out;
    /// returns it, in `[0, 1]`.
    pub fn set_weight(&self, slot: u32, samples: u64) -> f64 {
        let weight = (samples as f64 / self.total_samples as f64).clamp(0.0, 1.0);
        lock(&self.inner).weights.insert(slot, weight);
        weight
    }

    /// Client `client` dropped out of the round's aggregation (it sent an
    /// `error`): no step waits for it any more.
    pub fn withdraw(&self, client: u64) {
        if let Some(slot) = self.slot_of(client) {
            lock(&self.inner).withdrawn.insert(slot);
            self.changed.notify_waiters();
        }
    }

    fn slot_of(&self, client: u64) -> Option<u32> {
        self.maskers
            .iter()
            .position(|&id| id == client)
            .map(|i| i as u32 + 1)
    }

    fn masker_slot(&self, client: u64, round: u32) -> Result<Option<u32>, Violation> {
        if round != self.params.round {
            return Ok(None);
        }
        self.slot_of(client)
            .map(Some)
            .ok_or_else(|| format!("client {client} is not a masker of round {round}"))
    }

    /// A masker's `secure-keys`.
    ///
    /// # Errors
    /// A client that is not this round's masker, keys for another slot, or
    /// keys sent twice.
    pub fn on_keys(&self, client: u64, round: u32, keys: AdvertisedKeys) -> Result<(), Violation> {
        let Some(slot) = self.masker_slot(client, round)? else {
            return Ok(());
        };
        if keys.slot != slot {
            return Err(format!(
                "keys for slot {}, the client holds {slot}",
                keys.slot
            ));
        }
        let mut inner = lock(&self.inner);
        if inner.step != Step::Keys {
            return Ok(());
        }
        if inner.keys.insert(slot, keys).is_some() {
            return Err(format!("slot {slot} sent its keys twice"));
        }
        drop(inner);
        self.changed.notify_waiters();
        Ok(())
    }

    /// The clients whose masked results the round's sum holds (the
    /// survivors [`SecureRound::finish`] asked to reveal; none before).
    pub fn masked_clients(&self) -> Vec<u64> {
        let inner = lock(&self.inner);
        inner
            .survivors
            .iter()
            .filter_map(|&slot| self.maskers.get((slot as usize).checked_sub(1)?).copied())
            .collect()
    }

    /// A masker's `secure-shares`.
    ///
    /// # Errors
    /// A client that is not this round's masker, or shares sent twice.
    pub fn on_shares(
        &self,
        client: u64,
        round: u32,
        shares: Vec<EncryptedShare>,
    ) -> Result<(), Violation> {
        let Some(slot) = self.masker_slot(client, round)? else {
            return Ok(());
        };
        let mut inner = lock(&self.inner);
        if inner.step != Step::Shares || !inner.roster.contains(&slot) {
            return Ok(());
        }
        if inner.shares.insert(slot, shares).is_some() {
            return Err(format!("slot {slot} sent its shares twice"));
        }
        drop(inner);
        self.changed.notify_waiters();
        Ok(())
    }

    /// A survivor's `secure-reveal`.
    ///
    /// # Errors
    /// A client that is not this round's masker, or shares revealed twice.
    pub fn on_reveal(
        &self,
        client: u64,
        round: u32,
        shares: Vec<RevealedShare>,
    ) -> Result<(), Violation> {
        let Some(slot) = self.masker_slot(client, round)? else {
            return Ok(());
        };
        let mut inner = lock(&self.inner);
        if inner.step != Step::Reveal || !inner.survivors.contains(&slot) {
            return Ok(());
        }
        if inner.reveals.insert(slot, shares).is_some() {
            return Err(format!("slot {slot} revealed twice"));
        }
        drop(inner);
        self.changed.notify_waiters();
        Ok(())
    }

    fn send(&self, state: &AppState, slot: u32, message: &ServerMessage) {
        let id = self.maskers[(slot - 1) as usize];
        if let Some(entry) = state.clients().get(&id) {
            entry.send(message);
        }
    }

    /// Waits until `done` holds or `deadline` passes.
    async fn wait_until(&self, deadline: Instant, done: impl Fn(&Inner) -> bool) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done(&lock(&self.inner)) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }

    /// Steps 1 and 2, once per round however many callers (the round
    /// starts it; each chain's last hop waits on it): the slots that
    /// shared keys, whose masked results the sum will take.
    ///
    /// # Errors
    /// Fewer maskers than the threshold advertised keys or shared them.
    pub async fn sharers(&self, state: &AppState) -> Result<BTreeSet<u32>, String> {
        self.sharers
            .get_or_init(|| self.exchange(state))
            .await
            .clone()
    }

    async fn exchange(&self, state: &AppState) -> Result<BTreeSet<u32>, String> {
        let wait = step_timeout(state);
        let n = self.params.maskers;
        for slot in 1..=n {
            self.send(
                state,
                slot,
                &ServerMessage::SecureSetup {
                    round: self.params.round,
                    slot,
                    maskers: n,
                    threshold: self.params.threshold,
                },
            );
        }
        self.wait_until(Instant::now() + wait, |i| {
            (1..=n).all(|s| i.keys.contains_key(&s) || i.withdrawn.contains(&s))
        })
        .await;
        let roster = {
            let mut inner = lock(&self.inner);
            let keys: Vec<AdvertisedKeys> = inner.keys.values().copied().collect();
            let roster = inner.unmasker.roster(&keys).map_err(|e| e.to_string())?;
            inner.roster = roster.iter().map(|k| k.slot).collect();
            inner.step = Step::Shares;
            roster
        };
        for keys in &roster {
            self.send(
                state,
                keys.slot,
                &ServerMessage::SecureRoster {
                    round: self.params.round,
                    keys: roster.clone(),
                },
            );
        }
        self.wait_until(Instant::now() + wait, |i| {
            i.roster
                .iter()
                .all(|s| i.shares.contains_key(s) || i.withdrawn.contains(s))
        })
        .await;
        let inboxes = {
            let mut inner = lock(&self.inner);
            let sent = std::mem::take(&mut inner.shares);
            let inboxes = inner.unmasker.route(sent).map_err(|e| e.to_string())?;
            inner.step = Step::Masking;
            inboxes
        };
        for (&slot, shares) in &inboxes {
            self.send(
                state,
                slot,
                &ServerMessage::SecureInbox {
                    round: self.params.round,
                    shares: shares.clone(),
                },
            );
        }
        Ok(inboxes.keys().copied().collect())
    }

    /// Step 3: adds slot `slot`'s masked result, as the connection
    /// assembled it (`masked` encoding: ring elements as `f32` bits).
    ///
    /// # Errors
    /// A slot that did not share, sent twice, or a vector of the wrong
    /// length.
    pub fn add_masked(&self, slot: u32, bits: &[f32]) -> Result<(), String> {
        let mut inner = lock(&self.inner);
        let weight = inner
            .weights
            .get(&slot)
            .copied()
            .ok_or_else(|| format!("slot {slot} was never asked for a masked result"))?;
        inner
            .unmasker
            .add_masked(slot, &masked_values(bits), weight)
            .map_err(|e| e.to_string())
    }

    /// Step 4, once the chains are done: asks the survivors for their
    /// shares and unmasks the sum. Returns the sample-weighted mean of the
    /// survivors' results and how many mediators it holds.
    ///
    /// # Errors
    /// The exchange failed, fewer survivors or shares than the threshold,
    /// or shares that do not rebuild the secrets.
    pub async fn finish(&self, state: &AppState) -> Result<(Vec<f32>, usize), String> {
        self.sharers(state).await?;
        let (survivors, dropped) = {
            let mut inner = lock(&self.inner);
            let (survivors, dropped) = inner.unmasker.unmask_request();
            if survivors.len() < self.params.min_survivors() {
                return Err(format!(
                    "{} masked results arrived, {} needed to unmask",
                    survivors.len(),
                    self.params.min_survivors()
                ));
            }
            inner.survivors = survivors.iter().copied().collect();
            inner.step = Step::Reveal;
            (survivors, dropped)
        };
        for &slot in &survivors {
            self.send(
                state,
                slot,
                &ServerMessage::SecureUnmask {
                    round: self.params.round,
                    survivors: survivors.clone(),
                    dropped: dropped.clone(),
                },
            );
        }
        let expected = survivors.len();
        self.wait_until(Instant::now() + step_timeout(state), |i| {
            i.survivors
                .iter()
                .all(|s| i.reveals.contains_key(s) || i.withdrawn.contains(s))
        })
        .await;
        let (unmasker, reveals) = {
            let mut inner = lock(&self.inner);
            let unmasker = std::mem::replace(&mut inner.unmasker, Unmasker::new(self.params, 0));
            (unmasker, std::mem::take(&mut inner.reveals))
        };
        // Unmasking after dropouts recomputes keystreams for seconds at
        // hundreds of maskers: off the async threads.
        let unmasked = tokio::task::spawn_blocking(move || unmasker.finish(&reveals))
            .await
            .map_err(|e| format!("unmasking panicked: {e}"))?;
        match unmasked {
            Ok((mean, _)) => Ok((mean, expected)),
            Err(failure) => {
                // One masker's shares sank the round, as far as the shares
                // say: it sits secure rounds out, so the next ones go on
                // without it (docs/PRIVACY.md; not refused: colluding
                // revealers can make an honest masker look so).
                let culprit = failure
                    .suspect()
                    .and_then(|slot| self.maskers.get((slot as usize).checked_sub(1)?));
                if let Some(&client) = culprit {
                    let round = self.params.round;
                    lock(&state.suspects).name(client, round);
                    crate::coordinator::name_masker(state, client, round, &failure.to_string());
                }
                Err(failure.to_string())
            }
        }
    }
}
