//! WebSocket load (issue 12): one sender and N receivers in one room of a WebSocket room
//! server, mcchatd's gateway or node-ws-rooms.js, spoken to in the message shape both accept
//! (`{"type":"join","payload":{"roomId":..}}`, `{"type":"chat","payload":{"message":..}}`).
//! Each message carries its send time; receivers read it back from `payload.message`, which
//! both servers echo.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What one fan-out run measured.
#[derive(Debug)]
pub(crate) struct Fanout {
    pub(crate) sent: u64,
    pub(crate) delivered: u64,
    pub(crate) deliveries_per_s: f64,
    pub(crate) latency_us: Histogram<u64>,
}

const ROOM: &str = "wsbench";

fn now_ns() -> u64 {
    crate::load::now_ns()
}

async fn join(url: &str) -> Result<Ws> {
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    ws.send(Message::text(format!(
        r#"{{"type":"join","payload":{{"roomId":"{ROOM}"}}}}"#
    )))
    .await?;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .context("no joined frame within 10 s")?
            .context("closed before joining")??;
        if let Message::Text(t) = m
            && t.contains(r#""joined""#)
        {
            return Ok(ws);
        }
    }
}

/// The send time in a chat frame's `payload.message` (`"<ns> <padding>"`), found without
/// parsing the JSON: the load generator shares the machine's two cores with the server, so
/// it must cost as little as it can.
fn sent_at(frame: &str) -> Option<u64> {
    // Scrollback from history (mcchatd sends the room's last messages on join) is not a
    // delivery of this run.
    if !frame.contains(r#""type":"chat""#) || frame.contains(r#""history":true"#) {
        return None;
    }
    let at = frame.find(r#""message":""#)? + r#""message":""#.len();
    let digits = frame[at..].split(' ').next()?;
    digits.parse().ok()
}

/// `receivers` receivers and one sender; the sender sends `count` messages at `rate` a second
/// (`None`: as fast as the server takes them). Waits until every receiver has every message,
/// or nothing came for 2 s.
pub(crate) fn fanout(url: &str, receivers: usize, count: u64, rate: Option<u64>) -> Result<Fanout> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let delivered = Arc::new(AtomicU64::new(0));
        let last_ns = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..receivers {
            let mut ws = join(url).await?;
            let delivered = Arc::clone(&delivered);
            let last_ns = Arc::clone(&last_ns);
            tasks.push(tokio::spawn(async move {
                let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).ok()?;
                let mut got = 0u64;
                while got < count {
                    let Ok(Some(Ok(m))) =
                        tokio::time::timeout(Duration::from_secs(2), ws.next()).await
                    else {
                        break;
                    };
                    if let Message::Text(t) = m
                        && let Some(at) = sent_at(t.as_str())
                    {
                        let now = now_ns();
                        let _ = h.record(now.saturating_sub(at) / 1000);
                        got += 1;
                        delivered.fetch_add(1, Ordering::Relaxed);
                        last_ns.fetch_max(now, Ordering::Relaxed);
                    }
                }
                Some(h)
            }));
        }
        let sender = join(url).await?;
        let (mut tx, mut rx) = sender.split();
        // The sender's own copies, read so that it is never the slow one.
        let drain = tokio::spawn(async move { while let Some(Ok(_)) = rx.next().await {} });
        let pad = "x".repeat(40);
        let first = now_ns();
        let start = Instant::now();
        for i in 0..count {
            if let Some(rate) = rate {
                let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
                tokio::time::sleep_until(due.into()).await;
            }
            let msg = format!(
                r#"{{"type":"chat","payload":{{"message":"{} {pad}"}}}}"#,
                now_ns()
            );
            tx.send(Message::text(msg)).await?;
        }
        let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        for t in tasks {
            if let Some(h) = t.await? {
                latency.add(&h)?;
            }
        }
        drain.abort();
        let delivered = delivered.load(Ordering::Relaxed);
        if delivered == 0 {
            bail!("no deliveries from {url}");
        }
        let secs = last_ns.load(Ordering::Relaxed).saturating_sub(first).max(1) as f64 / 1e9;
        Ok(Fanout {
            sent: count,
            delivered,
            deliveries_per_s: delivered as f64 / secs,
            latency_us: latency,
        })
    })
}

/// `n` idle connections (no room): the server's RSS grows by what one costs. Returns once all
/// are open; they close when the returned runtime and handles are dropped.
pub(crate) fn idle(url: &str, n: usize) -> Result<(tokio::runtime::Runtime, Vec<Ws>)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let conns = rt.block_on(async {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let (ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
                .await
                .with_context(|| format!("cannot connect to {url}"))?;
            v.push(ws);
        }
        // A round trip on the last, so the server has set them all up.
        if let Some(ws) = v.last_mut() {
            ws.send(Message::text(r#"{"type":"ping"}"#)).await?;
            let _ = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
        }
        anyhow::Ok(v)
    })?;
    Ok((rt, conns))
}
