//! One mediator's chain as a state machine without I/O (docs/METHOD.md,
//! step 6): the model visits each member in order, `passes` times.
//!
//! The driver asks [`Chain::poll`] what to do next and feeds back what
//! happened; each event returns the [`Effect`]s the driver carries out
//! (acknowledge, record, judge):
//!
//! ```text
//! poll() -> Train(hop)      send hop.weights to hop.member
//!   returned(hop, weights, samples) | skipped(hop, why) | refused(hop, why)
//!     -> [Judge(j)]         compute the loss rule's losses, then verdict(j, v)
//!     -> [Accepted | Refused | Discarded | Skipped]
//! poll() -> Outcome         the hop sent is still out: wait for its event
//! poll() -> Verdict         a verdict is due before anything else
//! poll() -> Done(result)    the chain's result, or why it has none
//! ```
//!
//! Weights are flat vectors (`Weights::values`, the model's parameter
//! count), the same length everywhere in a chain.
//!
//! The rules it owns, the same in `serve` and `simulate`:
//! - A hop the loss rule refuses is taken back: the chain goes on from the
//!   weights before it, with the member's samples as they were.
//! - The loss rule may judge a hop while the next member already trains on
//!   it (the server does: the judgement is most of a short hop's time). If
//!   the judged hop is refused, that next hop trained on weights the chain
//!   no longer has: its member's own update (what it returned less what
//!   it was sent) is moved onto the weights before the refused hop and
//!   judged as any hop, so an honest member's work is kept; the chain
//!   goes on after it, and the member is never sent the earlier weights
//!   (it would learn the refused client's exact update, the difference
//!   from what it was sent first). A masked hop cannot be moved and is
//!   discarded (acknowledged stale); a member that follows itself (a
//!   chain of one) trains again. Both drivers pipeline:
//!   the simulator gives each verdict once the next hop has gone out, as
//!   the server's arrives while the next member trains.
//! - Per-hop noise (`HopPrivacy`) is added to what the next member sees,
//!   after the loss rule has read the update as the client sent it; the
//!   judged loss then no longer describes the chain's weights.
//! - Under secure aggregation the chain's last member masks its last hop:
//!   every verdict is in before the masker trains (its weight counts what
//!   the chain really trained); under client-level DP the chain's weights
//!   are clipped to C (1 - 1/h) before that hop and the masker clips its
//!   own hop to C / h ([`crate::privacy::secure_clip_split`]); a chain
//!   whose masked hop did not answer has no result in the round.
//! - A chain in which no hop was taken has no result.

use rand::rngs::StdRng;

use crate::privacy::{HopPrivacy, clip_update, noisy_hop, secure_clip_split};
use crate::strategy::{Group, GroupFailure, GroupResult};
use crate::validation::LossCheck;

/// What a chain's rules are, fixed for the round.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ChainRules {
    /// Every hop but a masked one goes to the loss rule
    /// ([`crate::validation`]) before it counts.
    pub loss_rule: bool,
    /// Per-hop noise on what the next member sees; `None`: none.
    pub hop_privacy: Option<HopPrivacy>,
    /// Secure aggregation: the chain's last member masks its last hop.
    pub secure: Option<SecureChain>,
}

/// A secure chain's masked last hop under client-level DP.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SecureChain {
    /// The round's clip C, split between the chain and the masker
    /// ([`crate::privacy::secure_clip_split`]); `None` without DP.
    pub dp_clip: Option<f64>,
    /// Distributed DP: the noise (standard deviation) the masker adds to
    /// its clipped hop ([`crate::privacy::distributed_noise_share`]).
    pub masker_noise: Option<f64>,
}

/// The masked last hop of a secure chain: what the task asks of the masker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaskedHop {
    /// The L2 bound on the masker's own hop (C / h), under DP.
    pub clip: Option<f64>,
    /// The noise the masker adds (distributed DP).
    pub noise: Option<f64>,
    /// Samples the chain's other members trained in it: with the masker's
    /// own samples, the chain's weight in the secure sum (without DP).
    pub others: u64,
}

/// One hop to send.
#[derive(Debug, Clone, PartialEq)]
pub struct HopOrder {
    /// Its place among the chain's planned hops, from 0 (`members *
    /// passes` of them): how far the chain has come.
    pub slot: usize,
    /// The chain's count of hops sent, this one included, from 1 (a member
    /// that trains again after a discarded hop gets a new one): the hop's
    /// name in every event about it.
    pub ordinal: u32,
    /// The member that trains it: a `Group::members` entry, numbered as the
    /// driver numbers its clients (the server's ids from 1, the
    /// simulator's indices from 0).
    pub member: usize,
    /// Its pass over the chain and its place in it, from 0.
    pub pass: usize,
    /// Its place in the chain, from 0.
    pub position: usize,
    /// The weights to send.
    pub weights: Vec<f32>,
    /// The member is the chain's last under secure aggregation (its
    /// masker, which must still be in the key exchange).
    pub masker: bool,
    /// The masked last hop; `None` for a hop in the clear.
    pub masked: Option<MaskedHop>,
}

/// A hop for the loss rule: compute [`Judgement::judge`] (or the same
/// losses elsewhere) and hand the verdict to [`Chain::verdict`].
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    /// The hop judged.
    pub ordinal: u32,
    /// The weights it was sent; empty when `known` holds their loss (the
    /// judge needs them only to compute it).
    pub sent: Vec<f32>,
    /// `sent`'s loss, when the chain already knows it.
    pub known: Option<f64>,
    /// The weights it returned, as the client sent them.
    pub new: Vec<f32>,
}

