//! `astraea simulate` end to end through the real binary, on a small IDX
//! fixture this test writes: the CSVs, the plot and the summary appear and
//! the federation learns far above chance.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A fresh, empty folder under the system temp dir.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("astraea-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes IDX image and label files of `n` 28x28 images of 10 classes: class
/// k is a bright bar on rows 2k+3..2k+5, plus seeded noise.
fn write_fixture(dir: &Path, prefix: &str, n: usize, seed: u32) {
    let mut images = vec![0, 0, 8, 3];
    for dim in [n as u32, 28, 28] {
        images.extend(dim.to_be_bytes());
    }
    let mut labels = vec![0, 0, 8, 1];
    labels.extend((n as u32).to_be_bytes());
    let mut state = seed.wrapping_mul(2_654_435_761).max(1);
    for i in 0..n {
        let class = (i * 7 + i / 10) % 10;
        labels.push(class as u8);
        for row in 0..28 {
            for _ in 0..28 {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                let noise = (state % 90) as u8;
                let bar = row >= 2 * class + 3 && row < 2 * class + 6;
                images.push(if bar { 160 + noise } else { noise });
            }
        }
    }
    std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), images).unwrap();
    std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), labels).unwrap();
}

#[test]
fn simulate_writes_csvs_plot_and_summary_and_learns() {
    // Prepare: a fixture laid out like data/mnist.
    let root = temp_dir("simulate-cli");
    let mnist = root.join("data/mnist");
    std::fs::create_dir_all(&mnist).unwrap();
    write_fixture(&mnist, "train", 1200, 1);
    write_fixture(&mnist, "t10k", 300, 2);
    let out = root.join("out");

    // Execute
    let output = Command::new(env!("CARGO_BIN_EXE_astraea"))
        .args([
            "simulate",
            "--dataset",
            "mnist",
            "--partition",
            "long-tail:5",
        ])
        .args(["--clients", "20", "--participants", "10", "--rounds", "4"])
        .args([
            "--strategies",
            "fedavg,astraea",
            "--seeds",
            "3",
            "--threads",
            "2",
        ])
        .arg("--data-dir")
        .arg(root.join("data"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();

    // Assert
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("astraea s3"), "{stdout}");
    let csv = std::fs::read_to_string(out.join("astraea-s3.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], astraea_sim::report::CSV_HEADER);
    assert_eq!(lines.len(), 5, "{csv}");
    let best = lines[1..]
        .iter()
        .map(|l| l.split(',').nth(1).unwrap().parse::<f64>().unwrap())
        .fold(0.0, f64::max);
    assert!(
        best > 0.5,
        "astraea best accuracy {best} is not well above chance (0.1)"
    );
    assert!(out.join("fedavg-s3.csv").exists());
    let png = std::fs::read(out.join("accuracy.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(
        std::fs::read_to_string(out.join("summary.md"))
            .unwrap()
            .contains("fedavg s3")
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_missing_dataset_names_the_fetch_command() {
    let root = temp_dir("simulate-missing");

    let output = Command::new(env!("CARGO_BIN_EXE_astraea"))
        .args(["simulate", "--dataset", "fashion-mnist", "--rounds", "1"])
        .arg("--data-dir")
        .arg(&root)
        .output()
        .unwrap();

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("astraea fetch-data"), "{stderr}");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn an_impossible_time_limit_is_refused_with_its_name_in_every_command() {
    // A hop deadline no clock can hold, a negative one, a stall timeout of
    // two days: each command refuses the flag by name and exits, where
    // `serve` panicked on the first two before reading any data. So are
    // the simulator's engine settings (a stack of none was taken as one,
    // silently; a GPU in a build without one), and a scheduler that is
    // not one or whose policy file cannot be read.
    let cases: [&[&str]; 10] = [
        &["serve", "--hop-deadline", "1e308"],
        &["serve", "--hop-deadline=-1"],
        &["serve", "--stall-timeout", "172800"],
        &["simulate", "--hop-deadline", "1e308"],
        &["simulate", "--stack", "0"],
        &["simulate", "--engine", "vmap"],
        &["simulate", "--device", "tpu"],
        &["simulate", "--scheduler", "fastest"],
        &["simulate", "--scheduler", "speed-aware:-1"],
        &[
            "serve",
            "--scheduler",
            "learned:/nonexistent/policy.safetensors",
        ],
    ];
    for args in cases {
        let output = Command::new(env!("CARGO_BIN_EXE_astraea"))
            .args(args)
            .args(["--data-dir", "/nonexistent"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} ran");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        let flag = args[1].split('=').next().unwrap();
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
}

#[test]
fn a_trained_scheduler_policy_is_what_simulate_runs() {
    // Prepare: the fixture federation; a short training writes a policy.
    let root = temp_dir("train-scheduler");
    let mnist = root.join("data/mnist");
    std::fs::create_dir_all(&mnist).unwrap();
    write_fixture(&mnist, "train", 1200, 1);
    write_fixture(&mnist, "t10k", 300, 2);
    let policy = root.join("policy.safetensors");
    let federation = [
        "--dataset",
        "mnist",
        "--partition",
        "long-tail:5",
        "--clients",
        "20",
        "--participants",
        "10",
        "--gamma",
        "3",
        "--speeds",
        "lognormal:200:100",
    ];

    // Execute: train, then simulate with the policy.
    let trained = Command::new(env!("CARGO_BIN_EXE_astraea"))
        .arg("train-scheduler")
        .args(federation)
        .args([
            "--iterations",
            "3",
            "--episodes",
            "2",
            "--judge-rounds",
            "5",
        ])
        .arg("--data-dir")
        .arg(root.join("data"))
        .arg("--policy")
        .arg(&policy)
        .output()
        .unwrap();
    let simulated = Command::new(env!("CARGO_BIN_EXE_astraea"))
        .arg("simulate")
        .args(federation)
        .args(["--rounds", "2", "--strategies", "astraea", "--threads", "2"])
        .arg(format!("--scheduler=learned:{}", policy.display()))
        .arg("--data-dir")
        .arg(root.join("data"))
        .arg("--out")
        .arg(root.join("out"))
        .output()
        .unwrap();

    // Assert: the policy carries its training; the run used it (every
    // mediator of at most 3 clients).
    let stdout = String::from_utf8_lossy(&trained.stdout);
    assert!(
        trained.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&trained.stderr)
    );
    assert!(stdout.contains("| learned |"), "{stdout}");
    let bytes = std::fs::read(&policy).unwrap();
    let read = astraea_core::astraea::Policy::from_safetensors(&bytes).unwrap();
    assert!(
        read.training.contains("\"iterations\":3"),
        "{}",
        read.training
    );
    assert!(
        simulated.status.success(),
        "{}",
        String::from_utf8_lossy(&simulated.stderr)
    );
    let csv = std::fs::read_to_string(root.join("out/astraea-s1.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
    assert!(
        !String::from_utf8_lossy(&simulated.stderr).contains("warning: --scheduler learned"),
        "no warning in synchronous rounds"
    );

    // A policy in the asynchronous mode runs, with a warning: it was
    // trained on synchronous rounds.
    let asynchronous = Command::new(env!("CARGO_BIN_EXE_astraea"))
        .arg("simulate")
        .args(federation)
        .args([
            "--rounds",
            "1",
            "--strategies",
            "astraea",
            "--mode",
            "async",
        ])
        .arg(format!("--scheduler=learned:{}", policy.display()))
        .arg("--data-dir")
        .arg(root.join("data"))
        .arg("--out")
        .arg(root.join("out-async"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&asynchronous.stderr);
    assert!(asynchronous.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: --scheduler learned in --mode async"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&root);
}
