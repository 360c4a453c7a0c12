//! What secure aggregation costs (`serve --secure-aggregation`).
//!
//! - [`protocol`]: the protocol alone, in memory, for `n` maskers and a
//!   model of `params` values: each side's CPU time per step and the bytes
//!   of every message as it travels (JSON text frames, masked weight
//!   frames), with and without a share of maskers dropping after the key
//!   exchange.
//! - [`live`]: a real server on loopback with echo clients (FedAvg, so
//!   every client masks): seconds and bytes per round with and without
//!   secure aggregation, and with clients vanishing at their masked hop.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use astraea_core::protocol::frames::HEADER_BYTES;
use astraea_core::protocol::{ClientMessage, ServerMessage};
use astraea_core::secagg::{AdvertisedKeys, Masker, SecAggParams, Unmasker};
use astraea_core::strategy::StrategyKind;
use astraea_native::{ClientOptions, run_swarm};
use astraea_server as serve;

/// The in-memory protocol's costs for one round.
#[derive(Debug, Clone)]
pub struct ProtocolBench {
    /// Maskers.
    pub maskers: u32,
    /// Maskers that dropped after the key exchange.
    pub dropped: u32,
    /// Values in the model.
    pub params: usize,
    /// One masker's CPU milliseconds for keys, shares and reading its
    /// inbox (mean over maskers).
    pub masker_setup_ms: f64,
    /// One masker's CPU milliseconds to mask its result (mean).
    pub masker_mask_ms: f64,
    /// One masker's CPU milliseconds to reveal (mean over survivors).
    pub masker_reveal_ms: f64,
    /// The server's CPU milliseconds: roster, routing, summing the masked
    /// results and unmasking.
    pub server_ms: f64,
    /// Bytes one masker sends beyond its plain result (mean): keys,
    /// shares, reveal.
    pub masker_extra_up: f64,
    /// Bytes one masker receives beyond its task (mean): setup, roster,
    /// inbox, unmask request.
    pub masker_extra_down: f64,
    /// Bytes of one result in the clear (f32 frames) and masked (u32
    /// frames): the same size.
    pub result_bytes: usize,
    /// Largest difference between the unmasked mean and the true one (the
    /// fixed-point rounding).
    pub max_error: f32,
}

fn client_bytes(message: &ClientMessage) -> usize {
    message.to_json().len()
}

fn server_bytes(message: &ServerMessage) -> usize {
    message.to_json().len()
}