/// The loss rule's verdict on one hop.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Taken: `after` is the validation loss of the weights it returned.
    Accepted {
        /// Loss after, in nats.
        after: f64,
    },
    /// Refused: `before` is the validation loss of the weights it was sent.
    Refused {
        /// Loss before, in nats.
        before: f64,
        /// Why, for the client and the record.
        reason: String,
    },
    /// The judgement itself failed (a panic): the hop is refused.
    Failed(String),
}

impl Judgement {
    /// The loss rule on this hop: `sent`'s loss (or `known`), `new`'s loss,
    /// and `check`'s verdict; a loss that cannot be computed is infinite
    /// (refused). Judging moves the rule's baseline: `check` keeps the
    /// change in its window of recent hops, so judge each hop once.
    pub fn judge(&self, check: &LossCheck) -> Verdict {
        let before = self
            .known
            .unwrap_or_else(|| check.sent_loss(&self.sent).unwrap_or(f64::INFINITY));
        let after = check.loss(&self.new).unwrap_or(f64::INFINITY);
        match check.judge(before, after) {
            Ok(()) => Verdict::Accepted { after },
            Err(refusal) => Verdict::Refused {
                before,
                reason: format!("update rejected: {refusal}"),
            },
        }
    }
}

/// What to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Send this hop; its outcome comes back through [`Chain::returned`],
    /// [`Chain::skipped`] or [`Chain::refused`].
    Train(HopOrder),
    /// The hop sent is still out.
    Outcome,
    /// A [`Judgement`] handed out must come back ([`Chain::verdict`])
    /// first.
    Verdict,
    /// The chain is over: its result, or why it has none.
    Done(Result<GroupResult, GroupFailure>),
}

/// How the hops of a chain (or of a round's chains, added up) ended: each
/// hop handed out ends accepted, refused, discarded or skipped, once
/// ([`Effect`]); a hop still out when a chain is aborted or given up is in
/// none of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HopTally {
    /// Taken into the chain ([`Effect::Accepted`]).
    pub accepted: u64,
    /// Refused by the loss rule or the guard's outlier rule, or a masked
    /// result that could not go into the secure sum ([`Effect::Refused`]).
    pub refused: u64,
    /// Trained on an update the loss rule then refused
    /// ([`Effect::Discarded`]).
    pub discarded: u64,
    /// No update came, or it was refused where it entered (the guard's bounds, the
    /// claim cap): [`Effect::Skipped`].
    pub skipped: u64,
}

impl HopTally {
    /// Counts `effect` (a judgement to make is no outcome yet).
    pub fn count(&mut self, effect: &Effect) {
        match effect {
            Effect::Accepted { .. } => self.accepted += 1,
            Effect::Refused { .. } => self.refused += 1,
            Effect::Discarded { .. } => self.discarded += 1,
            Effect::Skipped { .. } => self.skipped += 1,
            Effect::Judge(_) => {}
        }
    }

    /// Hops that ended, whichever way.
    pub fn total(&self) -> u64 {
        self.accepted + self.refused + self.discarded + self.skipped
    }
}

impl std::ops::AddAssign for HopTally {
    fn add_assign(&mut self, other: Self) {
        self.accepted += other.accepted;
        self.refused += other.refused;
        self.discarded += other.discarded;
        self.skipped += other.skipped;
    }
}

/// What the driver carries out after an event: acknowledgements and
/// records, and judgements to compute.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// The hop counts; tell its member (`ack: accepted`).
    Accepted {
        /// The member.
        member: usize,
        /// The hop.
        ordinal: u32,
    },
    /// The hop's update was refused (`ack: refused`), its member kept: by
    /// the loss rule (`loss_rule`), by the update guard's outlier rule, or
    /// its masked result could not be summed.
    Refused {
        /// The member.
        member: usize,
        /// The hop.
        ordinal: u32,
        /// Why.
        reason: String,
        /// Refused by the loss rule, and held against its member (not when
        /// the hop was moved off an update the rule refused before it:
        /// its member trained on that).
        loss_rule: bool,
    },
    /// The hop trained on an update the loss rule then refused and could
    /// not be moved onto the weights before it (masked, or its member was
    /// the refused one): dropped (`ack: stale`), its member kept.
    Discarded {
        /// The member.
        member: usize,
        /// The hop.
        ordinal: u32,
    },
    /// No update came (the member left, stalled, paused, or was late), or
    /// the driver refused it where it entered (the update guard's bounds,
    /// the claim cap), which drops the client.
    Skipped {
        /// The member.
        member: usize,
        /// The hop.
        ordinal: u32,
        /// Why.
        reason: String,
    },
    /// Judge this hop, then hand the verdict back.
    Judge(Judgement),
}

impl Effect {
    /// The member the effect is about; `None` for a judgement to make.
    pub fn member(&self) -> Option<usize> {
        match *self {
            Effect::Accepted { member, .. }
            | Effect::Refused { member, .. }
            | Effect::Discarded { member, .. }
            | Effect::Skipped { member, .. } => Some(member),
            Effect::Judge(_) => None,
        }
    }
}

/// A hop out, awaiting its outcome.
#[derive(Debug, Clone)]
struct Out {
    ordinal: u32,
    slot: usize,
    member: usize,
    position: usize,
    masked: bool,
    /// Trained on an update the loss rule refused, and moved onto the
    /// weights before it: a refusal of it is not held against its member.
    moved: bool,
}

/// A hop taken into the chain before the loss rule's verdict on it.
#[derive(Debug, Clone)]
struct Unjudged {
    ordinal: u32,
    member: usize,
    position: usize,
    /// The chain's weights before it, and their loss if known.
    before: Vec<f32>,
    before_loss: Option<f64>,
    /// The member's samples before it (an earlier pass's).
    previous_samples: Option<u64>,
    /// It was moved off a refused update (`Out::moved`).
    moved: bool,
}

