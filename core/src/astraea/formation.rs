//! Forming a round's mediators as a multi-agent game: every mediator is an
//! agent, the round's participants are one shared pool, and the agents act
//! in turn, each taking one candidate (or closing its chain), until the pool
//! is empty. The speed-aware greedy, the Oort-style rule and the learned
//! scheduler are all policies played on this one board
//! ([`super::scheduler`]); the scheduler's trainer plays it too.
//!
//! What an agent sees is only what the server knows: the candidates'
//! reported (possibly DP-noised) label counts and measured hop times, its
//! own mix and expected chain time, and the round's progress
//! ([`Formation::observe`]).

/// How many numbers describe one action ([`Formation::observe`]).
pub const FEATURES: usize = 10;

/// The longest hop time the board takes, seconds (a year): callers cap
/// hops at their deadline; this only keeps sums finite.
const MAX_HOP_S: f64 = 3.2e7;

/// Index of the "close the chain" flag in an action's features.
const CLOSE: usize = 0;

/// One action open to the agent whose turn it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Take the candidate with this participant index.
    Take(usize),
    /// Close the agent's chain: it takes no one else this round.
    Close,
}

/// What is the same in every action one agent could take at one turn
/// ([`Formation::context`]): the pieces of [`Formation::observe`]'s rows
/// that do not depend on the candidate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Context {
    /// The chain's KL to uniform now, nats.
    pub kl_now: f64,
    /// The chain's expected time over the balanced time.
    pub load: f64,
    /// Members over gamma.
    pub fill: f64,
    /// Placed over participants.
    pub progress: f64,
    /// The longest chain's expected time over the balanced time.
    pub longest: f64,
    /// Candidates left over room left in open chains.
    pub pressure: f64,
}

/// The board: `m = ceil(c / gamma)` mediators, each of at most `gamma`
/// clients, and the candidates not yet placed.
#[derive(Debug, Clone)]
pub struct Formation<'a> {
    counts: &'a [Vec<usize>],
    /// Every participant's expected hop time, seconds (unknown ones as the
    /// median of the known).
    time: Vec<f64>,
    /// Every participant's sample count.
    size: Vec<f64>,
    mean_size: f64,
    gamma: usize,
    /// The balanced chain time: total seconds over `m` (1 when zero, so
    /// times can be divided by it).
    balanced: f64,
    members: Vec<Vec<usize>>,
    combined: Vec<Vec<usize>>,
    kl: Vec<f64>,
    /// Per mediator: its samples `S` and `sum_k n_k ln n_k` over its mix,
    /// so a candidate's KL costs one log per class it holds plus one
    /// ([`Formation::kl_with`]).
    samples: Vec<usize>,
    entropy_sum: Vec<f64>,
    /// Each participant's classes it holds, as `(class, count)` pairs:
    /// `held[starts[i]..starts[i + 1]]`.
    held: Vec<(usize, usize)>,
    starts: Vec<usize>,
    load: Vec<f64>,
    closed: Vec<bool>,
    unassigned: Vec<usize>,
}

impl<'a> Formation<'a> {
    /// A board for the participants' label counts (`counts[i]`, one vector
    /// per participant, all of one length) and expected hop times
    /// (`seconds[i]`: `None`, negative or non-finite is unknown and taken as
    /// the median of the known ones, 0 when none is known).
    pub fn new(counts: &'a [Vec<usize>], seconds: &[Option<f64>], gamma: usize) -> Self {
        let gamma = gamma.max(1);
        let c = counts.len();
        let num_classes = counts.first().map_or(0, Vec::len);
        let valid = |s: &Option<f64>| s.filter(|s| s.is_finite() && *s >= 0.0);
        let mut known: Vec<f64> = seconds.iter().filter_map(valid).collect();
        known.sort_by(f64::total_cmp);
        let fallback = known.get(known.len() / 2).copied().unwrap_or(0.0);
        // At most a year a hop, so no sum of them overflows to infinity.
        let time: Vec<f64> = (0..c)
            .map(|i| seconds.get(i).and_then(valid).unwrap_or(fallback))
            .map(|t| t.min(MAX_HOP_S))
            .collect();
        let size: Vec<f64> = counts
            .iter()
            .map(|v| v.iter().sum::<usize>() as f64)
            .collect();
        let mean_size = (size.iter().sum::<f64>() / c.max(1) as f64).max(1.0);
        let mut held = Vec::new();
        let mut starts = Vec::with_capacity(c + 1);
        for row in counts {
            starts.push(held.len());
            held.extend(row.iter().copied().enumerate().filter(|&(_, n)| n > 0));
        }
        starts.push(held.len());
        let m = c.div_ceil(gamma);
        let total: f64 = time.iter().sum();
        let balanced = if total > 0.0 {
            total / m.max(1) as f64
        } else {
            1.0
        };
        Self {
            counts,
            time,
            size,
            mean_size,
            gamma,
            balanced,
            members: vec![Vec::with_capacity(gamma.min(c)); m],
            combined: vec![vec![0; num_classes]; m],
            kl: vec![0.0; m],
            samples: vec![0; m],
            entropy_sum: vec![0.0; m],
            held,
            starts,
            load: vec![0.0; m],
            closed: vec![false; m],
            unassigned: (0..c).collect(),
        }
    }