/// Runs one round of the protocol in memory: `maskers` maskers, the first
/// `dropped` of them leaving after the key exchange, results of `params`
/// values.
///
/// # Errors
/// Parameters the protocol refuses, or too many dropped to unmask.
pub fn protocol(maskers: u32, dropped: u32, params: usize) -> anyhow::Result<ProtocolBench> {
    let params_spec = SecAggParams::majority(1, maskers)?;
    let n = maskers as usize;
    let result: Vec<f32> = (0..params).map(|i| (i % 101) as f32 * 1e-3).collect();
    let weight = 1.0 / n as f64;
    let mut down = vec![0usize; n];
    let mut up = vec![0usize; n];

    let start = Instant::now();
    let mut list: Vec<Masker> = (1..=maskers)
        .map(|slot| {
            let mut entropy = [0u8; 32];
            entropy[..4].copy_from_slice(&slot.to_le_bytes());
            Masker::new(params_spec, slot, entropy)
        })
        .collect::<Result<_, _>>()?;
    let keys: Vec<AdvertisedKeys> = list.iter().map(Masker::keys).collect();
    let mut setup_s = start.elapsed().as_secs_f64();
    for (i, k) in keys.iter().enumerate() {
        down[i] += server_bytes(&ServerMessage::SecureSetup {
            round: 1,
            slot: k.slot,
            maskers,
            threshold: params_spec.threshold,
        });
        up[i] += client_bytes(&ClientMessage::SecureKeys { round: 1, keys: *k });
    }

    let start = Instant::now();
    let mut server = Unmasker::new(params_spec, params);
    let roster = server.roster(&keys)?;
    let mut server_s = start.elapsed().as_secs_f64();
    let roster_bytes = server_bytes(&ServerMessage::SecureRoster {
        round: 1,
        keys: roster.clone(),
    });

    let start = Instant::now();
    let mut sent = BTreeMap::new();
    for m in &mut list {
        sent.insert(m.slot(), m.share_keys(&roster)?);
    }
    setup_s += start.elapsed().as_secs_f64();
    for (i, (_, shares)) in sent.iter().enumerate() {
        down[i] += roster_bytes;
        up[i] += client_bytes(&ClientMessage::SecureShares {
            round: 1,
            shares: shares.clone(),
        });
    }

    let start = Instant::now();
    let inboxes = server.route(sent)?;
    server_s += start.elapsed().as_secs_f64();
    let start = Instant::now();
    for m in &mut list {
        m.receive_shares(&inboxes[&m.slot()])?;
    }
    setup_s += start.elapsed().as_secs_f64();
    for (i, m) in list.iter().enumerate() {
        down[i] += server_bytes(&ServerMessage::SecureInbox {
            round: 1,
            shares: inboxes[&m.slot()].clone(),
        });
    }

    let mut mask_s = 0.0;
    for m in list.iter().skip(dropped as usize) {
        let start = Instant::now();
        let masked = m.mask(&result, weight)?;
        mask_s += start.elapsed().as_secs_f64();
        let start = Instant::now();
        server.add_masked(m.slot(), &masked, weight)?;
        server_s += start.elapsed().as_secs_f64();
    }

    let (survivors, gone) = server.unmask_request();
    let mut revealed = BTreeMap::new();
    let mut reveal_s = 0.0;
    for m in list.iter_mut().skip(dropped as usize) {
        let start = Instant::now();
        let shares = m.reveal(&survivors, &gone)?;
        reveal_s += start.elapsed().as_secs_f64();
        let i = (m.slot() - 1) as usize;
        down[i] += server_bytes(&ServerMessage::SecureUnmask {
            round: 1,
            survivors: survivors.clone(),
            dropped: gone.clone(),
        });
        up[i] += client_bytes(&ClientMessage::SecureReveal {
            round: 1,
            shares: shares.clone(),
        });
        revealed.insert(m.slot(), shares);
    }
    let start = Instant::now();
    let (mean, _) = server.finish(&revealed)?;
    server_s += start.elapsed().as_secs_f64();
    let error = mean
        .iter()
        .zip(&result)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    // Each weighted value is rounded to 2^-SCALE_BITS: the mean of `k`
    // survivors of total weight `t` is off by at most k * 2^-(bits+1) / t.
    let survivors_k = n - dropped as usize;
    let total = survivors_k as f64 * weight;
    let bound =
        survivors_k as f64 * 0.5f64.powi(astraea_core::secagg::SCALE_BITS as i32 + 1) / total;
    anyhow::ensure!(
        f64::from(error) <= bound * 1.01 + 1e-7,
        "the unmasked mean is off by {error}, beyond the rounding bound {bound}"
    );

    let survivors_n = (n - dropped as usize).max(1) as f64;
    Ok(ProtocolBench {
        maskers,
        dropped,
        params,
        masker_setup_ms: setup_s * 1e3 / n as f64,
        masker_mask_ms: mask_s * 1e3 / survivors_n,
        masker_reveal_ms: reveal_s * 1e3 / survivors_n,
        server_ms: server_s * 1e3,
        masker_extra_up: up.iter().sum::<usize>() as f64 / n as f64,
        masker_extra_down: down.iter().sum::<usize>() as f64 / n as f64,
        result_bytes: HEADER_BYTES + params * 4,
        max_error: error,
    })
}

