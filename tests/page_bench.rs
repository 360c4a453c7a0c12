//! `cargo run -p astraea-e2e --bin page-bench`: the browser client's
//! figures, as a table. It needs the built page (`scripts/build-web`), the
//! datasets (`astraea fetch-data`) and Debian's chromium and chromedriver.
//!
//! - the wasm's size, raw and gzipped;
//! - from opening the page (with `?join=1`) to: backend chosen, data ready,
//!   first training step; once with an empty shard cache and once after a
//!   reload (shard from IndexedDB);
//! - training samples per second in the tab on the CPU, on WebGPU (here
//!   Chromium's software adapter), and in a native client on the same
//!   model and shard;
//! - the same model in TF.js on each of its backends, in the same browser
//!   (`bench/tfjs/`; its npm packages are installed on first use).
//!
//! The tab's figures and TF.js's are measured in one run, side by side.

use std::time::{Duration, Instant};

use astraea_core::protocol::{ModelSpec, TaskSpec, WeightEncoding};
use astraea_core::train::{Samples, Split, train_task, train_task_threads};
use astraea_e2e::{Chromedriver, built_page, demo_config, page_figures, serve_on_loopback};
use astraea_server::state::Phase;

/// One run of the page against a fresh one-tab server.
struct PageRun {
    backend: String,
    reason: String,
    backend_ms: f64,
    ready_ms: f64,
    first_step_ms: f64,
    reload_first_step_ms: f64,
    samples_per_s: f64,
    loop_samples_per_s: f64,
    /// Where hops were split: the tab's own comparison, samples per second
    /// of a split hop and of a hop alone (one each, side by side; from
    /// the helpers being loaded to the update).
    split_alone: Option<(f64, f64)>,
    trial_cpu: Option<f64>,
    trial_gpu: Option<f64>,
}