/// An outcome that came while a verdict was due: handled once it is in.
#[derive(Debug, Clone)]
enum Waiting {
    Returned(Out, Vec<f32>, u64),
    Skipped(Out, String),
    Refused(Out, String),
}

/// One chain (see the module's documentation).
#[derive(Debug)]
pub struct Chain {
    group: usize,
    members: Vec<usize>,
    passes: usize,
    /// (pass, position) of every planned hop.
    plan: Vec<(usize, usize)>,
    rules: ChainRules,
    /// The model the chain started from (DP clips against it).
    start: Vec<f32>,
    weights: Vec<f32>,
    /// The validation loss of `weights`, once known.
    weights_loss: Option<f64>,
    /// Samples each member's last taken hop trained.
    samples: Vec<Option<u64>>,
    next: usize,
    sent: u32,
    out: Option<Out>,
    unjudged: Option<Unjudged>,
    waiting: Option<Waiting>,
    /// A hop still out that trained on an update the loss rule refused
    /// before its outcome came, and what moves it onto the weights before
    /// that update (the weights before less the refused ones), or `None`
    /// to discard it (masked, or its member was the refused one).
    tainted: Option<(u32, Option<Vec<f32>>)>,
    masked_ok: bool,
    failed: Option<String>,
    rng: StdRng,
    tally: HopTally,
}

impl Chain {
    /// Chain `index` of its round for `group`, from the model `start`;
    /// `rng` draws its per-hop noise (seeded by the simulator, from the
    /// operating system's entropy on the server).
    pub fn new(
        index: usize,
        group: &Group,
        start: Vec<f32>,
        rules: ChainRules,
        rng: StdRng,
    ) -> Self {
        let members = group.members.clone();
        let plan = (0..group.passes)
            .flat_map(|pass| (0..members.len()).map(move |position| (pass, position)))
            .collect();
        Self {
            group: index,
            samples: vec![None; members.len()],
            members,
            passes: group.passes,
            plan,
            rules,
            weights: start.clone(),
            start,
            weights_loss: None,
            next: 0,
            sent: 0,
            out: None,
            unjudged: None,
            waiting: None,
            tainted: None,
            masked_ok: false,
            failed: None,
            rng,
            tally: HopTally::default(),
        }
    }

    /// How the chain's hops have ended so far.
    pub fn tally(&self) -> HopTally {
        self.tally
    }

    /// Counts `effects` into the tally and hands them on.
    fn tallied(&mut self, effects: Vec<Effect>) -> Vec<Effect> {
        for effect in &effects {
            self.tally.count(effect);
        }
        effects
    }

    /// Planned hops: members times passes.
    pub fn planned(&self) -> usize {
        self.plan.len()
    }

    /// The chain's weights now.
    pub fn weights(&self) -> &[f32] {
        &self.weights
    }

    /// What to do next.
    pub fn poll(&mut self) -> Next {
        if let Some(reason) = &self.failed {
            // A hop taken before the chain failed still gets its verdict.
            if self.unjudged.is_some() {
                return Next::Verdict;
            }
            return Next::Done(Err(self.failure(reason.clone())));
        }
        if self.out.is_some() {
            return Next::Outcome;
        }
        if self.waiting.is_some() {
            return Next::Verdict;
        }
        let Some(&(pass, position)) = self.plan.get(self.next) else {
            if self.unjudged.is_some() {
                return Next::Verdict;
            }
            return Next::Done(self.result());
        };
        let last_member = position + 1 == self.members.len();
        let masker = self.rules.secure.is_some() && last_member;
        // The masker's weight counts what the chain trained: no hop may
        // still wait for its verdict.
        if masker && self.unjudged.is_some() {
            return Next::Verdict;
        }
        let masked = self
            .rules
            .secure
            .filter(|_| last_member && pass + 1 == self.passes)
            .map(|secure| {
                let clip = secure.dp_clip.map(|clip| {
                    let (chain_clip, hop_clip) = secure_clip_split(clip, self.plan.len());
                    // DP: the server sees all of the chain but the masked
                    // hop, and clips what it sees to C (1 - 1/h).
                    clip_update(&self.start, &mut self.weights, chain_clip);
                    hop_clip
                });
                MaskedHop {
                    clip,
                    noise: secure.masker_noise,
                    others: self
                        .samples
                        .iter()
                        .enumerate()
                        .filter(|&(i, _)| i != position)
                        .filter_map(|(_, s)| *s)
                        .sum(),
                }
            });
        self.sent += 1;
        let order = HopOrder {
            slot: self.next,
            ordinal: self.sent,
            member: self.members[position],
            pass,
            position,
            weights: self.weights.clone(),
            masker,
            masked,
        };
        self.out = Some(Out {
            ordinal: order.ordinal,
            slot: self.next,
            member: order.member,
            position,
            masked: masked.is_some(),
            moved: false,
        });
        self.next += 1;
        Next::Train(order)
    }

    /// The hop `ordinal` came back with `weights` (checked where they
    /// entered: limits, frames, the update guard) that trained `samples`
    /// (at most what its member reported). An outcome for a hop not out
    /// is ignored.
    pub fn returned(&mut self, ordinal: u32, weights: Vec<f32>, samples: u64) -> Vec<Effect> {
        let effects = self.on_returned(ordinal, weights, samples);
        self.tallied(effects)
    }