    /// The agent whose turn it is: the open mediator with room and the
    /// least expected chain time (ties to the lower index), as in
    /// longest-processing-time-first scheduling; `None` once every
    /// candidate is placed.
    pub fn turn(&self) -> Option<usize> {
        if self.unassigned.is_empty() {
            return None;
        }
        (0..self.members.len())
            .filter(|&j| !self.closed[j] && self.members[j].len() < self.gamma)
            .min_by(|&a, &b| self.load[a].total_cmp(&self.load[b]).then(a.cmp(&b)))
    }

    /// Whether `agent` may close its chain now: it holds someone and the
    /// other open mediators have room for every candidate left.
    pub fn can_close(&self, agent: usize) -> bool {
        if self.members[agent].is_empty() {
            return false;
        }
        let room: usize = (0..self.members.len())
            .filter(|&j| j != agent && !self.closed[j])
            .map(|j| self.gamma - self.members[j].len())
            .sum();
        room >= self.unassigned.len()
    }

    /// The candidates not yet placed, as participant indices.
    pub fn unassigned(&self) -> &[usize] {
        &self.unassigned
    }

    /// The participants' expected hop times, seconds, as the board took
    /// them (unknown ones filled in).
    pub fn hop_times(&self) -> &[f64] {
        &self.time
    }

    /// The mediators so far, as participant indices in the order taken.
    pub fn members(&self) -> &[Vec<usize>] {
        &self.members
    }

    /// Whether mediator `j` was closed before it was full.
    pub fn is_closed(&self, j: usize) -> bool {
        self.closed.get(j).copied().unwrap_or(false)
    }

    /// Mediators closed before they were full.
    pub fn closed(&self) -> usize {
        self.closed.iter().filter(|c| **c).count()
    }

    /// The balanced chain time: total expected seconds over the mediators.
    pub fn balanced_time(&self) -> f64 {
        self.balanced
    }

    /// KL to uniform of `agent`'s label mix if it took participant `i`,
    /// in nats: `ln N + (sum_k n_k ln n_k) / S - ln S` over the combined
    /// counts `n` (`S` their sum, `N` the classes), the same quantity as
    /// `partition::kl_to_uniform`, updated only in the classes `i` holds.
    pub fn kl_with(&self, agent: usize, i: usize) -> f64 {
        let mix = &self.combined[agent];
        let mut sum = self.entropy_sum[agent];
        let mut total = self.samples[agent];
        for &(class, c) in &self.held[self.starts[i]..self.starts[i + 1]] {
            let Some(&m) = mix.get(class) else {
                continue;
            };
            sum += n_ln_n(m + c) - n_ln_n(m);
            total += c;
        }
        kl_from_sums(sum, total, mix.len())
    }

    /// What `agent` sees of each action open to it, appended to `out` as
    /// rows of [`FEATURES`] numbers, in the order of the returned actions:
    /// one `Take` per unassigned candidate, then `Close` where it is legal.
    ///
    /// A row: 0 the close flag; 1 the rise in the chain's KL to uniform (in
    /// nats); 2 the chain's KL after the action; 3 the candidate's hop time
    /// over the balanced chain time; 4 the chain's expected time after the
    /// action over the balanced time; 5 the candidate's samples over the
    /// mean participant's; 6 the chain's fill (members over gamma); 7 the
    /// round's progress (placed over participants); 8 the longest chain's
    /// expected time over the balanced time; 9 the candidates left over the
    /// room left in open chains.
    pub fn observe(&mut self, agent: usize, out: &mut Vec<f32>) -> Vec<Action> {
        let context = self.context(agent);
        let mut actions = Vec::with_capacity(self.unassigned.len() + 1);
        for slot in 0..self.unassigned.len() {
            let i = self.unassigned[slot];
            let kl = self.kl_with(agent, i);
            out.extend_from_slice(&self.take_row(&context, i, kl));
            actions.push(Action::Take(i));
        }
        if self.can_close(agent) {
            out.extend_from_slice(&self.close_row(&context));
            actions.push(Action::Close);
        }
        actions
    }

