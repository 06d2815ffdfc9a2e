//! `mcchat status`: reads mcchatd's status document (TCP on the relay port, or the local Unix
//! socket) and shows it as a table, or as the JSON it is.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde_json::Value;

use crate::cli::StatusArgs;
use crate::daemon::{self, Endpoint};
use crate::output::Stdout;

const TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) async fn run(args: &StatusArgs) -> Result<()> {
    let endpoint = Endpoint::new(args.via.as_deref(), args.socket.clone());
    let text = daemon::request(&endpoint, "status", TIMEOUT).await?;
    let value: Value =
        serde_json::from_str(&text).context("mcchatd sent a status document that is not JSON")?;
    let mut out = Stdout::new();
    if args.json {
        return out.line(&text);
    }
    out.write_bytes(render(&value).as_bytes())
}

fn s(v: &Value) -> String {
    let raw = match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    mcchat_core::sanitize::for_terminal(&raw).into_owned()
}

/// The document as a table. Every value is sanitised: the document carries names clients
/// chose.
fn render(v: &Value) -> String {
    let mut o = String::new();
    // Writing to a String cannot fail; results are ignored for that reason.
    let _ = writeln!(
        o,
        "mcchatd {} up {} s, rooms from {}, listening on {}, {} subscribers",
        s(&v["version"]),
        s(&v["uptime_secs"]),
        s(&v["rooms_file"]),
        v["listen"]
            .as_array()
            .map(|a| a.iter().map(s).collect::<Vec<_>>().join(" "))
            .unwrap_or_default(),
        s(&v["subscribers"]),
    );
    let _ = writeln!(
        o,
        "{:<20} {:<26} {:<6} SUBSCRIBERS",
        "ROOM", "GROUP:PORT", "JOINED"
    );
    for room in v["rooms"].as_array().into_iter().flatten() {
        let subs: Vec<String> = room["subscribers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|sub| format!("{}@{}", s(&sub["name"]), s(&sub["addr"])))
            .collect();
        let joined = if room["joined"].as_bool() == Some(true) {
            "yes"
        } else {
            "no"
        };
        let _ = writeln!(
            o,
            "{:<20} {:<26} {:<6} {}{}",
            s(&room["name"]),
            s(&room["group"]),
            joined,
            subs.len(),
            if subs.is_empty() {
                String::new()
            } else {
                format!(" ({})", subs.join(", "))
            }
        );
    }
    let c = &v["counters"];
    let _ = writeln!(
        o,
        "received {} unicast, {} multicast; relayed {} to groups, {} to subscribers; \
         {} subscribed, {} expired, {} challenges",
        s(&c["received_unicast"]),
        s(&c["received_multicast"]),
        s(&c["relayed_to_group"]),
        s(&c["relayed_to_subscribers"]),
        s(&c["subscribed"]),
        s(&c["expired"]),
        s(&c["challenges"]),
    );
    let dropped: Vec<String> = c["dropped"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, n)| format!("{}={}", mcchat_core::sanitize::for_terminal(k), s(n)))
        .collect();
    let r = &v["repair_cache"];
    let _ = writeln!(
        o,
        "repair cache: {} messages, {} bytes; repaired {} to groups, {} to subscribers",
        s(&r["messages"]),
        s(&r["bytes"]),
        s(&r["repairs_to_group"]),
        s(&r["repairs_to_subscribers"]),
    );
    let h = &v["history"];
    let _ = writeln!(
        o,
        "history: {}",
        if h.is_null() {
            "off".to_owned()
        } else {
            format!("{} ({} not stored)", s(&h["path"]), s(&h["dropped"]))
        }
    );
    let _ = writeln!(
        o,
        "dropped: {}",
        if dropped.is_empty() {
            "none".to_owned()
        } else {
            dropped.join(" ")
        }
    );
    o
}
