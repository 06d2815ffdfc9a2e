//! The benchmark suite: starts the relays, drives the load tools, and reports each figure
//! for mcchat, for node-relay.js and for the kernel's own path, with ratios. Runs only inside
//! the namespace scripts/bench.sh makes (it checks).

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::load::{self, Receiver};

/// The room's group: what receivers join and the no-relay path sends to.
const GROUP: &str = "239.255.77.1:5555";
/// Where the relay under test listens.
const RELAY: &str = "127.0.0.1:5554";
/// Loss that still counts as "no loss" when searching for the highest rate.
pub(crate) const MAX_LOSS: f64 = 0.001;
/// Datagram size for throughput and latency (the figure: 64 bytes).
pub(crate) const SIZE: usize = 64;

/// Options from the command line.
pub(crate) struct Opts {
    pub(crate) quick: bool,
    pub(crate) mcchatd: PathBuf,
    pub(crate) mcchat: PathBuf,
    pub(crate) peers: PathBuf,
    pub(crate) out: PathBuf,
    pub(crate) criterion: PathBuf,
}

/// A relay process under test.
pub(crate) struct Relay {
    name: &'static str,
    child: Option<Child>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Relay {
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// Spawns `cmd` and waits for a line containing `ready` on stdout or stderr.
fn spawn_ready(name: &'static str, cmd: Command, ready: &str) -> Result<Relay> {
    spawn_ready_all(name, cmd, &[ready])
}

/// Starts `cmd` and waits (10 s at most) until it has printed a line containing each of
/// `ready`, in any order.
pub(crate) fn spawn_ready_all(
    name: &'static str,
    mut cmd: Command,
    ready: &[&str],
) -> Result<Relay> {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    let (tx, rx) = mpsc::channel::<String>();
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        // MCBENCH_LOG set: what the server prints goes on to stderr (while debugging a run).
        let echo = std::env::var_os("MCBENCH_LOG").is_some();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("{name}: {line}");
                }
                let _ = tx.send(line);
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut waiting: Vec<&str> = ready.to_vec();
    while !waiting.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => waiting.retain(|r| !line.contains(r)),
            Err(_) => {
                let _ = child.kill();
                bail!("{name} did not report ready");
            }
        }
    }
    Ok(Relay {
        name,
        child: Some(child),
    })
}

/// mcchatd as shipped (history on), with a fresh state directory of its own under the
/// results directory.
fn mcchatd(opts: &Opts, rooms: &Path, history: bool) -> Result<Relay> {
    let state = rooms.with_file_name("mcchatd-state");
    let _ = std::fs::remove_dir_all(&state);
    let mut cmd = Command::new(&opts.mcchatd);
    cmd.args(["--listen", RELAY, "--status-socket", "", "--rooms"])
        .arg(rooms);
    if history {
        cmd.arg("--state-dir").arg(&state);
    } else {
        cmd.arg("--no-history");
    }
    spawn_ready("mcchatd", cmd, "mcchatd ready")
}

fn node_relay(opts: &Opts) -> Result<Option<Relay>> {
    let script = opts.peers.join("node-relay.js");
    if Command::new("node").arg("--version").output().is_err() || !script.exists() {
        return Ok(None);
    }
    let mut cmd = Command::new("node");
    cmd.arg(&script)
        .env("RELAY_PORT", "5554")
        .env("RELAY_HOST", "127.0.0.1")
        .env("MCAST_IF", "127.0.0.1");
    spawn_ready("node-relay.js", cmd, "relay listening").map(Some)
}

/// Where the WebSocket servers under test listen.
const WEB_MCCHATD: &str = "127.0.0.1:8090";
const WEB_NODE: &str = "127.0.0.1:8091";

/// mcchatd serving its page and WebSocket (history on, as shipped), with a fresh state
/// directory unless `keep` (a restart).
fn mcchatd_web(opts: &Opts, rooms: &Path, keep: bool) -> Result<Relay> {
    let state = rooms.with_file_name("mcchatd-web-state");
    if !keep {
        let _ = std::fs::remove_dir_all(&state);
    }
    let mut cmd = Command::new(&opts.mcchatd);
    cmd.args([
        "--listen",
        RELAY,
        "--status-socket",
        "",
        "--web",
        WEB_MCCHATD,
        "--rooms",
    ])
    .arg(rooms)
    .arg("--state-dir")
    .arg(&state);
    spawn_ready("mcchatd", cmd, "mcchatd ready")
}

