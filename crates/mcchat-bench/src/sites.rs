//! Site to site over NATS (issue 13), on loopback: two mcchatd, `paris` and `london`, each
//! with room1 on a group of its own, bridged through one nats-server with JetStream. A paced
//! sender multicasts to paris's group; one receiver listens there (the LAN path) and one on
//! london's group (the bridged path), each reading the send time in the datagram.
//!
//! Beside it, nats-server's own publish-subscribe at the same message size, with a raw
//! async-nats publisher and subscriber (no NATS CLI is packaged): what the bridge adds over
//! NATS itself.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use futures_util::StreamExt as _;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::load::{self, Receiver};
use crate::suite::{MAX_LOSS, Opts, SIZE, proc_stat, spawn_ready_all, summary};

const NATS_PORT: u16 = 4233;
const PARIS_GROUP: &str = "239.255.78.1:5578";
const LONDON_GROUP: &str = "239.255.78.2:5579";

/// One trial: `count` sent at `rate`, what the LAN and the far site received.
struct Trial {
    sent: u64,
    lan: load::Received,
    far: load::Received,
}

fn trial(rate: u64, secs: f64) -> Result<Trial> {
    let paris: SocketAddr = PARIS_GROUP.parse()?;
    let london: SocketAddr = LONDON_GROUP.parse()?;
    let idle = Duration::from_millis(500);
    let lan = Receiver::start(paris, idle)?;
    let far = Receiver::start(london, idle)?;
    let sent = load::send(paris, rate, secs, SIZE, false)?;
    Ok(Trial {
        sent: sent.count,
        lan: lan.finish()?,
        far: far.finish()?,
    })
}

fn rooms(dir: &Path, site: &str, group: &str) -> Result<std::path::PathBuf> {
    let (addr, port) = group.rsplit_once(':').context("group")?;
    let path = dir.join(format!("sites-{site}.toml"));
    std::fs::write(
        &path,
        format!(
            "[daemon]\nrelay_rate = 1000000\nrelay_burst = 1000000\n\n[rooms.room1]\ngroup = \"{addr}\"\nport = {port}\n"
        ),
    )?;
    Ok(path)
}

/// The bridge's figures, or why they were not taken.
pub(crate) fn sites(opts: &Opts, dir: &Path, runs: usize) -> Result<Value> {
    if Command::new("nats-server")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("bench: nats-server not found: the sites benchmark is left out");
        return Ok(json!({"skipped": "nats-server not found"}));
    }
    let store = dir.join("nats-store");
    let _ = std::fs::remove_dir_all(&store);
    let mut cmd = Command::new("nats-server");
    cmd.args([
        "-js",
        "-a",
        "127.0.0.1",
        "-p",
        &NATS_PORT.to_string(),
        "-sd",
    ])
    .arg(&store);
    let nats = spawn_ready_all("nats-server", cmd, &["Server is ready"])?;
    let url = format!("nats://127.0.0.1:{NATS_PORT}");
    let daemon = |site: &'static str, group: &str, listen: &str| -> Result<_> {
        let mut cmd = Command::new(&opts.mcchatd);
        cmd.args(["--listen", listen, "--status-socket", "", "--no-history"])
            .args(["--site", site, "--nats", &url, "--rooms"])
            .arg(rooms(dir, site, group)?);
        spawn_ready_all(
            "mcchatd",
            cmd,
            &[
                "injecting this room from other sites",
                "reading the room's stream",
            ],
        )
    };
    let paris = daemon("paris", PARIS_GROUP, "127.0.0.1:5594")?;
    let london = daemon("london", LONDON_GROUP, "127.0.0.1:5595")?;
    let secs = if opts.quick { 0.3 } else { 3.0 };
    eprintln!("bench: site to site over NATS");
    let (mut far50, mut far99, mut lan50, mut lan99, mut added50, mut added99) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let t = trial(1000, secs)?;
        let (f50, f99) = (q(&t.far.latency_us, 0.5), q(&t.far.latency_us, 0.99));
        let (l50, l99) = (q(&t.lan.latency_us, 0.5), q(&t.lan.latency_us, 0.99));
        far50.push(f50);
        far99.push(f99);
        lan50.push(l50);
        lan99.push(l99);
        added50.push(f50 - l50);
        added99.push(f99 - l99);
    }
    // The highest offered rate the far site receives with less than 0.1% loss.
    let rates: &[u64] = if opts.quick {
        &[2000, 5000]
    } else {
        &[2000, 5000, 10_000, 20_000, 40_000, 80_000]
    };
    let mut best = 0u64;
    let mut sweep = Vec::new();
    let mut cpu = BTreeMap::new();
    for &rate in rates {
        let pids = [
            ("paris", paris.pid()),
            ("london", london.pid()),
            ("nats_server", nats.pid()),
        ];
        let before: Vec<f64> = pids
            .iter()
            .map(|(_, p)| p.and_then(proc_stat).map_or(0.0, |s| s.0))
            .collect();
        let t = trial(rate, secs)?;
        let share = t.far.count as f64 / t.sent.max(1) as f64;
        sweep.push(
            json!({"offered_per_s": rate, "sent": t.sent, "far_received": t.far.count,
                          "duplicates": t.far.duplicates, "reordered": t.far.reordered}),
        );
        if share + MAX_LOSS < 1.0 {
            break;
        }
        best = rate;
        // CPU per million bridged, at the highest rate that held.
        cpu.clear();
        for ((name, pid), b) in pids.iter().zip(&before) {
            let after = pid.and_then(proc_stat).map_or(0.0, |s| s.0);
            cpu.insert(*name, json!((after - b) / t.far.count.max(1) as f64 * 1e6));
        }
    }
    drop((paris, london));
    let raw = raw_nats(&url, secs, rates, runs, nats.pid())?;
    drop(nats);
    Ok(json!({
        "latency_1000_per_s": {
            "far_p50_us": summary(far50), "far_p99_us": summary(far99),
            "lan_p50_us": summary(lan50), "lan_p99_us": summary(lan99),
            "added_p50_us": summary(added50), "added_p99_us": summary(added99),
        },
        "max_rate_per_s": best,
        "sweep": sweep,
        "cpu_s_per_million": cpu,
        "raw_nats": raw,
    }))
}

