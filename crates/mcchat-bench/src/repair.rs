//! Loss repair as users see it, with the real binaries: one `mcchat join` sending at a steady
//! rate to one `mcchat listen --json`, with random loss injected by nftables on the way in.
//!
//! Figures: repair latency (send to delivery of the messages that arrived as repairs), the
//! latency of all messages, and the bytes on the wire per delivered message (all datagrams
//! to the room's port: messages, heartbeats, NACKs and repairs, with IP and UDP headers).

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::load::now_ns;

/// The room's port (room1 in the bench rooms file).
const PORT: u16 = 5555;

pub(crate) fn nft(args: &str) -> Result<String> {
    let out = Command::new("nft")
        .args(args.split_whitespace())
        .output()
        .context("cannot run nft (scripts/deps.sh installs nftables)")?;
    if !out.status.success() {
        bail!(
            "nft {args}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `counter packets P bytes B` of the only rule in `table`.
pub(crate) fn counter(table: &str) -> Result<(u64, u64)> {
    let listing = nft(&format!("list table inet {table}"))?;
    let words: Vec<&str> = listing.split_whitespace().collect();
    let after = |key: &str| {
        words
            .iter()
            .position(|w| *w == key)
            .and_then(|i| words.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((after("packets"), after("bytes")))
}

/// Kills the child when dropped, so an error cannot leave a process behind.
pub(crate) struct Reaped(pub(crate) Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `mcchat ARGS` and waits for `ready` on its stderr; its stdout lines come on the
/// returned channel with their arrival time.
pub(crate) fn start(
    mcchat: &Path,
    rooms: &Path,
    args: &[&str],
    ready: &str,
) -> Result<(Reaped, mpsc::Receiver<(u64, String)>)> {
    let mut child = Command::new(mcchat)
        .arg("--rooms")
        .arg(rooms)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start mcchat")?;
    let stdout = child.stdout.take().context("stdout")?;
    let stderr = child.stderr.take().context("stderr")?;
    let child = Reaped(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send((now_ns(), line)).is_err() {
                break;
            }
        }
    });
    let mut err = BufReader::new(stderr);
    let mut line = String::new();
    loop {
        line.clear();
        if err.read_line(&mut line)? == 0 {
            bail!("mcchat {args:?} ended before it was ready");
        }
        if line.contains(ready) {
            break;
        }
    }
    // Keep draining stderr so the child never blocks on it.
    std::thread::spawn(move || {
        let mut sink = String::new();
        while err.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
            sink.clear();
        }
    });
    Ok((child, rx))
}

pub(crate) fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted.get(i).copied()
}

/// One run: `n` messages at `rate` msg/s with `loss_percent` random loss on the way in.
pub(crate) fn run(
    mcchat: &Path,
    rooms: &Path,
    loss_percent: u32,
    n: u64,
    rate: u64,
) -> Result<Value> {
    let _ = nft("delete table inet mcwire");
    let _ = nft("delete table inet mcloss");
    nft("add table inet mcwire")?;
    nft("add chain inet mcwire out { type filter hook output priority 0 ; }")?;
    nft(&format!(
        "add rule inet mcwire out udp dport {PORT} counter"
    ))?;
    let (listener, lines) = start(
        mcchat,
        rooms,
        &["listen", "room1", "--json"],
        "listening to",
    )?;
    let (mut sender, _) = start(
        mcchat,
        rooms,
        &["join", "room1", "--name", "bench"],
        "joined",
    )?;
    if loss_percent > 0 {
        nft("add table inet mcloss")?;
        nft("add chain inet mcloss in { type filter hook input priority 0 ; }")?;
        nft(&format!(
            "add rule inet mcloss in udp dport {PORT} numgen random mod 100 < {loss_percent} counter drop"
        ))?;
    }
    let mut stdin = sender.0.stdin.take().context("stdin")?;
    let start_at = Instant::now();
    let step = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    for i in 0..n {
        writeln!(stdin, "{}", now_ns())?;
        let due = start_at + step * u32::try_from(i + 1).unwrap_or(u32::MAX);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    stdin.flush()?;
    // Everything is delivered (or reported lost) within the receivers' give-up time.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut all, mut repaired, mut lost) = (Vec::new(), Vec::new(), 0u64);
    while (all.len() as u64) + lost < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok((at, line)) = lines.recv_timeout(left) else {
            break;
        };
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        match v["kind"].as_str() {
            Some("message") => {
                let sent: u64 = v["text"]
                    .as_str()
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(at);
                let ms = at.saturating_sub(sent) as f64 / 1e6;
                all.push(ms);
                if v["repair"] == true {
                    repaired.push(ms);
                }
            }
            Some("lost") => {
                lost += v["text"]
                    .as_str()
                    .and_then(|t| t.trim_end_matches(" lost").parse::<u64>().ok())
                    .unwrap_or(0);
            }
            _ => {}
        }
    }
    let (_, dropped) = if loss_percent > 0 {
        let (p, b) = counter("mcloss")?;
        (b, p)
    } else {
        (0, 0)
    };
    // Bytes until here: the sender's tail probes after the last message belong to the cost.
    let (packets, bytes) = counter("mcwire")?;
    drop(stdin);
    drop(sender);
    drop(listener);
    let _ = nft("delete table inet mcwire");
    let _ = nft("delete table inet mcloss");
    all.sort_by(f64::total_cmp);
    repaired.sort_by(f64::total_cmp);
    let delivered = all.len() as u64;
    Ok(json!({
        "loss_percent": loss_percent,
        "sent": n,
        "delivered": delivered,
        "reported_lost": lost,
        "dropped_by_nft": dropped,
        "repaired": repaired.len(),
        "repair_latency_ms": {"p50": quantile(&repaired, 0.5), "p99": quantile(&repaired, 0.99)},
        "latency_ms": {"p50": quantile(&all, 0.5), "p99": quantile(&all, 0.99)},
        "wire_packets": packets,
        "wire_bytes": bytes,
        "wire_bytes_per_delivered": bytes as f64 / delivered.max(1) as f64,
        "payload_bytes_per_message": 19,
    }))
}