    /// What is the same in every action `agent` could take now.
    pub fn context(&self, agent: usize) -> Context {
        let c = self.counts.len().max(1) as f64;
        let placed = self.counts.len() - self.unassigned.len();
        let room: usize = (0..self.members.len())
            .filter(|&j| !self.closed[j])
            .map(|j| self.gamma - self.members[j].len())
            .sum();
        Context {
            kl_now: self.kl[agent],
            load: self.load[agent] / self.balanced,
            fill: self.members[agent].len() as f64 / self.gamma as f64,
            progress: placed as f64 / c,
            longest: self.load.iter().copied().fold(0.0, f64::max) / self.balanced,
            pressure: self.unassigned.len() as f64 / room.max(1) as f64,
        }
    }

    /// Participant `i`'s hop time over the balanced time and its samples
    /// over the mean participant's: features 3 and 5 of its rows, fixed
    /// for the round.
    pub fn candidate(&self, i: usize) -> (f64, f64) {
        (self.time[i] / self.balanced, self.size[i] / self.mean_size)
    }

    /// The row of taking participant `i` (whose KL with the chain is
    /// `kl`, from [`Formation::kl_with`]) in `context`.
    pub fn take_row(&self, context: &Context, i: usize, kl: f64) -> [f32; FEATURES] {
        let (time, size) = self.candidate(i);
        [
            0.0,
            (kl - context.kl_now) as f32,
            kl as f32,
            time as f32,
            (context.load + time) as f32,
            size as f32,
            context.fill as f32,
            context.progress as f32,
            context.longest as f32,
            context.pressure as f32,
        ]
    }

    /// The row of closing the chain in `context`.
    pub fn close_row(&self, context: &Context) -> [f32; FEATURES] {
        let mut row = [0.0f32; FEATURES];
        row[CLOSE] = 1.0;
        row[2] = context.kl_now as f32;
        row[4] = context.load as f32;
        row[6] = context.fill as f32;
        row[7] = context.progress as f32;
        row[8] = context.longest as f32;
        row[9] = context.pressure as f32;
        row
    }

    /// Plays `action` for `agent`. Taking a placed candidate, or closing
    /// where [`Formation::can_close`] says no, is ignored (returns false).
    pub fn play(&mut self, agent: usize, action: Action) -> bool {
        match action {
            Action::Take(i) => {
                let Some(slot) = self.unassigned.iter().position(|&u| u == i) else {
                    return false;
                };
                if self.closed[agent] || self.members[agent].len() >= self.gamma {
                    return false;
                }
                self.unassigned.remove(slot);
                for (total, n) in self.combined[agent].iter_mut().zip(&self.counts[i]) {
                    *total += n;
                }
                self.samples[agent] = self.combined[agent].iter().sum();
                self.entropy_sum[agent] = self.combined[agent].iter().map(|&n| n_ln_n(n)).sum();
                self.kl[agent] = kl_from_sums(
                    self.entropy_sum[agent],
                    self.samples[agent],
                    self.combined[agent].len(),
                );
                self.load[agent] += self.time[i];
                self.members[agent].push(i);
                true
            }
            Action::Close => {
                if !self.can_close(agent) {
                    return false;
                }
                self.closed[agent] = true;
                true
            }
        }
    }

    /// The mediators formed, as lists of participant indices in the order
    /// they were taken (the order the model travels); empty ones dropped.
    pub fn finish(self) -> Vec<Vec<usize>> {
        let mut members = self.members;
        members.retain(|g| !g.is_empty());
        members
    }
}

/// Natural logs of 0..LOGS (0 for 0), made once: a formation of 1,000
/// participants evaluates half a million candidate mixes, each a few logs.
const LOGS: usize = 1 << 16;

fn ln_of(n: usize) -> f64 {
    static TABLE: std::sync::OnceLock<Vec<f64>> = std::sync::OnceLock::new();
    match TABLE
        .get_or_init(|| {
            (0..LOGS)
                .map(|n| if n == 0 { 0.0 } else { (n as f64).ln() })
                .collect()
        })
        .get(n)
    {
        Some(&ln) => ln,
        None => (n as f64).ln(),
    }
}

/// `n ln n`, 0 for 0.
fn n_ln_n(n: usize) -> f64 {
    n as f64 * ln_of(n)
}

