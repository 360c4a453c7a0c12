//! What a client's word is worth: label counts the server cannot check (an
//! own-data client's reports; a demo shard's are known) are bounded in what
//! they can do. Sample counts weigh updates (FedAvg's n_k / n), steer the
//! mediators and shape the data plan, so a client that declared 9,000,000
//! samples took 99.85 % of every round's weight, and one that declared
//! `[9000000, 0, …]` grew every honest client's data 19 to 46 times for the
//! whole run (issue 22, a client written from the protocol alone).
//!
//! The rule: an unproven client counts for at most [`DECLARED_CAP`] times
//! the median total that the clients declare (proven and unproven alike,
//! so a minority of liars cannot move it): its counts are scaled down to
//! that total for the draw and the mediators, for the data plan, and its
//! updates weigh at most that many samples. An honest own-data client with
//! more data than that counts for less than it holds; that is the price
//! of not being able to check.

/// How many times the median declared total an unproven client may count
/// for.
pub const DECLARED_CAP: u64 = 2;

/// The most samples an unproven client counts for, given every client's
/// declared total (`totals`, in any order): [`DECLARED_CAP`] times their
/// median (the lower median for an even count), and at least 1; `u64::MAX`
/// when there are none.
pub fn declared_cap(totals: &[u64]) -> u64 {
    let pairs: Vec<(u64, u64)> = totals.iter().map(|&t| (t, 1)).collect();
    declared_cap_of(&pairs)
}

/// [`declared_cap`] of totals given as `(total, how many clients declared
/// it)`: the lower median of the multiset, never expanded (a count may be
/// large). Several servers of one run add their clients' counted totals
/// up, so the cap is the run's, not a server's.
pub fn declared_cap_of(totals: &[(u64, u64)]) -> u64 {
    let mut sorted: Vec<(u64, u64)> = totals.iter().copied().filter(|&(_, n)| n > 0).collect();
    let clients: u128 = sorted.iter().map(|&(_, n)| u128::from(n)).sum();
    if clients == 0 {
        return u64::MAX;
    }
    sorted.sort_unstable();
    let at = (clients - 1) / 2;
    let mut seen = 0u128;
    let mut median = 0;
    for (total, n) in sorted {
        seen += u128::from(n);
        if seen > at {
            median = total;
            break;
        }
    }
    median.saturating_mul(DECLARED_CAP).max(1)
}

/// The clients' first label-count reports (before any augmentation plan)
/// as one server holds them, in a form the servers of one run add up
/// ([`Declared::merge`]) so that the plan's input
/// ([`Declared::plan_input`]) is what one server holding every client
/// would compute: each unproven client bounded by the cap over every
/// client's total, the run's, not a server's (a lone liar on a gateway of
/// its own would set its own cap). The plan reads only the sum, so proven
/// clients (demo shards) travel summed; unproven ones one by one.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Declared {
    /// Proven clients' counts, summed class by class.
    pub proven: Vec<u64>,
    /// Proven clients' totals: how many declared each.
    pub proven_totals: std::collections::BTreeMap<u64, u64>,
    /// Each unproven client's counts.
    pub unproven: Vec<Vec<u64>>,
}

impl Declared {
    /// Adds one client's first report (`proven`: its counts are a shard
    /// the server dealt).
    pub fn add(&mut self, counts: &[usize], proven: bool) {
        let counts: Vec<u64> = counts.iter().map(|&n| n as u64).collect();
        let total = counts.iter().fold(0u64, |a, &n| a.saturating_add(n));
        if proven {
            if self.proven.len() < counts.len() {
                self.proven.resize(counts.len(), 0);
            }
            for (sum, n) in self.proven.iter_mut().zip(&counts) {
                *sum = sum.saturating_add(*n);
            }
            *self.proven_totals.entry(total).or_insert(0) += 1;
        } else {
            self.unproven.push(counts);
        }
    }

    /// Adds another server's reports.
    pub fn merge(&mut self, other: &Declared) {
        if self.proven.len() < other.proven.len() {
            self.proven.resize(other.proven.len(), 0);
        }
        for (sum, n) in self.proven.iter_mut().zip(&other.proven) {
            *sum = sum.saturating_add(*n);
        }
        for (&total, &n) in &other.proven_totals {
            let held = self.proven_totals.entry(total).or_insert(0);
            *held = held.saturating_add(n);
        }
        self.unproven.extend(other.unproven.iter().cloned());
    }

    /// Whether every vector has `classes` entries (the proven sum may be
    /// empty only when no proven client reported).
    pub fn fits(&self, classes: usize) -> bool {
        let proven = if self.proven_totals.is_empty() {
            self.proven.is_empty() || self.proven.len() == classes
        } else {
            self.proven.len() == classes
        };
        proven && self.unproven.iter().all(|c| c.len() == classes)
    }