    fn on_returned(&mut self, ordinal: u32, weights: Vec<f32>, samples: u64) -> Vec<Effect> {
        let Some(out) = self.take_out(ordinal) else {
            return Vec::new();
        };
        let (mut out, mut weights) = (out, weights);
        // Trained on weights the loss rule refused meanwhile: moved onto
        // the weights before them, or discarded (see `on_verdict`).
        if let Some((_, shift)) = self.tainted.take_if(|(t, _)| *t == ordinal) {
            match shift {
                Some(shift) => {
                    weights = shifted(weights, &shift);
                    out.moved = true;
                }
                None => {
                    return vec![Effect::Discarded {
                        member: out.member,
                        ordinal,
                    }];
                }
            }
        }
        if self.unjudged.is_some() {
            self.waiting = Some(Waiting::Returned(out, weights, samples));
            return Vec::new();
        }
        self.take(out, weights, samples)
    }

    /// No update came for hop `ordinal` (`reason`: the member left,
    /// stalled, paused, or missed its deadline).
    pub fn skipped(&mut self, ordinal: u32, reason: String) -> Vec<Effect> {
        let effects = self.on_skipped(ordinal, reason);
        self.tallied(effects)
    }

    fn on_skipped(&mut self, ordinal: u32, reason: String) -> Vec<Effect> {
        let Some(out) = self.take_out(ordinal) else {
            return Vec::new();
        };
        self.tainted.take_if(|(t, _)| *t == ordinal);
        if self.unjudged.is_some() {
            self.waiting = Some(Waiting::Skipped(out, reason));
            return Vec::new();
        }
        vec![Self::skip(out, reason)]
    }

    /// Hop `ordinal`'s update was refused where it entered, its member
    /// kept: far above the median of recent hops (the update guard's rule
    /// 3, `guard::GuardRefusal::drops_client`), or a masked result that
    /// could not go into the secure sum. The chain goes on with the
    /// weights it had; no streak counts it (`draw::Standing` benches for
    /// the loss rule, whose refusals cost the next member's hop too).
    pub fn refused(&mut self, ordinal: u32, reason: String) -> Vec<Effect> {
        let effects = self.on_refused(ordinal, reason);
        self.tallied(effects)
    }

    fn on_refused(&mut self, ordinal: u32, reason: String) -> Vec<Effect> {
        let Some(out) = self.take_out(ordinal) else {
            return Vec::new();
        };
        self.tainted.take_if(|(t, _)| *t == ordinal);
        if self.unjudged.is_some() {
            self.waiting = Some(Waiting::Refused(out, reason));
            return Vec::new();
        }
        vec![Self::masking_refusal(out, reason)]
    }

    /// The chain cannot go on (under secure aggregation: its masker left
    /// the key exchange); it ends without a result, once a hop still
    /// awaiting its verdict has it (it is acknowledged either way). An
    /// outcome for a hop still out is ignored.
    pub fn abort(&mut self, reason: String) {
        self.out = None;
        self.failed = Some(reason);
    }

    fn masking_refusal(out: Out, reason: String) -> Effect {
        Effect::Refused {
            member: out.member,
            ordinal: out.ordinal,
            reason,
            loss_rule: false,
        }
    }

    /// The loss rule's verdict on hop `ordinal` (see [`Judgement`]).
    pub fn verdict(&mut self, ordinal: u32, verdict: Verdict) -> Vec<Effect> {
        let effects = self.on_verdict(ordinal, verdict);
        self.tallied(effects)
    }

    fn on_verdict(&mut self, ordinal: u32, verdict: Verdict) -> Vec<Effect> {
        let Some(pending) = self.unjudged.take_if(|u| u.ordinal == ordinal) else {
            return Vec::new();
        };
        let mut effects = Vec::new();
        let refusal = match verdict {
            Verdict::Accepted { after } => {
                self.weights_loss = self.rules.hop_privacy.is_none().then_some(after);
                effects.push(Effect::Accepted {
                    member: pending.member,
                    ordinal,
                });
                None
            }
            Verdict::Refused { before, reason } => {
                self.weights_loss = Some(before);
                Some(reason)
            }
            Verdict::Failed(why) => {
                self.weights_loss = pending.before_loss;
                Some(format!("update could not be judged: {why}"))
            }
        };
        if let Some(reason) = refusal {
            let refused = std::mem::replace(&mut self.weights, pending.before);
            self.samples[pending.position] = pending.previous_samples;
            effects.push(Effect::Refused {
                member: pending.member,
                ordinal,
                reason,
                // A moved hop's member trained on a refused update: the
                // refusal is not held against it (no streak).
                loss_rule: !pending.moved,
            });
            // What moves a hop trained on the refused weights onto the
            // weights before them: its member's own update is kept, not
            // its starting point.
            let shift: Vec<f32> = self
                .weights
                .iter()
                .zip(&refused)
                .map(|(g, r)| g - r)
                .collect();
            // The hop that trained on the refused weights meanwhile: moved
            // (and judged next, as any hop), unless it is masked (nothing
            // can be moved in a masked vector) or its member is the
            // refused one (it trains again from the weights before).
            if let Some(Waiting::Returned(out, weights, samples)) = self
                .waiting
                .take_if(|waiting| matches!(waiting, Waiting::Returned(..)))
            {
                if out.masked || out.member == pending.member {
                    effects.push(Effect::Discarded {
                        member: out.member,
                        ordinal: out.ordinal,
                    });
                    if out.member == pending.member {
                        self.next = out.slot;
                    }
                } else {
                    let moved = shifted(weights, &shift);
                    let out = Out { moved: true, ..out };
                    self.waiting = Some(Waiting::Returned(out, moved, samples));
                }
            }
            // Or that is still out: moved (or discarded) when it comes
            // back.
            if let Some(out) = &self.out {
                let moved = !out.masked && out.member != pending.member;
                self.tainted = Some((out.ordinal, moved.then(|| shift.clone())));
                if out.member == pending.member {
                    self.next = out.slot;
                }
            }
        }
        match self.waiting.take() {
            Some(Waiting::Returned(out, weights, samples)) => {
                effects.extend(self.take(out, weights, samples));
            }
            Some(Waiting::Skipped(out, reason)) => effects.push(Self::skip(out, reason)),
            Some(Waiting::Refused(out, reason)) => {
                effects.push(Self::masking_refusal(out, reason));
            }
            None => {}
        }
        effects
    }

