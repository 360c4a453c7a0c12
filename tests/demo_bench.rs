//! `cargo run -p astraea-e2e --bin demo-bench [-- TABS LIMIT_S [--page QUERY] [SERVE FLAGS...]]`:
//! the demo as its volunteers get it. It starts the real `astraea serve`
//! with `scripts/demo.toml` (the settings `scripts/demo` runs) on loopback,
//! opens TABS headless Chromium tabs (default 4) that join (each at
//! `/?join=1&QUERY` with `--page QUERY`, e.g. `--page workers=2`: every tab
//! lending two cores), and prints the
//! test accuracy after each round against the seconds since the tabs were
//! opened, then the seconds to 90 % and 95 %. It stops at 95 % or after
//! LIMIT_S seconds (default 300). Needs the built page (`scripts/build-web`),
//! the `astraea` binary (`$CARGO_TARGET_DIR/debug/astraea`, or
//! `ASTRAEA_BIN`), MNIST in `data/`, and Debian's chromium and chromedriver.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use astraea_e2e::{Chromedriver, built_page, page_figures, repo_root};

/// The server process, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn astraea_bin() -> std::path::PathBuf {
    if let Some(bin) = std::env::var_os("ASTRAEA_BIN") {
        return bin.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    target.join("debug/astraea")
}

/// (round, accuracy) of every finished round, from `/api/rounds`.
async fn rounds(address: &str) -> anyhow::Result<Vec<(u64, f64)>> {
    let response = astraea_server::loopback::get(address, "/api/rounds").await?;
    let body: serde_json::Value = serde_json::from_slice(&response.body)?;
    let list = body
        .as_array()
        .or_else(|| body["rounds"].as_array())
        .cloned()
        .unwrap_or_default();
    Ok(list
        .iter()
        .filter_map(|r| Some((r["round"].as_u64()?, r["accuracy"].as_f64()?)))
        .collect())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let tabs: usize = args.next().map_or(Ok(4), |a| a.parse())?;
    let limit = Duration::from_secs(args.next().map_or(Ok(300), |a| a.parse())?);
    let mut extra: Vec<String> = args.collect();
    // The page's own parameters, for every tab.
    let query = match extra.iter().position(|a| a == "--page") {
        Some(at) if at + 1 < extra.len() => {
            let query = extra.remove(at + 1);
            extra.remove(at);
            format!("&{query}")
        }
        Some(_) => anyhow::bail!("--page takes the page's query, e.g. --page workers=2"),
        None => String::new(),
    };
    let root = repo_root();
    let static_dir = built_page()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let address = format!("127.0.0.1:{port}");
    let _server = Server(
        Command::new(astraea_bin())
            .current_dir(&root)
            .args(["serve", "--config", "scripts/demo.toml", "--bind", &address])
            .arg("--static-dir")
            .arg(&static_dir)
            .args(&extra)
            .env_remove("ASTRAEA_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let started = Instant::now();
    while astraea_server::loopback::get(&address, "/api/status")
        .await
        .is_err()
    {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "the server did not start"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let driver = Chromedriver::start()?;
    let mut open = Vec::new();
    for _ in 0..tabs {
        let tab = driver.open(&[]).await?;
        tab.goto(&format!("http://{address}/?join=1{query}"))
            .await?;
        open.push(tab);
    }
    let opened = Instant::now();
    let mut seen = 0;
    let (mut to_90, mut to_95) = (None, None);
    println!("| round | s since the tabs opened | test accuracy % |");
    println!("|---:|---:|---:|");
    while opened.elapsed() < limit && to_95.is_none() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = opened.elapsed().as_secs_f64();
        for (round, accuracy) in rounds(&address).await?.into_iter().skip(seen) {
            seen += 1;
            println!("| {round} | {now:.0} | {:.2} |", accuracy * 100.0);
            if accuracy >= 0.90 && to_90.is_none() {
                to_90 = Some(now);
            }
            if accuracy >= 0.95 && to_95.is_none() {
                to_95 = Some(now);
            }
        }
    }
    let show = |t: Option<f64>| t.map_or("not within the limit".into(), |t| format!("{t:.0} s"));
    println!();
    println!("| tabs | to 90 % | to 95 % | rounds |");
    println!("|---:|---:|---:|---:|");
    println!("| {tabs} | {} | {} | {seen} |", show(to_90), show(to_95));
    // What each tab chose to lend (its page says it), when it was asked to.
    if !query.is_empty() {
        for (i, tab) in open.iter().enumerate() {
            let page = page_figures(tab).await.unwrap_or_default();
            println!(
                "tab {}: training on {} worker(s), split {}, chosen from {}, {} split hops, helpers ready after {} ms",
                i + 1,
                page["workers"],
                page["split"],
                page["workersChosen"],
                page["splitHops"],
                page["helperReadyMs"]
            );
        }
    }
    for tab in open {
        let _ = tab.close().await;
    }
    Ok(())
}