async fn page_run(
    driver: &Chromedriver,
    query: &str,
    flags: &[&str],
    max_train: usize,
) -> anyhow::Result<PageRun> {
    // Two rounds, one tab: the tab trains two hops (E_m = 2) a round.
    let (running, url) = serve_on_loopback(demo_config(1, max_train, 2, 1)).await?;
    let tab = driver.open(flags).await?;
    tab.goto(&format!("{url}?join=1&{query}")).await?;
    let limit = Instant::now() + Duration::from_secs(900);
    while running.state.status().phase != Phase::Finished {
        anyhow::ensure!(Instant::now() < limit, "the run did not finish");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let page = page_figures(&tab).await?;
    // A reload: same server, the shard now comes from IndexedDB.
    tab.refresh().await?;
    let mut reload_first_step_ms = f64::NAN;
    let reload_limit = Instant::now() + Duration::from_secs(5);
    // The finished run sends no more tasks: time to `ready` then.
    while Instant::now() < reload_limit {
        let again = page_figures(&tab).await?;
        if let Some(ms) = again["readyMs"].as_f64() {
            anyhow::ensure!(
                again["shardCached"] == true,
                "the reload fetched the shard again: {again}"
            );
            reload_first_step_ms = ms;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tab.close().await?;
    running.server.abort();
    let number = |key: &str| page[key].as_f64().unwrap_or(f64::NAN);
    Ok(PageRun {
        backend: page["backend"]["name"].as_str().unwrap_or("?").into(),
        reason: page["backend"]["reason"].as_str().unwrap_or("").into(),
        backend_ms: page["backend"]["ms"].as_f64().unwrap_or(f64::NAN),
        ready_ms: number("readyMs"),
        first_step_ms: number("firstStepMs"),
        reload_first_step_ms,
        samples_per_s: number("samples") / number("seconds"),
        loop_samples_per_s: number("samples") / number("loopSeconds"),
        split_alone: page["workersChosen"]["split"]
            .as_f64()
            .zip(page["workersChosen"]["alone"].as_f64()),
        trial_cpu: page["backend"]["cpuRate"].as_f64(),
        trial_gpu: page["backend"]["gpuRate"].as_f64(),
    })
}

/// A native client's training speed on the same model and shard size, on
/// `threads` threads (a tab has one).
fn native_rate(max_train: usize, threads: usize) -> anyhow::Result<f64> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?
        .install(|| native_rate_here(max_train, (1, Split::Slices)))
}

/// A native client's training speed with each hop shared between
/// `replicas` threads as `split` (`astraea client --threads --split`).
fn native_rate_replicated(max_train: usize, replicas: usize, split: Split) -> anyhow::Result<f64> {
    native_rate_here(max_train, (replicas, split))
}

fn native_rate_here(max_train: usize, (replicas, split): (usize, Split)) -> anyhow::Result<f64> {
    let config = demo_config(1, max_train, 1, 1);
    let (train, _) = astraea_core::data::catalog::load_named(&config.dataset, &config.data_dir)?;
    let train = train.subset(&(0..max_train.min(train.len())).collect::<Vec<_>>());
    let model_config = astraea_core::model::ModelConfig::new(train.num_classes());
    let weights = astraea_core::weights::Weights::from_model(
        &model_config.init(&burn::prelude::Device::flex()),
    );
    let model = ModelSpec::new(&model_config, weights.len());
    let task = TaskSpec {
        round: 1,
        hop: 1,
        epochs: 1,
        batch_size: 20,
        learning_rate: 1e-3,
        prox_mu: 0.0,
        deadline_ms: 60_000,
        stall_ms: None,
        seed: 1,
        encoding: WeightEncoding::F32,
        chunks: 0,
        place: None,
        secure_weight: None,
        secure_clip: None,
        secure_noise: None,
    };
    let samples = Samples {
        images: &train.images,
        labels: &train.labels,
    };
    // One warm-up hop, then three timed.
    let hop = || -> anyhow::Result<()> {
        let values = weights.values.clone();
        let (_, stats) = match replicas {
            1 => train_task(&model, &task, values, samples, &mut |_| {}),
            n => train_task_threads(&model, &task, values, samples, (n, split), &mut |_| {}),
        }?;
        // A row for N threads measures N threads, not one gone on alone.
        anyhow::ensure!(stats.replicas_lost == 0, "a training thread failed");
        Ok(())
    };
    hop()?;
    let started = Instant::now();
    for _ in 0..3 {
        hop()?;
    }
    Ok(3.0 * train.len() as f64 / started.elapsed().as_secs_f64())
}

/// TF.js's samples per second on each backend (`None`: it could not run,
/// with why), on the first `samples` MNIST training samples, in a tab of
/// `driver`'s.
async fn tfjs_rates(
    driver: &Chromedriver,
    samples: usize,
) -> anyhow::Result<Vec<(String, Result<f64, String>)>> {
    let root = astraea_e2e::repo_root();
    let anchor = root.join("bench/tfjs");
    if !anchor.join("node_modules/@tensorflow/tfjs").exists() {
        let status = std::process::Command::new("npm")
            .args(["ci", "--ignore-scripts", "--no-audit", "--no-fund"])
            .current_dir(&anchor)
            .status()?;
        anyhow::ensure!(status.success(), "npm ci in bench/tfjs failed");
    }
    let out = built_page()?.join("tfjs");
    std::fs::create_dir_all(&out)?;
    let modules = anchor.join("node_modules/@tensorflow");
    for (from, name) in [
        (anchor.join("index.html"), "index.html"),
        (anchor.join("train.js"), "train.js"),
        (modules.join("tfjs/dist/tf.min.js"), "tf.min.js"),
        (
            modules.join("tfjs-backend-wasm/dist/tf-backend-wasm.min.js"),
            "tf-backend-wasm.min.js",
        ),
        (
            modules.join("tfjs-backend-wasm/dist/tfjs-backend-wasm.wasm"),
            "tfjs-backend-wasm.wasm",
        ),
        (
            modules.join("tfjs-backend-wasm/dist/tfjs-backend-wasm-simd.wasm"),
            "tfjs-backend-wasm-simd.wasm",
        ),
        (
            modules.join("tfjs-backend-wasm/dist/tfjs-backend-wasm-threaded-simd.wasm"),
            "tfjs-backend-wasm-threaded-simd.wasm",
        ),
    ] {
        std::fs::copy(&from, out.join(name))?;
    }
    let config = demo_config(1, samples, 1, 1);
    let (train, _) = astraea_core::data::catalog::load_named(&config.dataset, &config.data_dir)?;
    let train = train.subset(&(0..samples.min(train.len())).collect::<Vec<_>>());
    std::fs::write(
        out.join("data.bin"),
        astraea_core::data::shard::encode_shard(&train),
    )?;
    let (running, url) = serve_on_loopback(config).await?;
    let tab = driver.open(&["--enable-unsafe-webgpu"]).await?;
    tab.goto(&format!("{url}tfjs/index.html")).await?;
    let limit = Instant::now() + Duration::from_secs(900);
    let results = loop {
        anyhow::ensure!(Instant::now() < limit, "TF.js did not finish");
        let results = tab
            .execute("return window.tfjsResults || null;", vec![])
            .await?;
        if !results.is_null() {
            break results;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    tab.close().await?;
    running.server.abort();
    Ok(results
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|r| {
            let backend = r["backend"].as_str().unwrap_or("?").to_string();
            let rate = r["samplesPerS"]
                .as_f64()
                .ok_or_else(|| r["error"].as_str().unwrap_or("no figure").to_string());
            (backend, rate)
        })
        .collect())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let dir = built_page()?;
    let wasm = std::fs::metadata(dir.join("pkg/astraea_client_bg.wasm"))?.len();
    let gzipped = std::fs::metadata(dir.join("pkg/astraea_client_bg.wasm.gz"))
        .map(|m| m.len())
        .unwrap_or(0);
    let driver = Chromedriver::start()?;
    let cpu = page_run(&driver, "backend=auto", &["--enable-unsafe-webgpu"], 2000).await?;
    let webgpu = page_run(&driver, "backend=webgpu", &["--enable-unsafe-webgpu"], 100).await?;
    let two_workers = page_run(&driver, "backend=cpu&workers=2", &[], 2000).await?;
    let two_local = page_run(&driver, "backend=cpu&workers=2&split=local", &[], 2000).await?;
    let native_two = native_rate_replicated(2000, 2, Split::Slices)?;
    let native_local = native_rate_replicated(2000, 2, Split::Local { sync: 0 })?;
    let tfjs = tfjs_rates(&driver, 2000).await?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let native = native_rate(2000, threads)?;
    let native_one = native_rate(2000, 1)?;

    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| wasm (astraea_client_bg.wasm) | {:.2} MB raw, {:.2} MB gzipped |",
        wasm as f64 / 1e6,
        gzipped as f64 / 1e6
    );
    for (name, run) in [("auto (chose CPU)", &cpu), ("WebGPU forced", &webgpu)] {
        println!(
            "| {name}: page open -> backend chosen / data ready / first step | {:.0} / {:.0} / {:.0} ms |",
            run.backend_ms, run.ready_ms, run.first_step_ms
        );
        println!(
            "| {name}: after a reload (shard from IndexedDB) -> data ready | {:.0} ms |",
            run.reload_first_step_ms
        );
        println!(
            "| {name}: backend, reason | {} — {} |",
            run.backend, run.reason
        );
        println!(
            "| {name}: trial CPU / WebGPU samples/s | {} / {} |",
            run.trial_cpu.map_or("–".into(), |r| format!("{r:.0}")),
            run.trial_gpu.map_or("–".into(), |r| format!("{r:.0}"))
        );
        println!(
            "| {name}: training samples/s in the tab, whole hops / training loop only | {:.0} / {:.0} |",
            run.samples_per_s, run.loop_samples_per_s
        );
    }
    println!(
        "| tab CPU, hops split between 2 workers: samples/s, whole hops / training loop only | {:.0} / {:.0} |",
        two_workers.samples_per_s, two_workers.loop_samples_per_s
    );
    println!(
        "| tab CPU, 2 workers / 1 worker (whole hops) | {:.2}x |",
        two_workers.samples_per_s / cpu.samples_per_s
    );
    for (name, run) in [("batch split", &two_workers), ("local SGD", &two_local)] {
        if let Some((split, alone)) = run.split_alone {
            println!(
                "| tab CPU, {name}: the tab's own comparison, a hop on 2 workers / a hop alone | {split:.0} / {alone:.0} samples/s ({:.2}x) |",
                split / alone
            );
        }
    }
    println!(
        "| tab CPU, hops by local SGD on 2 workers (averaged once a hop; another update): samples/s, whole hops / training loop only | {:.0} / {:.0} |",
        two_local.samples_per_s, two_local.loop_samples_per_s
    );
    println!(
        "| tab CPU, local SGD on 2 workers / 1 worker (whole hops) | {:.2}x |",
        two_local.samples_per_s / cpu.samples_per_s
    );
    println!(
        "| native client (flex), same model and shard, {threads} threads / 1 thread | {native:.0} / {native_one:.0} samples/s |"
    );
    println!(
        "| native client, hops split between 2 threads (--threads 2) | {native_two:.0} samples/s ({:.2}x one thread) |",
        native_two / native_one
    );
    println!(
        "| tab CPU, 2 workers / native, 2 threads split | {:.2}x |",
        two_workers.samples_per_s / native_two
    );
    for (backend, rate) in &tfjs {
        match rate {
            Ok(rate) => println!(
                "| TF.js {backend}: samples/s (same model, batch 20, Adam) / tab CPU, 1 worker (whole hops) | {rate:.0} / {:.1}x |",
                cpu.samples_per_s / rate
            ),
            Err(why) => println!("| TF.js {backend} | could not run: {why} |"),
        }
    }
    if let Some(best) = tfjs
        .iter()
        .filter_map(|(b, r)| r.as_ref().ok().map(|r| (b, *r)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
    {
        println!(
            "| tab CPU, 1 worker / TF.js's best ({}) | {:.1}x |",
            best.0,
            cpu.samples_per_s / best.1
        );
        println!(
            "| tab CPU, local SGD on 2 workers / TF.js's best ({}) | {:.1}x |",
            best.0,
            two_local.samples_per_s / best.1
        );
    }
    println!(
        "| native client, local SGD on 2 threads (--threads 2 --split local) | {native_local:.0} samples/s ({:.2}x one thread) |",
        native_local / native_one
    );
    println!(
        "| tab CPU, local SGD on 2 workers / native, 1 thread | {:.2}x |",
        two_local.samples_per_s / native_one
    );
    println!(
        "| tab CPU (whole hops) / native, {threads} threads / 1 thread | {:.2}x / {:.2}x |",
        cpu.samples_per_s / native,
        cpu.samples_per_s / native_one
    );
    println!(
        "| tab CPU (training loop only) / native, {threads} threads / 1 thread | {:.2}x / {:.2}x |",
        cpu.loop_samples_per_s / native,
        cpu.loop_samples_per_s / native_one
    );
    Ok(())
}
