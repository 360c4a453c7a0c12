//! Aggregation throughput: folding updates into the running sum, against a
//! plain copy of the same bytes measured in the same run.

use std::hint::black_box;
use std::time::Instant;

use astraea_core::aggregate::Aggregator;

/// What the aggregation benchmark measured.
#[derive(Debug, Clone)]
pub struct AggregateBench {
    /// Parameters per update.
    pub params: usize,
    /// Updates folded per pass.
    pub updates: usize,
    /// Gigabytes of update weights folded per second.
    pub fold_gbps: f64,
    /// Gigabytes per second of a plain `copy_from_slice` of the same bytes.
    pub copy_gbps: f64,
    /// Bytes the aggregator holds, whatever the number of updates.
    pub state_bytes: usize,
}

/// Folds `updates` updates of `params` values, `repeats` times, and copies
/// the same bytes as often; reports the best pass of each.
pub fn run(params: usize, updates: usize, repeats: usize) -> AggregateBench {
    let global: Vec<f32> = (0..params).map(|i| (i % 97) as f32 * 0.01).collect();
    // A few distinct updates, reused in turn: each is far larger than the
    // caches, so every fold streams from memory as a real one would.
    let pool: Vec<Vec<f32>> = (0..4)
        .map(|k| global.iter().map(|g| g + 0.001 * (k + 1) as f32).collect())
        .collect();
    let bytes = (params * 4 * updates) as f64;
    let mut best_fold = f64::INFINITY;
    let mut best_copy = f64::INFINITY;
    let mut sink = vec![0.0f32; params];
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        let mut aggregator = Aggregator::new(&global);
        for u in 0..updates {
            aggregator
                .fold(&pool[u % pool.len()], 10 + u as u64)
                .expect("same length, finite");
        }
        black_box(aggregator.finish().expect("samples were folded"));
        best_fold = best_fold.min(start.elapsed().as_secs_f64());

        let start = Instant::now();
        for u in 0..updates {
            sink.copy_from_slice(&pool[u % pool.len()]);
            black_box(&mut sink);
        }
        best_copy = best_copy.min(start.elapsed().as_secs_f64());
    }
    AggregateBench {
        params,
        updates,
        fold_gbps: bytes / best_fold / 1e9,
        copy_gbps: bytes / best_copy / 1e9,
        state_bytes: params * 4,
    }
}
