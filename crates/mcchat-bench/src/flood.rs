//! A peer under the presence flood of issue 9, with the real binary: one `mcchat listen
//! --json` (the victim), a legitimate sender of tagged messages at 200 msg/s, and a hostile
//! socket sending two heartbeats (`seq=0`, then `seq=60`) for each of 4,096 made-up instance
//! ids at 400 datagrams/s: the burst mcchatd's relay allows one source by default
//! (`relay_burst`; it sustains 200/s), and twice what it sustains. A host on the LAN does not
//! need the relay at all, so the hostile socket sends to the group itself.
//!
//! The same run without the hostile socket is the baseline. Figures: the latency of the
//! legitimate stream at the victim (the text is the send time in ns, as in the repair
//! scenario; the arrival time is when its JSON line is read from the victim's stdout), the
//! victim's CPU time over the run (`/proc/PID/stat`, user+system), its peak RSS (`VmHWM`)
//! and the NACKs it sent (an nftables counter on its source port).
//!
//! Every loop is bounded by a count and a time; everything goes to the room's group on lo.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use mcchat_core::wire::{InstanceId, Kind};
use serde_json::{Value, json};

use crate::load::{self, now_ns};
use crate::repair::{counter, nft, quantile, start};

/// The room's group and port (room1 in the bench rooms file).
const GROUP: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(239, 255, 77, 1)), 5555);
/// The legitimate sender's instance id and name.
const LEGIT: InstanceId = InstanceId(0x6265_6e63_6800_0001);
const LEGIT_NAME: &str = "bench";
/// The legitimate stream's rate.
const RATE: u64 = 200;
/// The made-up senders, and the heartbeats each sends.
const FAKE_IDS: u64 = 4096;
const SECOND_SEQ: u64 = 60;
/// The hostile socket's rate, datagrams per second (see the module docs).
const FLOOD_RATE: u64 = 400;
/// How long the victim may take to show the stream once it has been sent.
const DRAIN: Duration = Duration::from_secs(10);
/// A stream message later than this counts as late.
const LATE_MS: f64 = 1000.0;

/// How long one run lasts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    /// The flood alone, before the stream starts (the victim's state builds up).
    pub(crate) warmup: Duration,
    /// Messages of the legitimate stream, at [`RATE`].
    pub(crate) messages: u64,
}

impl Plan {
    /// A few seconds for `--quick` (600 of the ids); else the whole flood (8,192 datagrams,
    /// 20.5 s) with a stream of 15 s after 5.5 s of flood alone.
    pub(crate) fn new(quick: bool) -> Self {
        if quick {
            Self {
                warmup: Duration::from_secs(1),
                messages: 400,
            }
        } else {
            Self {
                warmup: Duration::from_millis(5500),
                messages: 3000,
            }
        }
    }

    fn stream(&self) -> Duration {
        Duration::from_secs_f64(self.messages as f64 / RATE as f64)
    }
}

/// Sleeps until `due` (an absolute schedule, so pacing does not drift).
fn sleep_until(due: Instant) {
    if let Some(wait) = due.checked_duration_since(Instant::now()) {
        std::thread::sleep(wait);
    }
}

fn sender_socket() -> Result<UdpSocket> {
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("bind a sender socket")?;
    sock.set_multicast_ttl_v4(1)?;
    Ok(sock)
}

/// The hostile socket: heartbeat pairs for made-up ids at [`FLOOD_RATE`] until all are sent,
/// `stop` is set or `until` passes. Returns the datagrams sent.
fn hostile(stop: &AtomicBool, until: Instant) -> Result<u64> {
    let sock = sender_socket()?;
    let mut out = String::new();
    let start = Instant::now();
    let step = Duration::from_secs_f64(1.0 / FLOOD_RATE as f64);
    let mut sent = 0u64;
    'ids: for i in 0..FAKE_IDS {
        // Made-up, and far from the legitimate id.
        let id = InstanceId(0x0bad_0000_0000_0000 | i);
        for seq in [0, SECOND_SEQ] {
            if stop.load(Ordering::Relaxed) || Instant::now() >= until {
                break 'ids;
            }
            load::tagged(id, seq, Kind::Heartbeat, "x", "", &mut out)?;
            // A full socket buffer is the victim's loss, not ours to count.
            let _ = sock.send_to(out.as_bytes(), GROUP);
            sent += 1;
            sleep_until(start + step * u32::try_from(sent).unwrap_or(u32::MAX));
        }
    }
    Ok(sent)
}

/// `utime + stime` in seconds (USER_HZ is 100), and `VmHWM`/`VmRSS` in KiB.
fn usage(pid: u32) -> Option<(f64, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    Some((ticks / 100.0, kib("VmHWM:")?, kib("VmRSS:")?))
}

/// One run: the victim, the legitimate stream and, if `flood`, the hostile socket.
pub(crate) fn run(mcchat: &Path, rooms: &Path, flood: bool, plan: Plan) -> Result<Value> {
    // The victim's own datagrams (NACKs: a listener sends nothing else) leave from the
    // room's port; the load tools' sockets have ephemeral ports.
    let _ = nft("delete table inet mcflood");
    nft("add table inet mcflood")?;
    nft("add chain inet mcflood out { type filter hook output priority 0 ; }")?;
    nft(&format!(
        "add rule inet mcflood out udp sport {0} udp dport {0} counter",
        GROUP.port()
    ))?;
    let result = run_counted(mcchat, rooms, flood, plan);
    let _ = nft("delete table inet mcflood");
    result
}

