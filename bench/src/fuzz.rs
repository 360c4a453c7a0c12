//! `astraea bench fuzz`: structure-aware random inputs through the protocol
//! decoders (`astraea_core::protocol::fuzz`) on every core, counting
//! crashes (panics and broken properties; the target is 0) and inputs per
//! second.

use std::time::Instant;

use astraea_core::protocol::fuzz::{self, FuzzReport, Target};

/// What a fuzzing run found, and how fast it went.
#[derive(Debug, Clone)]
pub struct FuzzBench {
    /// The merged report of every thread.
    pub report: FuzzReport,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Threads used.
    pub threads: usize,
}

/// Runs `inputs` inputs split over `threads` threads, thread `t` seeded
/// `seed + t`.
pub fn run(inputs: u64, seed: u64, threads: usize) -> FuzzBench {
    let threads = threads.max(1);
    let started = Instant::now();
    let reports: Vec<FuzzReport> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads as u64)
            .map(|t| {
                let share = inputs / threads as u64 + u64::from(t < inputs % threads as u64);
                scope.spawn(move || fuzz::run(share, seed.wrapping_add(t)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let mut report = FuzzReport::default();
    for part in reports {
        report.inputs += part.inputs;
        report.crashes += part.crashes;
        if report.first_crash.is_none() {
            report.first_crash = part.first_crash;
        }
        for (total, counts) in report.targets.iter_mut().zip(part.targets) {
            total.inputs += counts.inputs;
            total.crashes += counts.crashes;
        }
    }
    FuzzBench {
        report,
        seconds: started.elapsed().as_secs_f64(),
        threads,
    }
}

/// The figures as a Markdown table, one row per target and a total.
pub fn table(bench: &FuzzBench) -> String {
    let mut out = String::from("| target | inputs | crashes |\n|---|---:|---:|\n");
    for target in Target::ALL {
        let counts = bench.report.target(target);
        out.push_str(&format!(
            "| {} | {} | {} |\n",
            target.name(),
            counts.inputs,
            counts.crashes
        ));
    }
    out.push_str(&format!(
        "| all ({} threads, {:.1} s, {:.0} inputs/s) | {} | {} |\n",
        bench.threads,
        bench.seconds,
        bench.report.inputs as f64 / bench.seconds.max(1e-9),
        bench.report.inputs,
        bench.report.crashes
    ));
    out
}
