//! The tab in the browser's real lifecycle: a page frozen mid-hop (CDP
//! `Page.setWebLifecycleState`, what Chromium does to a background tab or
//! a phone whose screen locked) tells the server it is pausing as it
//! freezes, and the server moves its chain on at once instead of waiting
//! for the hop deadline; a reloaded tab comes back as the same client; a
//! browser that blocks site data leaves the tab training from memory, and
//! the page says so.

use std::time::{Duration, Instant};

use astraea_e2e::{
    Chromedriver, built_page, cdp, demo_config, page_figures, serve_on_loopback, wait_until,
};
use astraea_server::state::Phase;

/// Generous for two cores; the hop deadline is 120 s, so a run that
/// waited for the frozen tab would take far longer than the stall timeout.
const RUN_LIMIT: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tab_frozen_mid_hop_says_it_is_pausing_and_its_chain_moves_on_at_once()
-> anyhow::Result<()> {
    // Prepare: three tabs in one mediator (two passes), a 120 s deadline
    // and no stall rule: only the tab's own word (its `freeze` handler's
    // beacon) can move the chain on before the deadline.
    built_page()?;
    let mut config = demo_config(3, 3000, 1, 3);
    config.hop_deadline = Duration::from_secs(120);
    config.stall_timeout = Duration::ZERO;
    let (running, url) = serve_on_loopback(config).await?;
    let state = running.state.clone();
    let driver = Chromedriver::start()?;
    let mut tabs = Vec::new();
    for _ in 0..3 {
        let tab = driver.open(&[]).await?;
        tab.goto(&format!("{url}?join=1")).await?;
        tabs.push(tab);
    }

    // Execute: once the chain is under way, freeze the tab training now,
    // in the first pass (so it has another hop to come even if this one
    // ends before the freeze lands).
    let mut victim = None;
    wait_until("a tab training mid-chain", RUN_LIMIT, || {
        let status = state.status();
        victim = status
            .mediators
            .iter()
            .find(|m| {
                m.hops_done >= 1
                    && m.hops_done as usize + m.members.len() < m.hops as usize
                    && m.current.is_some()
            })
            .and_then(|m| m.current);
        victim.is_some()
    })
    .await?;
    let mut frozen = None;
    for tab in &tabs {
        if page_figures(tab).await?["clientId"].as_u64() == victim {
            frozen = Some(tab);
        }
    }
    let frozen = frozen.expect("the training client is one of the tabs");
    cdp(
        frozen,
        "Page.setWebLifecycleState",
        serde_json::json!({ "state": "frozen" }),
    )
    .await?;
    let froze_at = Instant::now();
    wait_until("the run to finish", RUN_LIMIT, || {
        state.status().phase == Phase::Finished
    })
    .await?;
    let after_freeze = froze_at.elapsed();

    // Assert: the frozen tab said it was pausing; its hop (unless it had
    // just answered it) and its second pass's were skipped without waiting,
    // so the round did not wait for the 120 s deadline; it rests, marked
    // paused.
    let status = state.status().clone();
    assert_eq!(status.history.len(), 1);
    assert!(
        (1..=2).contains(&status.skipped_hops),
        "{} hops skipped",
        status.skipped_hops
    );
    assert!(
        after_freeze < Duration::from_secs(100),
        "the run waited {after_freeze:?} after the freeze"
    );
    assert!(
        state.clients()[&victim.unwrap()].paused,
        "the server does not know the frozen tab paused"
    );

    // Clean up: thaw the frozen page so its session closes.
    cdp(
        frozen,
        "Page.setWebLifecycleState",
        serde_json::json!({ "state": "active" }),
    )
    .await?;
    for tab in tabs {
        tab.close().await?;
    }
    running.server.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tab_whose_webgpu_device_is_lost_mid_hop_trains_the_hop_again_on_the_cpu()
-> anyhow::Result<()> {
    // The bug: a WebGPU device lost mid-hop (a GPU process crash, a driver
    // reset) failed the hop, and every later hop on the dead device.
    // Prepare: one tab on Chromium's software adapter, WebGPU forced, whose
    // page destroys its device after the first training step (`lose-gpu`);
    // one shard, one round of two passes; no stall rule (SwiftShader's
    // first step compiles shaders for tens of seconds).
    built_page()?;
    let mut config = demo_config(1, 300, 1, 1);
    config.stall_timeout = Duration::ZERO;
    let (running, url) = serve_on_loopback(config).await?;
    let state = running.state.clone();
    let driver = Chromedriver::start()?;
    let tab = driver.open(&["--enable-unsafe-webgpu"]).await?;
    tab.goto(&format!("{url}?join=1&backend=webgpu&lose-gpu=1"))
        .await?;
    let chosen = wait_until_async("the tab's backend", || async {
        page_figures(&tab).await.ok()?["backend"]["name"]
            .as_str()
            .map(String::from)
    })
    .await?;
    assert_eq!(chosen, "webgpu", "the tab did not start on WebGPU");

    // Execute
    wait_until("the run to finish", RUN_LIMIT, || {
        state.status().phase == Phase::Finished
    })
    .await?;

    // Assert: the page says it fell back to the CPU and why; both hops
    // were answered and taken (none skipped), so the lost device cost no
    // work but the GPU's part of the first hop.
    let backend = page_figures(&tab).await?["backend"].clone();
    assert_eq!(backend["name"], "flex", "{backend}");
    let reason = backend["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("WebGPU failed mid-hop"), "{reason}");
    let status = state.status().clone();
    assert_eq!(status.history.len(), 1);
    assert_eq!(status.skipped_hops, 0);
    assert_eq!(
        state.clients().values().map(|c| c.hops_done).sum::<u64>(),
        2,
        "both passes' hops answered"
    );
    tab.close().await?;
    running.server.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_tab_comes_back_as_the_same_client() -> anyhow::Result<()> {
    // The bug: a reload joined as a new client, with a new id and another
    // shard, and the old registration lingered.
    built_page()?;
    // Two shards and two clients needed: one tab never starts a round.
    // Under label privacy (epsilon 0.5 a report), so that a reload is seen
    // to report the same noisy counts again rather than a fresh draw.
    let mut config = demo_config(2, 3000, 1, 2);
    config.label_epsilon = Some(0.5);
    let (running, url) = serve_on_loopback(config).await?;
    let state = running.state.clone();
    let driver = Chromedriver::start()?;
    let tab = driver.open(&[]).await?;
    tab.goto(&format!("{url}?join=1")).await?;
    let first = wait_until_async("the tab's welcome", || async {
        page_figures(&tab).await.ok()?["clientId"].as_u64()
    })
    .await?;
    // (`counts` holds the latest report; `raw_counts` the first ever.)
    let reported = wait_until_async("the tab's noisy counts", || async {
        state.clients().get(&first)?.counts.clone()
    })
    .await?;

    // The page keeps the report once the worker has passed it on (a few
    // milliseconds after the server has it; a reload inside that window
    // draws afresh, which a volunteer's reload does not hit).
    wait_until_async("the tab to keep its report", || async {
        let kept = tab
            .execute(
                "return sessionStorage.getItem('astraea-label-report');",
                vec![],
            )
            .await
            .ok()?;
        kept.as_str().map(String::from)
    })
    .await?;

    // Execute
    tab.refresh().await?;
    let again = wait_until_async("the reloaded tab's welcome", || async {
        page_figures(&tab).await.ok()?["clientId"].as_u64()
    })
    .await?;
    wait_until_async("the reloaded tab's data", || async {
        page_figures(&tab).await.ok()?["readyMs"].as_f64()
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Assert: the same id, one registration, the same noisy report (a new
    // draw would differ with probability above 0.99 and spend epsilon
    // again).
    assert_eq!(again, first);
    wait_until("the old connection to be gone", RUN_LIMIT, || {
        state.clients().len() == 1
    })
    .await?;
    assert!(state.clients().contains_key(&first));
    let reported_again = state.clients().get(&first).and_then(|c| c.counts.clone());
    assert_eq!(reported_again, Some(reported));
    tab.close().await?;
    running.server.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tab_whose_browser_blocks_storage_trains_from_memory_and_says_so() -> anyhow::Result<()> {
    // Prepare: one tab whose browser blocks site data (the cookies
    // setting, which covers IndexedDB and sessionStorage), as a locked-down
    // or private browser does.
    built_page()?;
    let (running, url) = serve_on_loopback(demo_config(1, 500, 1, 1)).await?;
    let driver = Chromedriver::start()?;
    let blocked = serde_json::json!({ "profile.default_content_setting_values.cookies": 2 });
    let tab = driver.open_with_prefs(&[], blocked).await?;

    // Execute
    tab.goto(&format!("{url}?join=1")).await?;
    let state = running.state.clone();
    wait_until("the round to finish", Duration::from_secs(300), || {
        !state.status().history.is_empty()
    })
    .await?;

    // Assert: the tab trained its round and its page says why nothing is
    // kept.
    let figures = page_figures(&tab).await?;
    let problem = figures["cacheProblem"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let data = tab
        .execute(
            "return document.getElementById('data').textContent;",
            vec![],
        )
        .await?;
    let data = data.as_str().unwrap_or_default().to_string();
    assert!(
        !problem.is_empty(),
        "no storage problem reported: {figures}"
    );
    assert!(data.contains("keeps no copy"), "{data}");
    assert_eq!(state.status().history.len(), 1);
    tab.close().await?;
    running.server.abort();
    Ok(())
}

/// Polls `probe` every 100 ms until it gives a value, for at most 120 s.
async fn wait_until_async<T, F, Fut>(what: &str, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(value) = probe().await {
            return Ok(value);
        }
        anyhow::ensure!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