fn node_ws(opts: &Opts) -> Result<Option<Relay>> {
    let script = opts.peers.join("node-ws-rooms.js");
    if Command::new("node").arg("--version").output().is_err()
        || !script.exists()
        || !opts.peers.join("node_modules/ws").exists()
    {
        return Ok(None);
    }
    let mut cmd = Command::new("node");
    cmd.arg(&script)
        .env("PORT", "8091")
        .env("HOST", "127.0.0.1");
    spawn_ready("node-ws-rooms.js", cmd, "ws rooms server listening").map(Some)
}

/// WebSocket rooms (section 7): fan-out from one sender to 100 receivers at saturation and
/// at 1,000 messages a second, and the memory of idle connections; mcchatd's gateway and
/// node-ws-rooms.js in turn.
fn websocket(opts: &Opts, rooms: &Path, runs: usize) -> Result<Value> {
    let mut out = BTreeMap::new();
    let (count, paced, sizes): (u64, u64, &[usize]) = if opts.quick {
        (500, 300, &[100])
    } else {
        (20_000, 3000, &[1000, 10_000])
    };
    let (rates, sweep_secs): (&[u64], f64) = if opts.quick {
        (&[1000, 5000], 0.2)
    } else {
        (&[1000, 2000, 5000, 10_000, 20_000, 40_000], 1.5)
    };
    for name in ["mcchatd", "node"] {
        let (relay, addr) = match name {
            "mcchatd" => (Some(mcchatd_web(opts, rooms, false)?), WEB_MCCHATD),
            _ => (node_ws(opts)?, WEB_NODE),
        };
        let Some(relay) = relay else {
            eprintln!(
                "bench: node-ws-rooms.js not run: Node.js, the script or its ws package missing"
            );
            continue;
        };
        let url = format!("ws://{addr}/ws");
        eprintln!("bench: websocket fan-out of {}", relay.name);
        let (mut rate, mut p50, mut p99, mut share) = (vec![], vec![], vec![], vec![]);
        let (mut read_p50, mut read_p99) = (vec![], vec![]);
        // MCBENCH_ONLY=wslatency: the trials at 1,000 msg/s alone, five of each.
        let latency_only = std::env::var("MCBENCH_ONLY").is_ok_and(|o| o == "wslatency");
        for _ in 0..if latency_only { 5 } else { runs } {
            if !latency_only {
                let sat = crate::ws::fanout_windowed(&url, 100, count, None)?;
                rate.push(sat.deliveries_per_s);
                share.push(sat.delivered as f64 / (sat.sent * 100) as f64);
            }
            let at = crate::ws::fanout(&url, 100, paced, Some(1000))?;
            p50.push(at.latency_us.value_at_quantile(0.5) as f64);
            p99.push(at.latency_us.value_at_quantile(0.99) as f64);
            read_p50.push(at.read_latency_us.value_at_quantile(0.5) as f64);
            read_p99.push(at.read_latency_us.value_at_quantile(0.99) as f64);
            if latency_only {
                eprintln!(
                    "bench: {} at 1,000 msg/s: p50 {} p99 {} µs to arrival, p99 {} µs to read",
                    relay.name,
                    at.latency_us.value_at_quantile(0.5),
                    at.latency_us.value_at_quantile(0.99),
                    at.read_latency_us.value_at_quantile(0.99)
                );
            }
        }
        if latency_only {
            out.insert(
                name,
                json!({"p50_us": summary(p50), "p99_us": summary(p99), "read_p99_us": summary(read_p99)}),
            );
            continue;
        }
        let pid = relay.pid().unwrap_or(0);
        // Deliveries against the offered rate (the plot in docs/PERFORMANCE.md).
        let mut curve = Vec::new();
        for &r in rates {
            let got =
                crate::ws::fanout_windowed(&url, 100, (r as f64 * sweep_secs) as u64, Some(r))?;
            curve.push(json!({"offered_per_s": r * 100, "deliveries_per_s": got.deliveries_per_s}));
        }
        // One of 100 receivers stops reading at 1,000 msg/s: the others' latency, and the
        // server's memory with it stuck.
        let rss_before = proc_stat(pid).map_or(0, |s| s.1);
        let mut rss_stuck = 0;
        let slow = crate::ws::fanout_stalled(
            &url,
            99,
            1,
            paced * 3,
            crate::ws::Pace::new(Some(1000)),
            |_| {
                rss_stuck = proc_stat(pid).map_or(0, |s| s.1);
            },
        )?;
        let mut memory = BTreeMap::new();
        for &n in sizes {
            let before = proc_stat(pid).map_or(0, |s| s.1);
            let held = crate::ws::idle(&url, n)?;
            let after = proc_stat(pid).map_or(0, |s| s.1);
            drop(held);
            memory.insert(
                n.to_string(),
                json!({"rss_kib_before": before, "rss_kib_after": after,
                       "kib_per_connection": (after.saturating_sub(before)) as f64 / n as f64}),
            );
        }
        out.insert(
            name,
            json!({
                "deliveries_per_s": summary(rate),
                "delivered_share": summary(share),
                "latency_1000_per_s_p50_us": summary(p50),
                "latency_1000_per_s_p99_us": summary(p99),
                "read_latency_1000_per_s_p50_us": summary(read_p50),
                "read_latency_1000_per_s_p99_us": summary(read_p99),
                "idle_memory": memory,
                "offered_curve": curve,
                "one_stalled": {
                    "p50_us": slow.latency_us.value_at_quantile(0.5),
                    "p99_us": slow.latency_us.value_at_quantile(0.99),
                    "read_p99_us": slow.read_latency_us.value_at_quantile(0.99),
                    "delivered_share": slow.delivered as f64 / (slow.sent * 99) as f64,
                    "rss_kib_before": rss_before,
                    "rss_kib_stalled": rss_stuck,
                },
            }),
        );
    }
    if std::env::var("MCBENCH_ONLY").is_ok_and(|o| o == "wslatency") {
        return Ok(json!(out));
    }
    out.insert("reconnect_storm", storm(opts, rooms)?);
    Ok(json!(out))
}

