//! `mcbench`: the load tools and benchmark suite behind scripts/bench.sh. Not part of the
//! products: it drives them from outside, over real sockets, in a network namespace.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod flood;
mod load;
mod plot;
mod repair;
mod sites;
mod suite;
mod ws;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use serde_json::Value;

/// Runs the benchmark suite (inside scripts/bench.sh's network namespace).
#[derive(Debug, Parser)]
#[command(name = "mcbench")]
struct Cli {
    /// A short smoke pass: fewer, shorter runs
    #[arg(long)]
    quick: bool,
    /// The mcchatd binary
    #[arg(long)]
    mcchatd: PathBuf,
    /// The mcchat binary
    #[arg(long)]
    mcchat: PathBuf,
    /// The reference peers' directory (node-relay.js)
    #[arg(long)]
    peers: PathBuf,
    /// Where criterion wrote its estimates
    #[arg(long)]
    criterion: PathBuf,
    /// The JSON results file
    #[arg(long)]
    out: PathBuf,
}

/// Refuses to send a packet unless this process is in a namespace with only `lo`.
fn require_netns() -> Result<()> {
    let ifaces =
        mcchat_core::socket::namespace_interfaces().context("cannot read /proc/self/net/dev")?;
    if ifaces != ["lo"] {
        bail!(
            "refusing to run outside a network namespace with only lo ({ifaces:?}); use scripts/bench.sh"
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = require_netns().and_then(|()| {
        let opts = suite::Opts {
            quick: cli.quick,
            mcchatd: cli.mcchatd,
            mcchat: cli.mcchat,
            peers: cli.peers,
            out: cli.out.clone(),
            criterion: cli.criterion,
        };
        let mut results = suite::run(&opts)?;
        results["meta"] = serde_json::json!({
            "date": jiff_free_date(),
            "cores": std::thread::available_parallelism().map_or(0, usize::from),
            "quick": cli.quick,
        });
        std::fs::write(&cli.out, serde_json::to_string_pretty(&results)?)
            .with_context(|| format!("write {}", cli.out.display()))?;
        if let Some(svg) = plot::fanout_svg(&results["websocket"]) {
            let path = cli.out.with_file_name("ws-fanout.svg");
            std::fs::write(&path, svg).with_context(|| format!("write {}", path.display()))?;
        }
        print!("{}", table(&results));
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcbench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn jiff_free_date() -> String {
    std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%dT%H:%M:%SZ")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn med(v: &Value) -> Option<f64> {
    v["median"].as_f64().or_else(|| v.as_f64())
}

fn fmt(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) if x >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
    }
}

fn range(v: &Value) -> String {
    match (v["min"].as_f64(), v["max"].as_f64(), v["runs"].as_u64()) {
        (Some(a), Some(b), Some(n)) if n > 1 => format!(" ({}-{})", fmt(Some(a)), fmt(Some(b))),
        _ => String::new(),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    }
}

/// The results as one table: each figure for mcchat, node-relay.js and the kernel, with
/// ratios.
fn table(r: &Value) -> String {
    let mut o = String::new();
    let cell = |v: &Value| format!("{}{}", fmt(med(v)), range(v));
    // Writing to a String cannot fail; the results are ignored for that reason.
    let _ = writeln!(
        o,
        "{:<44} {:>22} {:>22} {:>22} {:>8} {:>8}",
        "figure", "mcchatd", "node-relay.js", "kernel (no relay)", "mc/node", "mc/kern"
    );
    let t = &r["throughput_msgs_per_s"];
    let _ = writeln!(
        o,
        "{:<44} {:>22} {:>22} {:>22} {:>8} {:>8}",
        "relay throughput, msg/s at <0.1% loss",
        cell(&t["mcchatd"]),
        cell(&t["node"]),
        cell(&t["kernel"]),
        ratio(med(&t["mcchatd"]), med(&t["node"])),
        ratio(med(&t["mcchatd"]), med(&t["kernel"])),
    );
    for rate in ["10000", "50000"] {
        for q in ["p50_us", "p99_us", "p999_us"] {
            let l = |who: &str| &r["latency"][who][rate][q];
            let _ = writeln!(
                o,
                "{:<44} {:>22} {:>22} {:>22} {:>8} {:>8}",
                format!("latency {q} at {rate} msg/s"),
                cell(l("mcchatd")),
                cell(l("node")),
                cell(l("kernel")),
                ratio(med(l("mcchatd")), med(l("node"))),
                ratio(med(l("mcchatd")), med(l("kernel"))),
            );
        }
    }
    let t = &r["throughput_msgs_per_s"]["mcchatd_no_history"];
    let _ = writeln!(
        o,
        "{:<44} {:>22}",
        "  mcchatd with history off: throughput",
        cell(t)
    );
    for rate in ["10000", "50000"] {
        let _ = writeln!(
            o,
            "{:<44} {:>22}",
            format!("  with history off: latency p99_us at {rate}"),
            cell(&r["latency"]["mcchatd_no_history"][rate]["p99_us"])
        );
    }
    let _ = writeln!(
        o,
        "{:<44} {:>22}",
        "  with history off: CPU s per million",
        cell(&r["cpu_s_per_million"]["mcchatd_no_history"])
    );
    let c = &r["cpu_s_per_million"];
    let _ = writeln!(
        o,
        "{:<44} {:>22} {:>22} {:>22} {:>8} {:>8}",
        "CPU s per million relayed (40,000 msg/s)",
        cell(&c["mcchatd"]),
        cell(&c["node"]),
        "-",
        ratio(med(&c["mcchatd"]), med(&c["node"])),
        "-",
    );
    let lc = &r["load_cpu_s_per_million"];
    let _ = writeln!(
        o,
        "{:<44} {:>22} {:>22} {:>22} {:>8} {:>8}",
        "  sender + receiver CPU s per million",
        cell(&lc["mcchatd"]),
        cell(&lc["node"]),
        cell(&lc["kernel"]),
        "-",
        "-",
    );
    if let Some(f) = r["fanout"].as_object() {
        let mut keys: Vec<&String> = f.keys().collect();
        keys.sort_by_key(|k| k.parse::<u64>().unwrap_or(0));
        for n in keys {
            let _ = writeln!(
                o,
                "{:<44} {:>22}",
                format!("fan-out to {n}: ms until the last has it"),
                cell(&f[n]["time_to_last_ms"])
            );
            let _ = writeln!(
                o,
                "{:<44} {:>22}",
                format!("fan-out to {n}: deliveries/s"),
                cell(&f[n]["deliveries_per_s"])
            );
        }
    }
    let m = &r["memory"];
    let idle = m["idle_rss_kib"].as_f64();
    let with = m["rss_kib_with_subscribers"].as_f64();
    let n = m["subscribers"].as_f64();
    let _ = writeln!(o, "{:<44} {:>22}", "mcchatd RSS idle, KiB", fmt(idle));
    let _ = writeln!(
        o,
        "{:<44} {:>22}",
        format!("mcchatd RSS with {} subscribers, KiB", fmt(n)),
        fmt(with)
    );
    let per = match (idle, with, n) {
        (Some(i), Some(w), Some(n)) if n > 0.0 => Some((w - i) / n * 1024.0),
        _ => None,
    };
    let _ = writeln!(o, "{:<44} {:>22}", "mcchatd bytes per subscriber", fmt(per));
    let _ = writeln!(
        o,
        "{:<44} {:>22}",
        "mcchat join: ms to ready",
        cell(&r["mcchat_join_ready_ms"])
    );
    let _ = writeln!(
        o,
        "{:<44} {:>22}",
        "mcchat join: RSS KiB",
        cell(&m["mcchat_join_rss_kib"])
    );
    if let Some(rep) = r["repair"].as_object() {
        for (k, v) in rep {
            let loss = k.trim_start_matches("loss_");
            for (key, what) in [
                ("repair_latency_p50_ms", "repair latency p50, ms"),
                ("repair_latency_p99_ms", "repair latency p99, ms"),
                ("latency_p50_ms", "latency p50 (all messages), ms"),
                ("latency_p99_ms", "latency p99 (all messages), ms"),
                (
                    "wire_bytes_per_delivered",
                    "bytes on the wire per delivered msg",
                ),
                ("drop_share", "share of datagrams nft dropped"),
            ] {
                let _ = writeln!(
                    o,
                    "{:<44} {:>22}",
                    format!("{what} at {loss}% loss"),
                    cell(&v[key])
                );
            }
        }
    }
    if let Some(f) = r["presence_flood"].as_object() {
        for (variant, label) in [("baseline", "off"), ("flood", "on")] {
            for (key, what) in [
                ("latency_p50_ms", "latency p50, ms"),
                ("latency_p99_ms", "latency p99, ms"),
                ("latency_max_ms", "latency max, ms"),
                ("delivered_share", "share of the stream shown"),
                ("victim_cpu_s", "victim CPU s"),
                ("victim_peak_rss_kib", "victim peak RSS, KiB"),
                ("victim_nacks", "victim NACKs sent"),
                ("output_lines", "victim output lines"),
            ] {
                if f.contains_key(variant) {
                    let _ = writeln!(
                        o,
                        "{:<44} {:>22}",
                        format!("presence flood {label}: {what}"),
                        cell(&f[variant][key]),
                    );
                }
            }
        }
    }
    let w = &r["websocket"];
    let _ = writeln!(
        o,
        "{:<44} {:>22} {:>22} {:>22} {:>8}",
        "websocket (100 receivers, 1 sender)", "mcchatd", "node-ws-rooms.js", "", "mc/node"
    );
    for (label, key) in [
        ("  deliveries/s at saturation", "deliveries_per_s"),
        (
            "  p50 us at 1,000 msg/s (to arrival)",
            "latency_1000_per_s_p50_us",
        ),
        (
            "  p99 us at 1,000 msg/s (to arrival)",
            "latency_1000_per_s_p99_us",
        ),
        (
            "  p50 us at 1,000 msg/s (to read)",
            "read_latency_1000_per_s_p50_us",
        ),
        (
            "  p99 us at 1,000 msg/s (to read)",
            "read_latency_1000_per_s_p99_us",
        ),
    ] {
        let _ = writeln!(
            o,
            "{:<44} {:>22} {:>22} {:>22} {:>8}",
            label,
            cell(&w["mcchatd"][key]),
            cell(&w["node"][key]),
            "",
            ratio(med(&w["mcchatd"][key]), med(&w["node"][key])),
        );
    }
    if let Some(sizes) = w["mcchatd"]["idle_memory"].as_object() {
        for (label, key) in [
            ("  one of 100 stalled: others' p99 us", "p99_us"),
            ("  one of 100 stalled: server RSS KiB", "rss_kib_stalled"),
        ] {
            let k = |who: &str| w[who]["one_stalled"][key].as_f64();
            let _ = writeln!(
                o,
                "{:<44} {:>22} {:>22} {:>22} {:>8}",
                label,
                fmt(k("mcchatd")),
                fmt(k("node")),
                "",
                ratio(k("mcchatd"), k("node")),
            );
        }
        for n in sizes.keys() {
            let k = |who: &str| w[who]["idle_memory"][n]["kib_per_connection"].as_f64();
            let _ = writeln!(
                o,
                "{:<44} {:>22} {:>22} {:>22} {:>8}",
                format!("  KiB per idle connection, {n} open"),
                fmt(k("mcchatd")),
                fmt(k("node")),
                "",
                ratio(k("mcchatd"), k("node")),
            );
        }
        let storm = &w["reconnect_storm"];
        if storm.is_object() {
            let n = |key: &str| storm[key].as_f64();
            for (label, value) in [
                (
                    format!(
                        "  reconnect storm ({} clients): ms until all are back",
                        storm["clients"]
                    ),
                    n("rejoin_ms"),
                ),
                ("  ... messages shown twice".into(), n("duplicates")),
                ("  ... messages never shown".into(), n("missing")),
                ("  ... messages reported lost".into(), n("reported_lost")),
            ] {
                let _ = writeln!(o, "{label:<44} {:>22}", fmt(value));
            }
        }
    }
    let st = &r["sites"];
    if st["latency_1000_per_s"].is_object() {
        let l = &st["latency_1000_per_s"];
        let raw = &st["raw_nats"];
        let _ = writeln!(
            o,
            "{:<44} {:>22} {:>22} {:>22} {:>8}",
            "sites over NATS (64-byte messages)", "bridged", "nats pub-sub alone", "LAN path", ""
        );
        for (label, far, alone, lan) in [
            (
                "  p50 us at 1,000 msg/s",
                "far_p50_us",
                "p50_us",
                "lan_p50_us",
            ),
            (
                "  p99 us at 1,000 msg/s",
                "far_p99_us",
                "p99_us",
                "lan_p99_us",
            ),
        ] {
            let _ = writeln!(
                o,
                "{:<44} {:>22} {:>22} {:>22}",
                label,
                cell(&l[far]),
                cell(&raw[alone]),
                cell(&l[lan]),
            );
        }
        for (label, key) in [
            ("  added over the LAN, p50 us", "added_p50_us"),
            ("  added over the LAN, p99 us", "added_p99_us"),
        ] {
            let _ = writeln!(o, "{:<44} {:>22}", label, cell(&l[key]));
        }
        let _ = writeln!(
            o,
            "{:<44} {:>22} {:>22}",
            "  highest rate at <0.1% loss, msg/s",
            fmt(st["max_rate_per_s"].as_f64()),
            fmt(raw["max_rate_per_s"].as_f64()),
        );
        let c = &st["cpu_s_per_million"];
        let _ = writeln!(
            o,
            "{:<44} {:>22}",
            "  CPU s per million bridged: both mcchatd",
            fmt(c["paris"]
                .as_f64()
                .zip(c["london"].as_f64())
                .map(|(a, b)| a + b)),
        );
        let _ = writeln!(
            o,
            "{:<44} {:>22} {:>22}",
            "  CPU s per million: nats-server",
            fmt(c["nats_server"].as_f64()),
            fmt(raw["nats_server_cpu_s_per_million"].as_f64()),
        );
    }
    let _ = writeln!(
        o,
        "{:<44} {:>22}",
        "history: messages committed per second",
        fmt(r["history_writes_per_s"].as_f64())
    );
    for seq in ["60", "2048"] {
        if let Some(ms) = r["flood_bench_ms"][format!("seq_{seq}")].as_f64() {
            let _ = writeln!(
                o,
                "{:<44} {:>22}",
                format!("flood on one engine, 2nd hb seq={seq}: ms"),
                fmt(Some(ms))
            );
        }
    }
    if let Some(codec) = r["codec_ns"].as_object() {
        for (k, v) in codec {
            let _ = writeln!(
                o,
                "{:<44} {:>22}",
                format!("codec {k}, ns"),
                fmt(v.as_f64())
            );
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The WebSocket part of the table shows the reconnect storm's figures when they are there.
    #[test]
    fn the_table_shows_the_reconnect_storm() {
        let r = serde_json::json!({"websocket": {
            "mcchatd": {"idle_memory": {}},
            "node": {},
            "reconnect_storm": {"clients": 1000, "rejoin_ms": 1771.8, "duplicates": 0,
                                "missing": 0, "reported_lost": 0}
        }});
        let t = table(&r);
        assert!(
            t.contains("reconnect storm (1000 clients): ms until all are back"),
            "{t}"
        );
        assert!(
            t.lines()
                .any(|l| l.contains("until all are back") && l.ends_with("1772")),
            "{t}"
        );
        assert!(
            t.lines()
                .any(|l| l.contains("shown twice") && l.ends_with("0.00")),
            "{t}"
        );
    }
}