/// The protocol table's rows, as markdown.
pub fn protocol_table(rows: &[ProtocolBench]) -> String {
    let mut out = String::from(
        "| maskers | dropped | params | masker setup ms | masker mask ms | masker reveal ms | server ms | masker extra KB up | masker extra KB down | result KB (plain = masked) | max error |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        out += &format!(
            "| {} | {} | {} | {:.2} | {:.2} | {:.3} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1e} |\n",
            r.maskers,
            r.dropped,
            r.params,
            r.masker_setup_ms,
            r.masker_mask_ms,
            r.masker_reveal_ms,
            r.server_ms,
            r.masker_extra_up / 1e3,
            r.masker_extra_down / 1e3,
            r.result_bytes as f64 / 1e3,
            r.max_error,
        );
    }
    out
}

/// One live configuration's figures.
#[derive(Debug, Clone)]
pub struct LiveBench {
    /// Secure aggregation on.
    pub secure: bool,
    /// Clients (FedAvg: every one a masker).
    pub clients: usize,
    /// Chance per hop that a client vanishes (after the key exchange).
    pub vanish: f64,
    /// Rounds timed (the first, which waits for joins, is left out).
    pub rounds: usize,
    /// Mean seconds per round.
    pub round_s: f64,
    /// Mean bytes the server received per round (WebSocket payloads).
    pub up_per_round: f64,
    /// Mean bytes the server sent per round.
    pub down_per_round: f64,
    /// Rounds the server dropped (kept the old model).
    pub dropped_rounds: u64,
}

/// Runs `rounds + 1` FedAvg rounds of `clients` echo clients on loopback,
/// secure or not; each client vanishes at a hop with chance `vanish` (and
/// rejoins).
///
/// # Errors
/// The server failing to start or run.
pub async fn live(
    data_dir: PathBuf,
    clients: usize,
    rounds: u32,
    secure: bool,
    vanish: f64,
) -> anyhow::Result<LiveBench> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let mut config =
        crate::serve_config(data_dir.clone(), clients, rounds + 1, StrategyKind::FedAvg);
    config.secure_aggregation = secure;
    // Vanished clients come back; a round starts with 80 % of them.
    config.min_clients = (clients * 4 / 5).max(1);
    config.stall_timeout = Duration::from_secs(2);
    let running = serve::start(listener, config).await?;
    let options = ClientOptions {
        max_frame_bytes: 1 << 20,
        echo: true,
        vanish,
        ..ClientOptions::new(format!("ws://{address}/ws"), data_dir)
    };
    let swarm = tokio::spawn(run_swarm(clients, options));
    running.coordinator.await??;
    swarm.abort();
    let history = running.state.status().history.clone();
    let timed = &history[1..];
    let per = |f: &dyn Fn(&astraea_core::metrics::RoundRecord) -> f64| {
        (timed.last().map_or(0.0, f) - f(&history[0])) / timed.len().max(1) as f64
    };
    Ok(LiveBench {
        secure,
        clients,
        vanish,
        rounds: timed.len(),
        round_s: per(&|r| r.wall_s),
        up_per_round: per(&|r| r.bytes_up as f64),
        down_per_round: per(&|r| r.bytes_down as f64),
        dropped_rounds: running
            .state
            .dropped_rounds
            .load(std::sync::atomic::Ordering::Relaxed),
    })
}

/// The live table's rows, as markdown.
pub fn live_table(rows: &[LiveBench]) -> String {
    let mut out = String::from(
        "| secure aggregation | clients | vanish per hop | rounds | s/round | KB up/round | KB down/round | dropped rounds |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        out += &format!(
            "| {} | {} | {:.0} % | {} | {:.2} | {:.0} | {:.0} | {} |\n",
            if r.secure { "on" } else { "off" },
            r.clients,
            r.vanish * 100.0,
            r.rounds,
            r.round_s,
            r.up_per_round / 1e3,
            r.down_per_round / 1e3,
            r.dropped_rounds,
        );
    }
    out
}