    /// The augmentation plan's input (`Strategy::data_plan`): the proven
    /// clients' sum, and each unproven client's counts within
    /// [`DECLARED_CAP`] times the median total of every client. Empty
    /// when no client reported.
    pub fn plan_input(&self) -> Vec<Vec<usize>> {
        let mut totals: Vec<(u64, u64)> =
            self.proven_totals.iter().map(|(&t, &n)| (t, n)).collect();
        totals.extend(
            self.unproven
                .iter()
                .map(|c| (c.iter().fold(0u64, |a, &n| a.saturating_add(n)), 1)),
        );
        let cap = declared_cap_of(&totals);
        let as_usize = |c: &[u64]| -> Vec<usize> {
            c.iter()
                .map(|&n| usize::try_from(n).unwrap_or(usize::MAX))
                .collect()
        };
        let mut input = Vec::with_capacity(self.unproven.len() + 1);
        if !self.proven_totals.is_empty() {
            input.push(as_usize(&self.proven));
        }
        input.extend(self.unproven.iter().map(|c| bounded(&as_usize(c), cap)));
        input
    }
}

/// `counts` scaled down, class by class in proportion (rounding down), to
/// sum to at most `cap`; unchanged when they already do.
pub fn bounded(counts: &[usize], cap: u64) -> Vec<usize> {
    let total: u128 = counts.iter().map(|&n| n as u128).sum();
    if total <= u128::from(cap) {
        return counts.to_vec();
    }
    counts
        .iter()
        .map(|&n| (n as u128 * u128::from(cap) / total) as usize)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_is_twice_the_median_and_a_liar_cannot_move_it() {
        assert_eq!(declared_cap(&[100, 120, 9_000_000]), 240);
        assert_eq!(declared_cap(&[100, 120, 130, 9_000_000]), 240);
        assert_eq!(declared_cap(&[0, 0, 5]), 1);
        assert_eq!(declared_cap(&[]), u64::MAX);
    }

    /// The plan's input summed class by class (all the plan reads).
    fn summed(input: &[Vec<usize>]) -> Vec<usize> {
        let mut sum = vec![0; input.first().map_or(0, Vec::len)];
        for c in input {
            for (s, n) in sum.iter_mut().zip(c) {
                *s += n;
            }
        }
        sum
    }

    #[test]
    fn reports_split_between_servers_make_the_plan_input_of_one_server() {
        // Four proven clients and three unproven ones, one of them a liar.
        let clients: Vec<(Vec<usize>, bool)> = vec![
            (vec![100, 50, 0], true),
            (vec![90, 60, 10], true),
            (vec![100, 50, 0], true),
            (vec![0, 20, 130], true),
            (vec![40, 40, 40], false),
            (vec![9_000_000, 0, 0], false),
            (vec![10, 0, 300], false),
        ];
        let mut one = Declared::default();
        for (counts, proven) in &clients {
            one.add(counts, *proven);
        }
        // One server, as the plan was computed before gateways: each
        // client's counts, the unproven bounded by the cap over all.
        let totals: Vec<u64> = clients
            .iter()
            .map(|(c, _)| c.iter().sum::<usize>() as u64)
            .collect();
        let cap = declared_cap(&totals);
        let direct: Vec<Vec<usize>> = clients
            .iter()
            .map(|(c, proven)| if *proven { c.clone() } else { bounded(c, cap) })
            .collect();
        assert_eq!(summed(&one.plan_input()), summed(&direct));

        // The liar alone on a gateway of its own, the rest split over two
        // servers: the same input, the liar held to the run's cap (300),
        // not its own (18,000,000).
        let mut leader = Declared::default();
        let mut gateway = Declared::default();
        let mut liar_alone = Declared::default();
        for (i, (counts, proven)) in clients.iter().enumerate() {
            match i {
                5 => liar_alone.add(counts, *proven),
                _ if i % 2 == 0 => leader.add(counts, *proven),
                _ => gateway.add(counts, *proven),
            }
        }
        let wire: Declared =
            serde_json::from_str(&serde_json::to_string(&liar_alone).unwrap()).unwrap();
        leader.merge(&gateway);
        leader.merge(&wire);
        assert_eq!(summed(&leader.plan_input()), summed(&direct));
        assert_eq!(cap, 300);
        assert_eq!(summed(&liar_alone.plan_input()), vec![9_000_000, 0, 0]);
        assert!(leader.fits(3) && !leader.fits(4));
        let mut misshapen = Declared::default();
        misshapen.proven_totals.insert(10, 1);
        assert!(!misshapen.fits(3), "proven totals without their counts");
        assert!(Declared::default().plan_input().is_empty());
    }

    #[test]
    fn the_median_of_counted_totals_is_the_median_of_the_totals_laid_out() {
        assert_eq!(declared_cap_of(&[(100, 2), (9_000, 1)]), 200);
        assert_eq!(declared_cap_of(&[(100, 1), (120, 1), (9_000, 2)]), 240);
        assert_eq!(declared_cap_of(&[(5, u64::MAX), (1, 3)]), 10);
        assert_eq!(declared_cap_of(&[(7, 0)]), u64::MAX);
    }

    #[test]
    fn counts_are_scaled_down_to_the_cap_in_proportion() {
        assert_eq!(bounded(&[9_000_000, 0, 0], 240), vec![240, 0, 0]);
        assert_eq!(bounded(&[300, 100], 200), vec![150, 50]);
        assert_eq!(bounded(&[30, 10], 200), vec![30, 10]);
        let scaled = bounded(&[usize::MAX, usize::MAX], 1000);
        assert!(scaled.iter().sum::<usize>() <= 1000);
    }
}