/// KL to uniform over `classes` from `sum_k n_k ln n_k` and `S = sum_k
/// n_k`: `ln N + sum / S - ln S` (0 for no samples; rounding below 0 is
/// taken as 0).
fn kl_from_sums(sum: f64, total: usize, classes: usize) -> f64 {
    if total == 0 || classes == 0 {
        return 0.0;
    }
    let s = total as f64;
    (ln_of(classes) + sum / s - ln_of(total)).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::kl_to_uniform;

    #[test]
    fn absurd_hop_times_leave_every_feature_finite() {
        // Two clients claiming hops of 1e308 s (finite, as a crawl of a
        // speed would give): their sum overflowed, the balanced time was
        // infinite and a chain of both had load inf / inf.
        let counts = vec![vec![5, 5]; 4];
        let seconds = [Some(1e308), Some(1e308), Some(2.0), Some(3.0)];
        let mut board = Formation::new(&counts, &seconds, 4);
        board.play(0, Action::Take(0));
        board.play(0, Action::Take(1));
        let mut rows = Vec::new();
        board.observe(0, &mut rows);
        assert!(rows.iter().all(|x| x.is_finite()), "{rows:?}");
        // The honest clients' times still show.
        assert!(rows[3] > 0.0, "{rows:?}");
    }

    #[test]
    fn the_incremental_kl_is_the_partition_kl() {
        let counts = vec![vec![7, 0, 3, 0], vec![0, 9, 1, 4], vec![2, 2, 2, 2]];
        let mut board = Formation::new(&counts, &[], 3);
        let mut combined = vec![0usize; 4];
        for (i, row) in counts.iter().enumerate() {
            let sum: Vec<usize> = combined.iter().zip(row).map(|(a, b)| a + b).collect();
            let want = kl_to_uniform(&sum);
            let got = board.kl_with(0, i);
            assert!((got - want).abs() < 1e-12, "{got} against {want}");
            board.play(0, Action::Take(i));
            combined = sum;
        }
        let fresh = Formation::new(&counts, &[], 3);
        assert_eq!(fresh.kl_with(0, 2), 0.0, "a balanced client alone");
    }

    #[test]
    fn closing_is_legal_only_when_the_others_can_take_the_rest() {
        // Prepare: 4 candidates, gamma 2: two agents.
        let counts = vec![vec![1, 0]; 4];
        let mut board = Formation::new(&counts, &[None; 4], 2);

        // An empty chain may not close; after one member, agent 0 could
        // close only if agent 1 had room for the other 3 (it has 2).
        assert!(!board.can_close(0));
        assert!(board.play(0, Action::Take(0)));
        assert!(!board.can_close(0));
        assert!(!board.play(0, Action::Close));
        let agent = board.turn().unwrap();
        assert_eq!(agent, 0, "loads tie at 0, the lower index plays");
        assert!(board.play(0, Action::Take(1)));
        // Agent 0 is full; agent 1 takes the rest.
        assert_eq!(board.turn(), Some(1));
        assert!(!board.play(1, Action::Take(1)), "already placed");
        assert!(board.play(1, Action::Take(2)));
        assert!(board.play(1, Action::Take(3)));
        assert_eq!(board.turn(), None);
        assert_eq!(board.finish(), vec![vec![0, 1], vec![2, 3]]);
    }

    #[test]
    fn observations_describe_every_legal_action() {
        let counts = vec![vec![10, 0], vec![0, 10], vec![5, 5]];
        let seconds = [Some(1.0), Some(3.0), None];
        let mut board = Formation::new(&counts, &seconds, 3);
        let mut rows = Vec::new();

        let actions = board.observe(0, &mut rows);

        assert_eq!(
            actions,
            vec![Action::Take(0), Action::Take(1), Action::Take(2)]
        );
        assert_eq!(rows.len(), 3 * FEATURES);
        // The unknown time is the median of the known ones (3.0); one
        // mediator, so the balanced time is the total, 7.
        assert!((rows[2 * FEATURES + 3] - 3.0 / 7.0).abs() < 1e-6);
        // A one-class client alone: KL = ln 2; the balanced one: 0.
        assert!((rows[1] - std::f32::consts::LN_2).abs() < 1e-6);
        assert!(rows[2 * FEATURES + 1].abs() < 1e-6);
        // After a take, closing is legal (no one else needs the room? no:
        // with one mediator, closing would strand the rest).
        board.play(0, Action::Take(2));
        rows.clear();
        assert_eq!(board.observe(0, &mut rows).len(), 2);
    }
}