    fn take_out(&mut self, ordinal: u32) -> Option<Out> {
        self.out.take_if(|out| out.ordinal == ordinal)
    }

    fn skip(out: Out, reason: String) -> Effect {
        Effect::Skipped {
            member: out.member,
            ordinal: out.ordinal,
            reason,
        }
    }

    /// Takes a returned hop into the chain (its verdict to come, or none).
    fn take(&mut self, out: Out, weights: Vec<f32>, samples: u64) -> Vec<Effect> {
        let before = std::mem::replace(&mut self.weights, weights);
        let previous_samples = self.samples[out.position].replace(samples);
        if out.masked {
            // A masked result goes into the secure sum unseen: no rule
            // can read it.
            self.masked_ok = true;
            return vec![Effect::Accepted {
                member: out.member,
                ordinal: out.ordinal,
            }];
        }
        // The weights sent go with it only when their loss is not known:
        // the judge needs them for nothing else (a copy of the model less
        // per hop).
        let judge = self.rules.loss_rule.then(|| Judgement {
            ordinal: out.ordinal,
            sent: match self.weights_loss {
                Some(_) => Vec::new(),
                None => before.clone(),
            },
            known: self.weights_loss,
            new: self.weights.clone(),
        });
        if let Some(hop) = self.rules.hop_privacy {
            noisy_hop(
                &before,
                &mut self.weights,
                hop.clip,
                hop.noise_multiplier,
                &mut self.rng,
            );
        }
        match judge {
            Some(judgement) => {
                self.unjudged = Some(Unjudged {
                    ordinal: out.ordinal,
                    member: out.member,
                    position: out.position,
                    before,
                    before_loss: self.weights_loss,
                    previous_samples,
                    moved: out.moved,
                });
                vec![Effect::Judge(judgement)]
            }
            None => {
                if self.rules.hop_privacy.is_some() {
                    self.weights_loss = None;
                }
                vec![Effect::Accepted {
                    member: out.member,
                    ordinal: out.ordinal,
                }]
            }
        }
    }

    fn failure(&self, reason: String) -> GroupFailure {
        GroupFailure {
            group: self.group,
            reason,
        }
    }

    fn result(&self) -> Result<GroupResult, GroupFailure> {
        if self.samples.iter().all(Option::is_none) {
            return Err(self.failure("every hop was skipped or refused".into()));
        }
        if self.rules.secure.is_some() && !self.masked_ok {
            return Err(self.failure("the masker's hop did not answer".into()));
        }
        Ok(GroupResult {
            group: self.group,
            weights: self.weights.clone(),
            samples: self.samples.iter().flatten().sum(),
        })
    }
}