/// 1,000 clients in a room while a LAN peer says 600 messages at 100 a second; mcchatd is
/// restarted after 200: how long until every client is back, and what each saw twice or
/// never.
fn storm(opts: &Opts, rooms: &Path) -> Result<Value> {
    use std::io::Write as _;
    let (clients, count) = if opts.quick { (100, 150) } else { (1000, 600) };
    eprintln!("bench: reconnect storm of {clients} web clients");
    let mut relay = mcchatd_web(opts, rooms, false)?;
    let mut peer = Command::new(&opts.mcchat)
        .args(["join", "wsstorm", "--name", "storm", "--rooms"])
        .arg(rooms)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start the storm's LAN peer")?;
    let mut stdin = peer.stdin.take().context("the peer's stdin")?;
    let url = format!("ws://{WEB_MCCHATD}/ws");
    let result = crate::ws::storm(
        &url,
        "wsstorm",
        clients,
        count,
        100,
        |i| writeln!(stdin, "{i}").context("the storm's LAN peer"),
        || {
            if let Some(pid) = relay.pid() {
                let _ = Command::new("kill").arg(pid.to_string()).status();
            }
            if let Some(c) = &mut relay.child {
                let _ = c.wait();
            }
            relay = mcchatd_web(opts, rooms, true)?;
            Ok(())
        },
    );
    let _ = peer.kill();
    let _ = peer.wait();
    let s = result?;
    Ok(json!({
        "clients": s.clients,
        "sent": s.sent,
        "rejoined": s.rejoined,
        "rejoin_ms": s.rejoin_ms,
        "duplicates": s.duplicates,
        "missing": s.missing,
        "reported_lost": s.reported_lost,
    }))
}

/// No relay: the sender speaks to the group itself.
fn kernel() -> Relay {
    Relay {
        name: "kernel",
        child: None,
    }
}

fn target_of(relay: &Relay) -> SocketAddr {
    let addr = if relay.child.is_some() { RELAY } else { GROUP };
    addr.parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 5554)))
}

/// One run at `rate` for `secs`: (achieved offered rate, loss, receiver).
fn trial(relay: &Relay, rate: u64, secs: f64) -> Result<(f64, f64, load::Received)> {
    let group: SocketAddr = GROUP.parse()?;
    let rx = Receiver::start(group, Duration::from_millis(150))?;
    // mcchatd's sender proves its address first, as `mcchat send --via` does: unproven
    // sources share 50 datagrams a second (PROTOCOL.md 4.3), and the cookie on every
    // datagram is part of the relay's cost.
    let prove = relay.name == "mcchatd";
    let sent = load::send(target_of(relay), rate, secs, SIZE, prove)?;
    let got = rx.finish()?;
    if got.duplicates > 0 || got.reordered > 0 {
        eprintln!(
            "bench: {} at {rate}/s: {} duplicates, {} out of order",
            relay.name, got.duplicates, got.reordered
        );
    }
    let loss = 1.0 - (got.count as f64 / sent.count.max(1) as f64);
    Ok((sent.count as f64 / sent.secs, loss.max(0.0), got))
}