fn q(h: &Histogram<u64>, quantile: f64) -> f64 {
    h.value_at_quantile(quantile) as f64
}

/// nats-server's own publish-subscribe: a publisher paced at `rate` sending `SIZE`-byte
/// messages stamped with their send time, and a subscriber on another connection.
fn raw_nats(
    url: &str,
    secs: f64,
    rates: &[u64],
    runs: usize,
    server: Option<u32>,
) -> Result<Value> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut p50 = Vec::new();
        let mut p99 = Vec::new();
        for _ in 0..runs {
            let (sent, got, h) = raw_trial(url, 1000, secs).await?;
            anyhow::ensure!(got > 0, "raw NATS: nothing received of {sent}");
            p50.push(q(&h, 0.5));
            p99.push(q(&h, 0.99));
        }
        let mut best = 0;
        let mut cpu = None;
        for &rate in rates {
            let before = server.and_then(proc_stat).map_or(0.0, |s| s.0);
            let (sent, got, _) = raw_trial(url, rate, secs).await?;
            if (got as f64) / (sent.max(1) as f64) + MAX_LOSS < 1.0 {
                break;
            }
            best = rate;
            let after = server.and_then(proc_stat).map_or(0.0, |s| s.0);
            cpu = Some((after - before) / got.max(1) as f64 * 1e6);
        }
        Ok(json!({
            "p50_us": summary(p50), "p99_us": summary(p99),
            "max_rate_per_s": best,
            "nats_server_cpu_s_per_million": cpu,
        }))
    })
}

async fn raw_trial(url: &str, rate: u64, secs: f64) -> Result<(u64, u64, Histogram<u64>)> {
    let subject = "bench.raw";
    let sub_client = async_nats::connect(url)
        .await
        .context("raw NATS subscriber")?;
    let pub_client = async_nats::connect(url)
        .await
        .context("raw NATS publisher")?;
    let mut sub = sub_client.subscribe(subject).await?;
    sub_client.flush().await?;
    let reader = tokio::spawn(async move {
        let mut h = Histogram::<u64>::new(3).map_err(anyhow::Error::from)?;
        let mut got = 0u64;
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), sub.next()).await {
            let sent = std::str::from_utf8(m.payload.get(..20).unwrap_or_default())
                .ok()
                .and_then(|s| s.parse::<u64>().ok());
            if let Some(ns) = sent {
                got += 1;
                let _ = h.record(load::now_ns().saturating_sub(ns) / 1000);
            }
        }
        Ok::<_, anyhow::Error>((got, h))
    });
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut sent = 0u64;
    let mut buf = Vec::with_capacity(SIZE);
    while Instant::now() < end {
        let due = start + Duration::from_secs_f64(sent as f64 / rate as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        buf.clear();
        buf.extend_from_slice(format!("{:020} ", load::now_ns()).as_bytes());
        buf.resize(SIZE, b'x');
        pub_client
            .publish(subject, buf.clone().into())
            .await
            .context("raw NATS publish")?;
        sent += 1;
    }
    pub_client.flush().await?;
    let (got, h) = reader.await.context("raw NATS reader")??;
    Ok((sent, got, h))
}
