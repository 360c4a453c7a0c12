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

use crate::partition::kl_to_uniform;

/// How many numbers describe one action ([`Formation::observe`]).
pub const FEATURES: usize = 10;

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
    load: Vec<f64>,
    closed: Vec<bool>,
    unassigned: Vec<usize>,
    scratch: Vec<usize>,
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
        let time: Vec<f64> = (0..c)
            .map(|i| seconds.get(i).and_then(valid).unwrap_or(fallback))
            .collect();
        let size: Vec<f64> = counts
            .iter()
            .map(|v| v.iter().sum::<usize>() as f64)
            .collect();
        let mean_size = (size.iter().sum::<f64>() / c.max(1) as f64).max(1.0);
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
            members: vec![Vec::with_capacity(gamma); m],
            combined: vec![vec![0; num_classes]; m],
            kl: vec![0.0; m],
            load: vec![0.0; m],
            closed: vec![false; m],
            unassigned: (0..c).collect(),
            scratch: Vec::with_capacity(num_classes),
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

    /// The balanced chain time: total expected seconds over the mediators.
    pub fn balanced_time(&self) -> f64 {
        self.balanced
    }

    /// KL to uniform of `agent`'s label mix if it took participant `i`.
    pub fn kl_with(&mut self, agent: usize, i: usize) -> f64 {
        self.scratch.clear();
        let counts = &self.counts[i];
        self.scratch
            .extend(self.combined[agent].iter().zip(counts).map(|(a, b)| a + b));
        kl_to_uniform(&self.scratch)
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
        let c = self.counts.len().max(1) as f64;
        let placed = self.counts.len() - self.unassigned.len();
        let progress = placed as f64 / c;
        let fill = self.members[agent].len() as f64 / self.gamma as f64;
        let longest = self.load.iter().copied().fold(0.0, f64::max) / self.balanced;
        let room: usize = (0..self.members.len())
            .filter(|&j| !self.closed[j])
            .map(|j| self.gamma - self.members[j].len())
            .sum();
        let pressure = self.unassigned.len() as f64 / room.max(1) as f64;
        let kl_now = self.kl[agent];
        let load = self.load[agent];
        let mut actions = Vec::with_capacity(self.unassigned.len() + 1);
        for slot in 0..self.unassigned.len() {
            let i = self.unassigned[slot];
            let kl = self.kl_with(agent, i);
            out.extend_from_slice(&[
                0.0,
                (kl - kl_now) as f32,
                kl as f32,
                (self.time[i] / self.balanced) as f32,
                ((load + self.time[i]) / self.balanced) as f32,
                (self.size[i] / self.mean_size) as f32,
                fill as f32,
                progress as f32,
                longest as f32,
                pressure as f32,
            ]);
            actions.push(Action::Take(i));
        }
        if self.can_close(agent) {
            let mut row = [0.0f32; FEATURES];
            row[CLOSE] = 1.0;
            row[2] = kl_now as f32;
            row[4] = (load / self.balanced) as f32;
            row[6] = fill as f32;
            row[7] = progress as f32;
            row[8] = longest as f32;
            row[9] = pressure as f32;
            out.extend_from_slice(&row);
            actions.push(Action::Close);
        }
        actions
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
                self.kl[agent] = kl_to_uniform(&self.combined[agent]);
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

#[cfg(test)]
mod tests {
    use super::*;

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
