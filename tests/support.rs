//! What the end-to-end tests and the page benchmark share: Debian's
//! chromedriver and headless Chromium (nothing is downloaded), a served
//! run on loopback, the built page, and a folder for artifacts.
//!
//! Every process started here is stopped when its guard drops, even when a
//! test fails: chromedriver runs in its own process group, and the group
//! (chromedriver and every Chromium it started) is killed.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use astraea_core::astraea::PlanRule;
use astraea_core::strategy::{Rescheduling, StrategySettings};
use astraea_server::{self as serve, Running, ServeConfig};
use fantoccini::{Client, ClientBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repository")
        .to_path_buf()
}

/// Where tests leave screenshots: `artifacts/` at the root (not tracked).
pub fn artifact_dir() -> anyhow::Result<PathBuf> {
    let dir = repo_root().join("artifacts");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// The built page (`static/`), or an error naming the command that builds it.
pub fn built_page() -> anyhow::Result<PathBuf> {
    let dir = repo_root().join("static");
    if !dir.join("pkg/astraea_client_bg.wasm").exists() || !dir.join("index.html").exists() {
        bail!(
            "{} holds no built page: run scripts/build-web first",
            dir.display()
        );
    }
    Ok(dir)
}

/// A running chromedriver, killed with its browsers on drop.
#[derive(Debug)]
pub struct Chromedriver {
    child: Child,
    /// Its WebDriver URL.
    pub url: String,
}

impl Chromedriver {
    /// Starts `$CHROMEDRIVER` (default Debian's `/usr/bin/chromedriver`) on a
    /// free loopback port and waits until it listens.
    pub fn start() -> anyhow::Result<Self> {
        let binary =
            std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut command = Command::new(&binary);
        command
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command.spawn().with_context(|| {
            format!("starting {binary} (Debian's chromium-driver; scripts/setup installs it)")
        })?;
        let driver = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("{binary} did not listen on port {port} within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(driver)
    }

    /// A new headless Chromium session (its own browser process), with
    /// `extra` flags after the ones every test needs.
    pub async fn open(&self, extra: &[&str]) -> anyhow::Result<Client> {
        self.open_with_prefs(extra, serde_json::json!({})).await
    }

    /// [`Chromedriver::open`] with Chromium preferences (`prefs` of
    /// `goog:chromeOptions`), e.g. site data blocked.
    pub async fn open_with_prefs(
        &self,
        extra: &[&str],
        prefs: serde_json::Value,
    ) -> anyhow::Result<Client> {
        let mut args = vec![
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--window-size=1280,1000",
            // Tabs of one test run side by side: none may be throttled as
            // a background tab.
            "--disable-background-timer-throttling",
            "--disable-renderer-backgrounding",
        ];
        args.extend_from_slice(extra);
        let capabilities = serde_json::json!({
            "goog:chromeOptions": { "args": args, "prefs": prefs },
        });
        let serde_json::Value::Object(capabilities) = capabilities else {
            unreachable!("a JSON object literal")
        };
        // On a loaded machine chromedriver at times refuses a connection
        // it accepted a moment before (seen once in CI: "webdriver server
        // did not respond ... (Connect)"); a session is tried three times.
        let mut attempt = 1;
        loop {
            let opened = ClientBuilder::new(HttpConnector::new())
                .capabilities(capabilities.clone())
                .connect(&self.url)
                .await;
            match opened {
                Ok(client) => return Ok(client),
                Err(e) if attempt < 3 => {
                    eprintln!("opening a Chromium session, attempt {attempt}: {e}; again");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    return Err(e).context("opening a Chromium session through chromedriver");
                }
            }
        }
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        // The whole group: chromedriver and the browsers it started. (Not
        // through the `kill` program: Debian's procps reads `-KILL -PGID`
        // as `kill -1`, every process the user owns.)
        if let Ok(pgid @ 2..) = i32::try_from(self.child.id()) {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A demo run on MNIST for browser tabs: `shards` shards of the first
/// `max_train` training samples, long-tailed, Astraea with mediators of at
/// most `gamma` tabs.
pub fn demo_config(shards: usize, max_train: usize, rounds: u32, gamma: usize) -> ServeConfig {
    let settings = StrategySettings {
        plan_rule: PlanRule::ZScore { tau_d: 3.5 },
        rescheduling: Rescheduling {
            gamma,
            passes: 2,
            scheduler: astraea_core::astraea::Scheduler::Greedy,
        },
        prox_mu: 0.0,
        aggregation: Default::default(),
    };
    ServeConfig {
        data_dir: repo_root().join("data"),
        max_train: Some(max_train),
        shards,
        participants: shards,
        min_clients: shards,
        rounds,
        settings,
        hop_deadline: Duration::from_secs(600),
        seed: 7,
        static_dir: repo_root().join("static"),
        run_name: "e2e".into(),
        ..ServeConfig::default()
    }
}

/// Serves `config` on a free loopback port; returns the run and its URL.
pub async fn serve_on_loopback(config: ServeConfig) -> anyhow::Result<(Running, String)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/", listener.local_addr()?);
    let running = serve::start(listener, config).await?;
    Ok((running, url))
}

/// Polls `done` every 20 ms until it holds; an error naming `what` after
/// `limit`.
pub async fn wait_until(
    what: &str,
    limit: Duration,
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            bail!("gave up after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The figures the volunteer page keeps in `window.astraea`.
pub async fn page_figures(tab: &Client) -> anyhow::Result<serde_json::Value> {
    Ok(tab
        .execute("return window.astraea || null;", vec![])
        .await?)
}

/// The text of the element with `id` on the tab's page.
pub async fn text_of(tab: &Client, id: &str) -> anyhow::Result<String> {
    let text = tab
        .execute(
            "const node = document.getElementById(arguments[0]); return node ? node.textContent : null;",
            vec![serde_json::json!(id)],
        )
        .await?;
    text.as_str()
        .map(str::to_string)
        .with_context(|| format!("no element #{id} on the page"))
}

/// Chromedriver's Chrome DevTools Protocol endpoint as a WebDriver command:
/// `POST /session/{id}/goog/cdp/execute` with `{cmd, params}`.
#[derive(Debug)]
struct CdpCommand {
    cmd: String,
    params: serde_json::Value,
}

impl fantoccini::wd::WebDriverCompatibleCommand for CdpCommand {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/goog/cdp/execute",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        let body = serde_json::json!({ "cmd": self.cmd, "params": self.params });
        (http::Method::POST, Some(body.to_string()))
    }
}

/// Runs the DevTools command `cmd` with `params` on the tab (e.g.
/// `Page.setWebLifecycleState` with `{"state": "frozen"}`); returns its
/// result.
pub async fn cdp(
    tab: &Client,
    cmd: &str,
    params: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    tab.issue_cmd(CdpCommand {
        cmd: cmd.into(),
        params,
    })
    .await
    .with_context(|| format!("CDP {cmd}"))
}