/// `weights` moved by `shift` (equal lengths: both the model's).
fn shifted(mut weights: Vec<f32>, shift: &[f32]) -> Vec<f32> {
    for (w, d) in weights.iter_mut().zip(shift) {
        *w += d;
    }
    weights
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn chain(members: &[usize], passes: usize, rules: ChainRules) -> Chain {
        let group = Group {
            members: members.to_vec(),
            passes,
        };
        Chain::new(3, &group, vec![0.0; 4], rules, StdRng::seed_from_u64(7))
    }

    fn judged() -> ChainRules {
        ChainRules {
            loss_rule: true,
            ..ChainRules::default()
        }
    }

    fn train(chain: &mut Chain) -> HopOrder {
        match chain.poll() {
            Next::Train(hop) => hop,
            other => panic!("expected a hop, got {other:?}"),
        }
    }

    fn judgement(effects: &[Effect]) -> u32 {
        match effects {
            [Effect::Judge(j)] => j.ordinal,
            other => panic!("expected one judgement, got {other:?}"),
        }
    }

    fn accepted(after: f64) -> Verdict {
        Verdict::Accepted { after }
    }

    fn refused() -> Verdict {
        Verdict::Refused {
            before: 1.0,
            reason: "loss up".into(),
        }
    }

    #[test]
    fn weights_travel_member_to_member_and_the_result_sums_their_samples() {
        let mut chain = chain(&[10, 11], 2, ChainRules::default());
        let mut visits = Vec::new();
        for step in 1..=4u32 {
            let hop = train(&mut chain);
            visits.push((hop.member, hop.pass));
            // Each hop starts from the previous hop's weights.
            assert_eq!(hop.weights, vec![step as f32 - 1.0; 4]);
            let effects = chain.returned(hop.ordinal, vec![step as f32; 4], 5 + step as u64);
            assert_eq!(
                effects,
                vec![Effect::Accepted {
                    member: hop.member,
                    ordinal: hop.ordinal
                }]
            );
        }
        assert_eq!(visits, vec![(10, 0), (11, 0), (10, 1), (11, 1)]);
        match chain.poll() {
            // The last pass's samples of each member: 8 + 9.
            Next::Done(Ok(result)) => {
                assert_eq!((result.group, result.samples), (3, 17));
                assert_eq!(result.weights, vec![4.0; 4]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_skipped_member_is_passed_over_and_the_chain_goes_on_from_the_same_weights() {
        let mut chain = chain(&[1, 2, 3], 1, ChainRules::default());
        let first = train(&mut chain);
        chain.returned(first.ordinal, vec![1.0; 4], 10);
        let second = train(&mut chain);
        let effects = chain.skipped(second.ordinal, "stalled".into());
        assert!(matches!(&effects[..], [Effect::Skipped { member: 2, .. }]));
        let third = train(&mut chain);
        assert_eq!((third.member, third.weights), (3, vec![1.0; 4]));
        chain.returned(third.ordinal, vec![2.0; 4], 20);
        assert!(matches!(chain.poll(), Next::Done(Ok(r)) if r.samples == 30));
    }

    #[test]
    fn a_chain_whose_every_hop_was_skipped_has_no_result() {
        let mut chain = chain(&[1, 2], 1, ChainRules::default());
        for _ in 0..2 {
            let hop = train(&mut chain);
            chain.skipped(hop.ordinal, "left".into());
        }
        assert!(matches!(chain.poll(), Next::Done(Err(f)) if f.group == 3));
    }

    #[test]
    fn a_late_or_duplicate_outcome_is_ignored() {
        let mut chain = chain(&[1, 2], 1, ChainRules::default());
        let first = train(&mut chain);
        assert!(
            chain
                .returned(first.ordinal + 5, vec![9.0; 4], 1)
                .is_empty()
        );
        assert_eq!(chain.poll(), Next::Outcome);
        chain.skipped(first.ordinal, "deadline".into());
        // The update that arrives after its hop was given up changes nothing.
        assert!(chain.returned(first.ordinal, vec![9.0; 4], 1).is_empty());
        let second = train(&mut chain);
        assert_eq!(second.weights, vec![0.0; 4]);
    }

    #[test]
    fn a_refused_hop_is_taken_back_before_the_next_member_trains() {
        // The simulator's order: every verdict before the next poll.
        let mut chain = chain(&[1, 2], 1, judged());
        let first = train(&mut chain);
        let j = judgement(&chain.returned(first.ordinal, vec![5.0; 4], 10));
        let effects = chain.verdict(j, refused());
        assert!(matches!(
            &effects[..],
            [Effect::Refused {
                member: 1,
                loss_rule: true,
                ..
            }]
        ));
        let second = train(&mut chain);
        assert_eq!((second.member, second.weights), (2, vec![0.0; 4]));
        let j = judgement(&chain.returned(second.ordinal, vec![2.0; 4], 7));
        chain.verdict(j, accepted(0.5));
        // Only the second member's samples count.
        assert!(matches!(chain.poll(), Next::Done(Ok(r)) if r.samples == 7));
    }

    #[test]
    fn a_hop_trained_on_a_refused_update_is_moved_onto_the_weights_before_and_judged() {
        // The server's order: the next member trains while the loss rule
        // judges; the verdict comes after its update. The bug: the honest
        // next member's work was discarded with the refused hop.
        let mut chain = chain(&[1, 2, 3], 1, judged());
        let first = train(&mut chain);
        let j = judgement(&chain.returned(first.ordinal, vec![5.0; 4], 10));
        let second = train(&mut chain);
        assert_eq!(
            second.weights,
            vec![5.0; 4],
            "pipelined on the unjudged hop"
        );
        assert!(chain.returned(second.ordinal, vec![6.0; 4], 10).is_empty());
        assert_eq!(chain.poll(), Next::Verdict);
        let effects = chain.verdict(j, refused());
        // Member 2's own update (+1 on what it was sent) is moved onto the
        // weights before member 1's, and judged from their known loss.
        match &effects[..] {
            [Effect::Refused { member: 1, .. }, Effect::Judge(moved)] => {
                assert_eq!(moved.ordinal, second.ordinal);
                assert_eq!(moved.new, vec![1.0; 4]);
                assert_eq!(moved.known, Some(1.0));
            }
            other => panic!("{other:?}"),
        }
        // Member 2 is never sent the weights before member 1's; member 3
        // gets the moved hop.
        let third = train(&mut chain);
        assert_eq!((third.member, third.weights), (3, vec![1.0; 4]));
        assert_eq!(third.slot, 2);
    }

    #[test]
    fn a_chain_of_one_trains_again_after_its_own_refused_hop() {
        let mut chain = chain(&[4], 2, judged());
        let first = train(&mut chain);
        let j = judgement(&chain.returned(first.ordinal, vec![5.0; 4], 10));
        let second = train(&mut chain);
        chain.returned(second.ordinal, vec![6.0; 4], 10);
        chain.verdict(j, refused());
        let again = train(&mut chain);
        assert_eq!((again.member, again.slot, again.ordinal), (4, 1, 3));
        assert_eq!(again.weights, vec![0.0; 4]);
    }

    #[test]
    fn an_accepted_verdict_lets_the_pipelined_hop_be_judged_next() {
        let mut chain = chain(&[1, 2], 1, judged());
        let first = train(&mut chain);
        let j1 = judgement(&chain.returned(first.ordinal, vec![5.0; 4], 10));
        let second = train(&mut chain);
        chain.returned(second.ordinal, vec![6.0; 4], 3);
        let effects = chain.verdict(j1, accepted(0.25));
        match &effects[..] {
            [Effect::Accepted { member: 1, .. }, Effect::Judge(j)] => {
                // The known loss of what it was sent is the accepted hop's.
                assert_eq!((j.ordinal, j.known), (second.ordinal, Some(0.25)));
                // Its weights sent are not copied: the loss is all the
                // judge would want of them.
                assert!(j.sent.is_empty());
            }
            other => panic!("{other:?}"),
        }
        chain.verdict(second.ordinal, accepted(0.2));
        assert!(matches!(chain.poll(), Next::Done(Ok(r)) if r.samples == 13));
    }

    #[test]
    fn a_skip_while_a_verdict_is_due_waits_for_it() {
        let mut chain = chain(&[1, 2, 3], 1, judged());
        let first = train(&mut chain);
        let j = judgement(&chain.returned(first.ordinal, vec![5.0; 4], 10));
        let second = train(&mut chain);
        assert!(chain.skipped(second.ordinal, "left".into()).is_empty());
        let effects = chain.verdict(j, refused());
        // Skipped, not discarded: it sent nothing.
        assert!(matches!(
            &effects[..],
            [Effect::Refused { .. }, Effect::Skipped { member: 2, .. }]
        ));
        assert_eq!(train(&mut chain).member, 3);
    }

    #[test]
    fn a_failed_judgement_refuses_the_hop() {
        let mut chain = chain(&[1], 1, judged());
        let first = train(&mut chain);
        let j = judgement(&chain.returned(first.ordinal, vec![5.0; 4], 10));
        let effects = chain.verdict(j, Verdict::Failed("panicked".into()));
        assert!(
            matches!(&effects[..], [Effect::Refused { reason, .. }] if reason.contains("panicked"))
        );
        assert!(matches!(chain.poll(), Next::Done(Err(_))));
    }

    #[test]
    fn per_hop_noise_changes_what_the_next_member_sees_but_not_what_is_judged() {
        let rules = ChainRules {
            loss_rule: true,
            hop_privacy: Some(HopPrivacy {
                clip: 1.0,
                noise_multiplier: 1.0,
            }),
            secure: None,
        };
        let mut chain = chain(&[1, 2], 1, rules);
        let first = train(&mut chain);
        let j = match &chain.returned(first.ordinal, vec![0.1; 4], 10)[..] {
            [Effect::Judge(j)] => j.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(j.new, vec![0.1; 4], "judged as the client sent it");
        chain.verdict(j.ordinal, accepted(0.5));
        let second = train(&mut chain);
        assert_ne!(second.weights, vec![0.1; 4], "noised for the next member");
        // The judged loss does not describe the noised weights.
        let j = judgement(&chain.returned(second.ordinal, vec![0.2; 4], 10));
        assert_eq!(j, second.ordinal);
        let known = match chain.unjudged.as_ref() {
            Some(u) => u.before_loss,
            None => panic!("judged"),
        };
        assert_eq!(known, None);
    }

    #[test]
    fn the_masker_waits_for_every_verdict_and_its_weight_counts_what_was_taken() {
        let rules = ChainRules {
            loss_rule: true,
            hop_privacy: None,
            secure: Some(SecureChain::default()),
        };
        let mut chain = chain(&[1, 2, 9], 1, rules);
        let first = train(&mut chain);
        assert!(!first.masker);
        let j1 = judgement(&chain.returned(first.ordinal, vec![1.0; 4], 10));
        let second = train(&mut chain);
        let j2 = {
            chain.returned(second.ordinal, vec![2.0; 4], 20);
            chain.verdict(j1, accepted(1.0));
            second.ordinal
        };
        // The masker is not sent before the last verdict is in.
        assert_eq!(chain.poll(), Next::Verdict);
        chain.verdict(j2, refused());
        let masker = train(&mut chain);
        assert!(masker.masker);
        let masked = masker.masked.expect("the last hop is masked");
        assert_eq!(masked.others, 10, "the refused hop's samples do not count");
        assert_eq!(masker.weights, vec![1.0; 4]);
        // A masked result is not judged.
        let effects = chain.returned(masker.ordinal, vec![42.0; 4], 5);
        assert!(matches!(&effects[..], [Effect::Accepted { member: 9, .. }]));
        assert!(matches!(chain.poll(), Next::Done(Ok(r)) if r.samples == 15));
    }

    #[test]
    fn a_secure_chain_whose_masker_did_not_answer_has_no_result() {
        let rules = ChainRules {
            secure: Some(SecureChain::default()),
            ..ChainRules::default()
        };
        let mut chain = chain(&[1, 2], 1, rules);
        let first = train(&mut chain);
        chain.returned(first.ordinal, vec![1.0; 4], 10);
        let masker = train(&mut chain);
        chain.skipped(masker.ordinal, "left".into());
        assert!(
            matches!(chain.poll(), Next::Done(Err(f)) if f.reason.contains("masker")),
            "the chain's other hops do not make a result"
        );
    }

    #[test]
    fn under_dp_the_chain_is_clipped_before_the_masked_hop_and_the_masker_gets_the_rest() {
        let rules = ChainRules {
            secure: Some(SecureChain {
                dp_clip: Some(2.0),
                masker_noise: Some(0.5),
            }),
            ..ChainRules::default()
        };
        let mut chain = chain(&[1, 2], 1, rules);
        let first = train(&mut chain);
        // A move of norm 20 from the start.
        chain.returned(first.ordinal, vec![10.0; 4], 10);
        let masker = train(&mut chain);
        let (chain_clip, hop_clip) = secure_clip_split(2.0, 2);
        let norm = masker.weights.iter().map(|w| w * w).sum::<f32>().sqrt();
        assert!((f64::from(norm) - chain_clip).abs() < 1e-5, "{norm}");
        let masked = masker.masked.expect("masked");
        assert_eq!((masked.clip, masked.noise), (Some(hop_clip), Some(0.5)));
    }

    #[test]
    fn a_masker_out_of_the_key_exchange_ends_the_chain() {
        let rules = ChainRules {
            secure: Some(SecureChain::default()),
            ..ChainRules::default()
        };
        let mut chain = chain(&[1, 2], 2, rules);
        train(&mut chain);
        chain.abort("masker 1 left the key exchange".into());
        assert!(matches!(chain.poll(), Next::Done(Err(f)) if f.reason.contains("key exchange")));
    }

    #[test]
    fn a_moved_hop_the_rule_refuses_too_is_not_held_against_its_member() {
        let mut chain = chain(&[1, 2, 3], 1, judged());
        let first = train(&mut chain);
        let j = judgement(&chain.returned(first.ordinal, vec![5.0; 4], 10));
        let second = train(&mut chain);
        chain.returned(second.ordinal, vec![6.0; 4], 10);
        let moved = match &chain.verdict(j, refused())[..] {
            [
                Effect::Refused {
                    loss_rule: true, ..
                },
                Effect::Judge(moved),
            ] => moved.ordinal,
            other => panic!("{other:?}"),
        };
        let effects = chain.verdict(moved, refused());
        assert!(
            matches!(
                &effects[..],
                [Effect::Refused {
                    member: 2,
                    loss_rule: false,
                    ..
                }]
            ),
            "{effects:?}"
        );
    }

    #[test]
    fn a_verdict_that_comes_before_the_pipelined_hop_returns_moves_it_when_it_does() {
        // The other order of the race: the refusal arrives while the
        // next member still trains on the refused update.
        let mut chain = chain(&[1, 2, 3], 1, judged());
        let first = train(&mut chain);
        let j = judgement(&chain.returned(first.ordinal, vec![5.0; 4], 10));
        let second = train(&mut chain);
        let effects = chain.verdict(j, refused());
        assert!(matches!(&effects[..], [Effect::Refused { member: 1, .. }]));
        let effects = chain.returned(second.ordinal, vec![6.0; 4], 10);
        let moved = match &effects[..] {
            [Effect::Judge(moved)] => moved.clone(),
            other => panic!("{other:?}"),
        };
        // Both orders end alike: member 2's update moved, member 3 gets it.
        assert_eq!(moved.new, vec![1.0; 4]);
        let third = train(&mut chain);
        assert_eq!((third.member, third.weights), (3, vec![1.0; 4]));
        chain.verdict(moved.ordinal, accepted(0.5));
        chain.returned(third.ordinal, vec![2.0; 4], 4);
        let j = match chain.poll() {
            Next::Verdict => third.ordinal,
            other => panic!("{other:?}"),
        };
        chain.verdict(j, accepted(0.1));
        assert!(matches!(chain.poll(), Next::Done(Ok(r)) if r.samples == 14));
        let tally = HopTally {
            accepted: 2,
            refused: 1,
            discarded: 0,
            skipped: 0,
        };
        assert_eq!(chain.tally(), tally);
    }

    #[test]
    fn every_hop_is_tallied_once_however_it_ended() {
        let mut chain = chain(&[1, 2, 3, 4], 1, judged());
        let first = train(&mut chain);
        let j = judgement(&chain.returned(first.ordinal, vec![5.0; 4], 10));
        let second = train(&mut chain);
        // A duplicate outcome changes nothing.
        assert!(chain.returned(first.ordinal, vec![5.0; 4], 10).is_empty());
        chain.verdict(j, refused());
        // Trained on the refused hop: moved, then judged.
        let moved = judgement(&chain.returned(second.ordinal, vec![6.0; 4], 10));
        let third = train(&mut chain);
        chain.skipped(third.ordinal, "left".into());
        chain.verdict(moved, accepted(0.2));
        let fourth = train(&mut chain);
        let j = judgement(&chain.returned(fourth.ordinal, vec![1.0; 4], 4));
        chain.verdict(j, accepted(0.1));
        assert!(matches!(chain.poll(), Next::Done(Ok(_))));
        let tally = chain.tally();
        assert_eq!(
            (
                tally.accepted,
                tally.refused,
                tally.discarded,
                tally.skipped
            ),
            (2, 1, 0, 1)
        );
        assert_eq!(tally.total(), 4);
    }

    #[test]
    fn a_pipelined_hop_skipped_after_its_refusal_is_a_skip() {
        let mut chain = chain(&[1, 2, 3], 1, judged());
        let first = train(&mut chain);
        let j = judgement(&chain.returned(first.ordinal, vec![5.0; 4], 10));
        let second = train(&mut chain);
        chain.verdict(j, refused());
        let effects = chain.skipped(second.ordinal, "left".into());
        assert!(matches!(&effects[..], [Effect::Skipped { member: 2, .. }]));
        assert_eq!(train(&mut chain).member, 3);
    }

    #[test]
    fn an_aborted_chain_still_judges_the_hop_it_took() {
        let mut chain = chain(&[1, 2], 1, judged());
        let first = train(&mut chain);
        let j = judgement(&chain.returned(first.ordinal, vec![5.0; 4], 10));
        chain.abort("the secure round failed".into());
        assert_eq!(chain.poll(), Next::Verdict);
        let effects = chain.verdict(j, accepted(0.3));
        assert!(matches!(&effects[..], [Effect::Accepted { member: 1, .. }]));
        assert!(matches!(chain.poll(), Next::Done(Err(f)) if f.reason.contains("secure")));
    }

    #[test]
    fn a_masked_result_that_cannot_be_summed_is_refused_and_the_chain_fails() {
        let rules = ChainRules {
            secure: Some(SecureChain::default()),
            ..ChainRules::default()
        };
        let mut chain = chain(&[1], 1, rules);
        let masker = train(&mut chain);
        let effects = chain.refused(masker.ordinal, "wrong length".into());
        assert!(matches!(
            &effects[..],
            [Effect::Refused {
                loss_rule: false,
                ..
            }]
        ));
        assert!(matches!(chain.poll(), Next::Done(Err(_))));
    }
}
