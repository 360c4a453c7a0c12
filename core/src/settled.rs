//! A median that moves between rounds only, never within one: what the
//! update guard's outlier rule ([`crate::guard`], rule 3) and its loss rule
//! ([`crate::validation`], rule 4) judge a hop against.
//!
//! A round's hops are judged on several threads (serve) or workers
//! (simulate) in whatever order their chains run. Were each value to join
//! the window as it was judged, a hop's verdict would depend on which hops
//! happened to be judged before it. Here the values of a round wait apart
//! ([`SettledWindow::push`]) and join the window when the round closes
//! ([`SettledWindow::settle`], which `engine::round::close` calls for both),
//! in an order of their values, not of their arrival; so every hop of a
//! round meets the same median, and the same hops leave the same window.

use std::collections::VecDeque;

/// The values of the last `capacity` hops of settled rounds, the values of
/// the round being judged, and the median of the former.
#[derive(Debug, Clone)]
pub struct SettledWindow {
    capacity: usize,
    min_len: usize,
    settled: VecDeque<f64>,
    pending: Vec<f64>,
    median: Option<f64>,
}

/// An order of a round's values that depends on their values only, and
/// not on their size (so the oldest round's values evicted first are not
/// its smallest): their bits, scrambled.
fn settle_key(value: f64) -> u64 {
    value.to_bits().wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl SettledWindow {
    /// Keeps the last `capacity` settled values (at least 1); a median
    /// once `min_len` (at least 1) were settled.
    pub fn new(capacity: usize, min_len: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            min_len: min_len.max(1),
            settled: VecDeque::with_capacity(capacity),
            pending: Vec::new(),
            median: None,
        }
    }

    /// The median of the settled values (the upper one of an even count),
    /// or `None` while fewer than `min_len` were settled.
    pub fn median(&self) -> Option<f64> {
        self.median
    }

    /// A value judged in the round now open; it counts from the next
    /// [`SettledWindow::settle`]. A non-finite value is ignored.
    pub fn push(&mut self, value: f64) {
        if value.is_finite() {
            self.pending.push(value);
        }
    }

    /// Closes a round: its values join the window in an order of their
    /// values, the oldest beyond `capacity` leave it, and the median is
    /// taken again.
    pub fn settle(&mut self) {
        let mut pending = std::mem::take(&mut self.pending);
        pending.sort_by_key(|&value| settle_key(value));
        for value in pending {
            if self.settled.len() == self.capacity {
                self.settled.pop_front();
            }
            self.settled.push_back(value);
        }
        self.median = (self.settled.len() >= self.min_len).then(|| {
            let mut sorted: Vec<f64> = self.settled.iter().copied().collect();
            sorted.sort_by(f64::total_cmp);
            sorted[sorted.len() / 2]
        });
    }

    /// The settled values, oldest first (what a run saves).
    pub fn settled(&self) -> Vec<f64> {
        self.settled.iter().copied().collect()
    }

    /// Takes back saved values as settled (the newest `capacity` finite
    /// ones that `keep` accepts); the open round's values are dropped.
    pub fn restore(&mut self, values: &[f64], keep: impl Fn(f64) -> bool) {
        self.pending.clear();
        self.settled.clear();
        let kept: Vec<f64> = values
            .iter()
            .copied()
            .filter(|v| v.is_finite() && keep(*v))
            .collect();
        let skip = kept.len().saturating_sub(self.capacity);
        // In their saved order: they were settled already.
        self.settled.extend(&kept[skip..]);
        self.settle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_count_only_once_their_round_is_settled() {
        let mut window = SettledWindow::new(10, 3);
        for v in [1.0, 2.0, 3.0] {
            window.push(v);
        }
        assert_eq!(window.median(), None, "nothing settled yet");
        window.settle();
        assert_eq!(window.median(), Some(2.0));
        window.push(100.0);
        window.push(f64::NAN);
        assert_eq!(window.median(), Some(2.0), "the open round does not count");
        window.settle();
        assert_eq!(window.settled().len(), 4);
    }

    #[test]
    fn the_same_values_in_another_order_leave_the_same_window() {
        // Prepare: a window of 4 that a round of 6 overflows.
        let round = [0.5, 3.0, 1.5, 9.0, 0.1, 2.0];
        let mut forward = SettledWindow::new(4, 1);
        let mut backward = SettledWindow::new(4, 1);

        // Execute
        round.iter().for_each(|&v| forward.push(v));
        round.iter().rev().for_each(|&v| backward.push(v));
        forward.settle();
        backward.settle();

        // Assert
        assert_eq!(forward.settled(), backward.settled());
        assert_eq!(forward.median(), backward.median());
    }

    #[test]
    fn a_restored_window_keeps_the_newest_values_in_their_order() {
        let mut window = SettledWindow::new(3, 3);
        window.push(7.0);
        window.restore(&[f64::NAN, 5.0, -1.0, 4.0, 1.0, 1.0], |v| v >= 0.0);
        assert_eq!(window.settled(), vec![4.0, 1.0, 1.0]);
        assert_eq!(window.median(), Some(1.0));
    }
}
