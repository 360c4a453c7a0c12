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
    if totals.is_empty() {
        return u64::MAX;
    }
    let mut sorted = totals.to_vec();
    sorted.sort_unstable();
    let median = sorted[(sorted.len() - 1) / 2];
    median.saturating_mul(DECLARED_CAP).max(1)
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

    #[test]
    fn counts_are_scaled_down_to_the_cap_in_proportion() {
        assert_eq!(bounded(&[9_000_000, 0, 0], 240), vec![240, 0, 0]);
        assert_eq!(bounded(&[300, 100], 200), vec![150, 50]);
        assert_eq!(bounded(&[30, 10], 200), vec![30, 10]);
        let scaled = bounded(&[usize::MAX, usize::MAX], 1000);
        assert!(scaled.iter().sum::<usize>() <= 1000);
    }
}