/// With MCBENCH_TRACE set, each trial of the throughput search on stderr.
fn trace_trial(relay: &Relay, rate: u64, achieved: f64, loss: f64) {
    if std::env::var_os("MCBENCH_TRACE").is_some() {
        eprintln!(
            "bench: {} at {rate} msg/s: sent {achieved:.0}/s, loss {loss:.5}",
            relay.name
        );
    }
}

/// The highest offered rate with under 0.1% loss: doubling, then bisection.
fn max_rate(relay: &Relay, secs: f64, steps: u32) -> Result<f64> {
    let mut ok = 0f64;
    let mut rate = 20_000u64;
    let mut bad = None;
    while rate <= 2_000_000 {
        let (achieved, loss, _) = trial(relay, rate, secs)?;
        trace_trial(relay, rate, achieved, loss);
        if loss < MAX_LOSS && achieved > rate as f64 * 0.95 {
            ok = achieved;
            rate *= 2;
        } else {
            bad = Some(rate);
            break;
        }
    }
    let Some(mut hi) = bad else { return Ok(ok) };
    let mut lo = (ok as u64).max(1);
    for _ in 0..steps {
        let mid = (lo + hi) / 2;
        let (achieved, loss, _) = trial(relay, mid, secs)?;
        trace_trial(relay, mid, achieved, loss);
        if loss < MAX_LOSS && achieved > mid as f64 * 0.95 {
            lo = mid;
            ok = ok.max(achieved);
        } else {
            hi = mid;
        }
    }
    Ok(ok)
}

/// Median, min and max.
pub(crate) fn summary(mut v: Vec<f64>) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_by(f64::total_cmp);
    let median = v.get(v.len() / 2).copied().unwrap_or(0.0);
    json!({
        "median": median,
        "min": v.first().copied().unwrap_or(0.0),
        "max": v.last().copied().unwrap_or(0.0),
        "runs": v.len(),
    })
}

/// The command name and the CPU seconds (user + system) of a `/proc/.../stat` line.
fn stat_cpu(stat: &str) -> Option<(&str, f64)> {
    // The name is in parentheses and may contain spaces: the fields follow the last ')'.
    let (head, rest) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on every Linux architecture that matters here.
    Some((name, ticks / 100.0))
}

pub(crate) fn proc_stat(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, cpu) = stat_cpu(&stat)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((cpu, rss_kib))
}

/// CPU seconds (user + system) of each thread of `pid`, by thread name (threads of one
/// name summed): where a relay's CPU goes.
fn thread_cpu(pid: u32) -> BTreeMap<String, f64> {
    let mut by_name = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_name;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        if let Some((name, cpu)) = stat_cpu(&stat) {
            *by_name.entry(name.to_string()).or_default() += cpu;
        }
    }
    by_name
}

/// The bench's rooms file: mcchatd's per-source rates out of the way of one sender's 40,000
/// datagrams a second (its cookie proves its address; unproven sources keep their default
/// budget), and its per-source cap out of the way of 10,000 subscribers on this one host
/// (which counts as one source).
fn rooms_file(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("bench-rooms.toml");
    std::fs::write(
        &path,
        "[daemon]\nrelay_rate = 1000000\nrelay_burst = 1000000\nsubscribe_rate = 1000000\n\
         subscribe_burst = 1000000\nmax_subscribers = 20000\n\
         max_subscriptions_per_source = 20000\n\n\
         [web]\nrate = 1000000\nburst = 1000000\nmax_connections = 20000\n\n\
         [rooms.wsstorm]\ngroup = \"239.255.77.9\"\nport = 5559\n\n\
         [rooms.room1]\ngroup = \"239.255.77.1\"\nport = 5555\n",
    )?;
    Ok(path)
}