fn run_counted(mcchat: &Path, rooms: &Path, flood: bool, plan: Plan) -> Result<Value> {
    let (victim, lines) = start(
        mcchat,
        rooms,
        &["listen", "room1", "--json"],
        "listening to",
    )?;
    let pid = victim.0.id();
    let (cpu0, _, _) = usage(pid).context("read the victim's /proc entries")?;
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = flood.then(|| {
        let stop = Arc::clone(&stop);
        // Bounded by time too: the warm-up, the stream and a second.
        let until = t0 + plan.warmup + plan.stream() + Duration::from_secs(1);
        std::thread::spawn(move || hostile(&stop, until))
    });
    sleep_until(t0 + plan.warmup);
    // The legitimate stream: tagged messages whose text is the send time in ns.
    let sock = sender_socket()?;
    let mut out = String::new();
    let stream_at = Instant::now();
    let step = Duration::from_secs_f64(1.0 / RATE as f64);
    for seq in 1..=plan.messages {
        load::tagged(
            LEGIT,
            seq,
            Kind::Message,
            LEGIT_NAME,
            &now_ns().to_string(),
            &mut out,
        )?;
        let _ = sock.send_to(out.as_bytes(), GROUP);
        sleep_until(stream_at + step * u32::try_from(seq).unwrap_or(u32::MAX));
    }
    let stream_secs = stream_at.elapsed().as_secs_f64();
    // Read what the victim showed, until the whole stream is in or reported lost.
    let deadline = Instant::now() + DRAIN;
    let mut latencies = Vec::new();
    let mut seen = vec![false; usize::try_from(plan.messages).unwrap_or(0) + 1];
    let (mut duplicates, mut lost_legit, mut lost_lines, mut lost_other) = (0u64, 0, 0u64, 0u64);
    let (mut joins, mut skipped, mut lines_total) = (0u64, 0u64, 0u64);
    while (latencies.len() as u64) + lost_legit < plan.messages {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok((at, line)) = lines.recv_timeout(left) else {
            break;
        };
        lines_total += 1;
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let text = v["text"].as_str().unwrap_or("");
        match v["kind"].as_str() {
            Some("message") if v["id"].as_str() == Some(&LEGIT.to_string()) => {
                let seq = v["seq"].as_u64().unwrap_or(0) as usize;
                match seen.get_mut(seq) {
                    Some(s) if !*s => *s = true,
                    _ => {
                        duplicates += 1;
                        continue;
                    }
                }
                let sent: u64 = text.parse().unwrap_or(at);
                latencies.push(at.saturating_sub(sent) as f64 / 1e6);
            }
            Some("lost") => {
                let n: u64 = text.trim_end_matches(" lost").parse::<u64>().unwrap_or(0);
                lost_lines += 1;
                // By name if the victim's roster has the sender, else by instance id.
                let sender = v["sender"].as_str().unwrap_or("");
                if sender == LEGIT_NAME || sender == format!("sender {LEGIT}") {
                    lost_legit += n;
                } else {
                    lost_other += n;
                }
            }
            Some("join") => joins += 1,
            Some("skipped") => {
                skipped += text
                    .trim_end_matches(" not shown")
                    .parse::<u64>()
                    .unwrap_or(0);
            }
            _ => {}
        }
    }
    stop.store(true, Ordering::Relaxed);
    let flood_sent = match flooder {
        Some(h) => match h.join() {
            Ok(r) => r?,
            Err(_) => bail!("the hostile sender panicked"),
        },
        None => 0,
    };
    let wall = t0.elapsed().as_secs_f64();
    let (cpu1, hwm, rss) = usage(pid).context("read the victim's /proc entries")?;
    let (nacks, nack_bytes) = counter("mcflood")?;
    drop(victim);
    latencies.sort_by(f64::total_cmp);
    let late = latencies.iter().filter(|ms| **ms > LATE_MS).count();
    Ok(json!({
        "flood": flood,
        "flood_datagrams": flood_sent,
        "fake_ids": flood_sent.div_ceil(2),
        "flood_rate": if flood { FLOOD_RATE } else { 0 },
        "sent": plan.messages,
        "rate": RATE,
        "stream_secs": stream_secs,
        "delivered": latencies.len(),
        "duplicates": duplicates,
        "reported_lost": lost_legit,
        "late_over_1s": late,
        "latency_ms": {
            "p50": quantile(&latencies, 0.5),
            "p99": quantile(&latencies, 0.99),
            "max": latencies.last().copied(),
        },
        "victim_cpu_s": cpu1 - cpu0,
        "wall_s": wall,
        "victim_cpu_share": (cpu1 - cpu0) / wall.max(1e-9),
        "victim_peak_rss_kib": hwm,
        "victim_rss_kib": rss,
        "victim_nacks": nacks,
        "victim_nack_bytes": nack_bytes,
        "output_lines": lines_total,
        "lost_lines": lost_lines,
        "lost_other_senders": lost_other,
        "join_lines": joins,
        "skipped": skipped,
    }))
}