/// Runs everything; returns the results document.
pub(crate) fn run(opts: &Opts) -> Result<Value> {
    let dir = opts
        .out
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    std::fs::create_dir_all(&dir)?;
    let rooms = rooms_file(&dir)?;
    let (runs, secs, steps) = if opts.quick {
        (1, 0.25, 2)
    } else {
        (3, 1.0, 5)
    };
    let mut results = BTreeMap::<String, Value>::new();
    // MCBENCH_ONLY=part: that part alone (while working on it); see scripts/bench.sh.
    let only = std::env::var("MCBENCH_ONLY").unwrap_or_default();
    if only == "websocket" || only == "wslatency" {
        results.insert("websocket".into(), websocket(opts, &rooms, runs)?);
        return Ok(json!(results));
    }
    if only == "sites" {
        results.insert("sites".into(), crate::sites::sites(opts, &dir, runs)?);
        return Ok(json!(results));
    }

    // 1. Throughput, each relay alone on the machine in turn.
    let mut throughput = BTreeMap::new();
    let mut latency = BTreeMap::new();
    let mut cpu = BTreeMap::new();
    let mut load_cpu = BTreeMap::new();
    // cpu: the CPU trials alone, each relay's threads apart (the kernel path has no process
    // of its own); fanout: the fan-out and memory part alone.
    let cpu_only = only == "cpu";
    let relays: &[&str] = match only.as_str() {
        "fanout" => &[],
        "cpu" => &["mcchatd", "mcchatd_no_history", "node"],
        _ => &["kernel", "mcchatd", "mcchatd_no_history", "node"],
    };
    for &name in relays {
        let relay = match name {
            "kernel" => Some(kernel()),
            "mcchatd" => Some(mcchatd(opts, &rooms, true)?),
            "mcchatd_no_history" => Some(mcchatd(opts, &rooms, false)?),
            _ => node_relay(opts)?,
        };
        let Some(relay) = relay else {
            eprintln!(
                "bench: node-relay.js not run: Node.js or {} missing",
                opts.peers.display()
            );
            continue;
        };
        eprintln!("bench: throughput of {}", relay.name);
        let mut v = Vec::new();
        // The CPU trials alone skip the throughput search and the latency trials.
        let (searches, rates): (usize, &[u64]) = if cpu_only {
            (0, &[])
        } else {
            (runs, &[10_000, 50_000])
        };
        for _ in 0..searches {
            v.push(max_rate(&relay, secs, steps)?);
        }
        throughput.insert(name, summary(v));
        // 2. Latency at fixed rates.
        let mut by_rate = BTreeMap::new();
        for &rate in rates {
            let (mut p50, mut p99, mut p999, mut loss) = (vec![], vec![], vec![], vec![]);
            for _ in 0..runs {
                let (_, l, got) = trial(&relay, rate, secs)?;
                p50.push(got.latency_us.value_at_quantile(0.5) as f64);
                p99.push(got.latency_us.value_at_quantile(0.99) as f64);
                p999.push(got.latency_us.value_at_quantile(0.999) as f64);
                loss.push(l);
            }
            by_rate.insert(
                rate.to_string(),
                json!({"p50_us": summary(p50), "p99_us": summary(p99), "p999_us": summary(p999), "loss": summary(loss)}),
            );
        }
        latency.insert(name, by_rate);
        // 4. CPU per million relayed at 40,000 msg/s: the relay's, and the load's own (the
        // sender and the receiver, in this process), which with the kernel path is the floor
        // any relay adds to.
        let me = std::process::id();
        let (mut v, mut l) = (Vec::new(), Vec::new());
        let trial_secs = if cpu_only { 5.0 } else { secs.max(0.5) };
        for _ in 0..runs {
            let before = relay.pid().and_then(proc_stat).map_or(0.0, |s| s.0);
            let threads_before = relay.pid().map(thread_cpu).unwrap_or_default();
            let load_before = proc_stat(me).map_or(0.0, |s| s.0);
            let (_, _, got) = trial(&relay, 40_000, trial_secs)?;
            let after = relay.pid().and_then(proc_stat).map_or(0.0, |s| s.0);
            let threads_after = relay.pid().map(thread_cpu).unwrap_or_default();
            let load_after = proc_stat(me).map_or(0.0, |s| s.0);
            let per_million = |s: f64| s / got.count.max(1) as f64 * 1e6;
            v.push(per_million(after - before));
            l.push(per_million(load_after - load_before));
            if cpu_only || std::env::var_os("MCBENCH_TRACE").is_some() {
                let split: Vec<String> = threads_after
                    .iter()
                    .map(|(thread, t)| {
                        let t0 = threads_before.get(thread).copied().unwrap_or(0.0);
                        format!("{thread} {:.2}", per_million(t - t0))
                    })
                    .collect();
                eprintln!(
                    "bench: {} CPU s per million at 40,000 msg/s: {:.2} ({})",
                    relay.name,
                    per_million(after - before),
                    split.join(", ")
                );
            }
        }
        if relay.pid().is_some() {
            cpu.insert(name, summary(v));
        }
        load_cpu.insert(name, summary(l));
    }
    results.insert("throughput_msgs_per_s".into(), json!(throughput));
    results.insert("latency".into(), json!(latency));
    results.insert("cpu_s_per_million".into(), json!(cpu));
    results.insert("load_cpu_s_per_million".into(), json!(load_cpu));
    // MCBENCH_ONLY=relay: throughput, latency and CPU alone (while working on them).
    if cpu_only || only == "relay" {
        return Ok(json!(results));
    }

    // 3. Fan-out and 4. memory, through mcchatd.
    let mut fanout = BTreeMap::new();
    let mut memory = BTreeMap::new();
    let sizes: &[usize] = if opts.quick {
        &[1, 100, 1000]
    } else {
        &[1, 100, 10_000]
    };
    for &n in sizes {
        let relay = mcchatd(opts, &rooms, true)?;
        let pid = relay.pid().unwrap_or(0);
        if n == 1 {
            memory.insert("idle_rss_kib", json!(proc_stat(pid).map_or(0, |s| s.1)));
        }
        let subs = load::subscribe(RELAY.parse()?, n)?;
        if n == *sizes.last().unwrap_or(&1) {
            let rss = proc_stat(pid).map_or(0, |s| s.1);
            memory.insert("subscribers", json!(n));
            memory.insert("rss_kib_with_subscribers", json!(rss));
        }
        let (mut last_ms, mut rate) = (vec![], vec![]);
        for _ in 0..runs {
            // One message: how long until the last subscriber has it.
            let one = load::single(GROUP.parse()?, SIZE)?;
            let (last, got) = load::drain(&subs, 1);
            if got < n as u64 {
                eprintln!("bench: fan-out to {n}: {got} delivered");
            }
            last_ms.push(last.saturating_sub(one) as f64 / 1e6);
            // A burst: deliveries per second.
            let burst = (20_000 / n).clamp(5, 1000);
            let first = load::now_ns();
            for _ in 0..burst {
                load::single(GROUP.parse()?, SIZE)?;
            }
            let (last, got) = load::drain(&subs, burst);
            rate.push(got as f64 / (last.saturating_sub(first).max(1) as f64 / 1e9));
        }
        fanout.insert(
            n.to_string(),
            json!({"time_to_last_ms": summary(last_ms), "deliveries_per_s": summary(rate)}),
        );
        drop(relay);
    }
    results.insert("fanout".into(), json!(fanout));
    if only == "fanout" {
        results.insert("memory".into(), json!(memory));
        return Ok(json!(results));
    }

    // 6. Loss repair end to end: repair latency and bytes on the wire at 0% and 10% loss.
    let (count, rate) = if opts.quick { (200, 200) } else { (2000, 200) };
    let mut repair = BTreeMap::new();
    for loss in [0u32, 10] {
        eprintln!("bench: repair at {loss}% loss");
        let mut runs_out = Vec::new();
        for _ in 0..runs {
            runs_out.push(crate::repair::run(&opts.mcchat, &rooms, loss, count, rate)?);
        }
        let pick =
            |f: &dyn Fn(&Value) -> Option<f64>| summary(runs_out.iter().filter_map(f).collect());
        repair.insert(
            format!("loss_{loss}"),
            json!({
                "repair_latency_p50_ms": pick(&|v| v["repair_latency_ms"]["p50"].as_f64()),
                "repair_latency_p99_ms": pick(&|v| v["repair_latency_ms"]["p99"].as_f64()),
                "latency_p50_ms": pick(&|v| v["latency_ms"]["p50"].as_f64()),
                "latency_p99_ms": pick(&|v| v["latency_ms"]["p99"].as_f64()),
                "wire_bytes_per_delivered": pick(&|v| v["wire_bytes_per_delivered"].as_f64()),
                // The loss nftables drew: the latency figures move with it (a gap that is
                // repaired late holds the messages behind it).
                "drop_share": pick(&|v| Some(
                    v["dropped_by_nft"].as_f64()? / v["wire_packets"].as_f64()?.max(1.0)
                )),
                "runs": runs_out,
            }),
        );
    }
    results.insert("repair".into(), json!(repair));

    // 8. A peer under a presence flood (issue 9): the victim with and without it, in turn.
    let plan = crate::flood::Plan::new(opts.quick);
    let mut flood_runs: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for _ in 0..runs {
        for (name, on) in [("baseline", false), ("flood", true)] {
            eprintln!("bench: presence flood: {name}");
            let v = crate::flood::run(&opts.mcchat, &rooms, on, plan)?;
            flood_runs.entry(name).or_default().push(v);
        }
    }
    let mut flood = BTreeMap::new();
    for (name, runs_out) in flood_runs {
        let pick =
            |f: &dyn Fn(&Value) -> Option<f64>| summary(runs_out.iter().filter_map(f).collect());
        flood.insert(
            name,
            json!({
                "latency_p50_ms": pick(&|v| v["latency_ms"]["p50"].as_f64()),
                "latency_p99_ms": pick(&|v| v["latency_ms"]["p99"].as_f64()),
                "latency_max_ms": pick(&|v| v["latency_ms"]["max"].as_f64()),
                "delivered_share": pick(&|v| Some(
                    v["delivered"].as_f64()? / v["sent"].as_f64()?.max(1.0)
                )),
                "late_over_1s": pick(&|v| v["late_over_1s"].as_f64()),
                "victim_cpu_s": pick(&|v| v["victim_cpu_s"].as_f64()),
                "victim_cpu_share": pick(&|v| v["victim_cpu_share"].as_f64()),
                "victim_peak_rss_kib": pick(&|v| v["victim_peak_rss_kib"].as_f64()),
                "victim_nacks": pick(&|v| v["victim_nacks"].as_f64()),
                "output_lines": pick(&|v| v["output_lines"].as_f64()),
                "runs": runs_out,
            }),
        );
    }
    results.insert("presence_flood".into(), json!(flood));

    results.insert("websocket".into(), websocket(opts, &rooms, runs)?);
    results.insert("sites".into(), crate::sites::sites(opts, &dir, runs)?);

    // 4. The CLI: start-up to ready, and its RSS.
    let (mut ready_ms, mut rss) = (vec![], vec![]);
    for _ in 0..if opts.quick { 3 } else { 10 } {
        let t0 = Instant::now();
        let mut child = Command::new(&opts.mcchat)
            .args(["join", "startup", "--name", "bench"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start mcchat")?;
        let mut err = BufReader::new(child.stderr.take().context("stderr")?);
        let mut line = String::new();
        while err.read_line(&mut line)? > 0 && !line.contains("mcchat: joined") {
            line.clear();
        }
        ready_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        rss.push(proc_stat(child.id()).map_or(0, |s| s.1) as f64);
        let _ = child.kill();
        let _ = child.wait();
    }
    memory.insert("mcchat_join_rss_kib", summary(rss));
    results.insert("mcchat_join_ready_ms".into(), summary(ready_ms));
    results.insert("memory".into(), json!(memory));

    // 5. Codec and history micro-benchmarks, if criterion ran.
    let mut codec = BTreeMap::new();
    let estimate = |group: &str, name: &str| -> Option<f64> {
        let p = opts
            .criterion
            .join(group)
            .join(name)
            .join("new/estimates.json");
        let v: Value = serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()?;
        v["mean"]["point_estimate"].as_f64()
    };
    for name in ["decode_tagged", "decode_bare", "encode_tagged"] {
        if let Some(ns) = estimate("codec", name) {
            codec.insert(name, json!(ns));
        }
    }
    results.insert("codec_ns".into(), json!(codec));
    // The presence flood on one engine: ms per attack (4,096 ids, two heartbeats each, then
    // one simulated second of timers).
    let mut flood_bench = BTreeMap::new();
    for name in ["seq_60", "seq_2048"] {
        if let Some(ns) = estimate("flood", name) {
            flood_bench.insert(name, json!(ns / 1e6));
        }
    }
    results.insert("flood_bench_ms".into(), json!(flood_bench));
    // Each iteration commits 10,000 messages.
    if let Some(ns) = estimate("history", "write_10000") {
        results.insert("history_writes_per_s".into(), json!(10_000.0 / ns * 1e9));
    }
    Ok(json!(results))
}
