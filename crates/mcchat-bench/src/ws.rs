//! WebSocket load (issue 12): one sender and N receivers in one room of a WebSocket room
//! server, mcchatd's gateway or node-ws-rooms.js, spoken to in the message shape both accept
//! (`{"type":"join","payload":{"roomId":..}}`, `{"type":"chat","payload":{"message":..}}`).
//! Each message carries its send time; receivers read it back from `payload.message`, which
//! both servers echo.
//!
//! Latency is taken twice. From the send to the kernel's arrival stamp on the receiving
//! socket (SO_TIMESTAMPNS on each read, as the UDP fan-out is measured, load.rs): the
//! server's own latency, what one browser on its own device sees. And from the send to when
//! this process has read the frame: that adds the time one process takes to read 100 sockets
//! one after another, on two cores it shares with the server.

use std::io;
use std::os::fd::AsRawFd as _;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

type Ws = WebSocketStream<Stamped>;

/// What one fan-out run measured.
#[derive(Debug)]
pub(crate) struct Fanout {
    pub(crate) sent: u64,
    pub(crate) delivered: u64,
    pub(crate) deliveries_per_s: f64,
    /// From the send to the kernel's arrival stamp at the receiver.
    pub(crate) latency_us: Histogram<u64>,
    /// From the send to when the receiver had read the frame.
    pub(crate) read_latency_us: Histogram<u64>,
}

/// A TCP stream whose reads keep the kernel's arrival stamp of what they return (for TCP,
/// the stamp of the newest segment a read consumed).
pub(crate) struct Stamped {
    tcp: TcpStream,
    /// Wall-clock ns; 0 before the first stamped read.
    arrived_ns: u64,
}

impl Stamped {
    fn new(tcp: TcpStream) -> Result<Self> {
        nix::sys::socket::setsockopt(&tcp, nix::sys::socket::sockopt::ReceiveTimestampns, &true)
            .context("SO_TIMESTAMPNS")?;
        Ok(Self { tcp, arrived_ns: 0 })
    }

    /// When the bytes of the last read arrived (wall-clock ns).
    fn arrived_ns(&self) -> u64 {
        self.arrived_ns
    }
}

/// One `recvmsg` into `buf`: the bytes read and the arrival stamp, if the kernel gave one.
fn recv_stamped(fd: i32, buf: &mut [u8]) -> io::Result<(usize, Option<u64>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut cmsg = nix::cmsg_space!(nix::sys::time::TimeSpec);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg =
        recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty()).map_err(io::Error::from)?;
    let mut stamp = None;
    for c in msg.cmsgs().into_iter().flatten() {
        if let ControlMessageOwned::ScmTimestampns(ts) = c {
            stamp = Some((ts.tv_sec() as u64).saturating_mul(1_000_000_000) + ts.tv_nsec() as u64);
        }
    }
    Ok((msg.bytes, stamp))
}

impl AsyncRead for Stamped {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let fd = this.tcp.as_raw_fd();
        loop {
            ready!(this.tcp.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match this
                .tcp
                .try_io(Interest::READABLE, || recv_stamped(fd, unfilled))
            {
                Ok((n, stamp)) => {
                    if let Some(ns) = stamp {
                        this.arrived_ns = ns;
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Stamped {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

const ROOM: &str = "wsbench";

fn now_ns() -> u64 {
    crate::load::now_ns()
}

/// A WebSocket connection to `url` over a [`Stamped`] stream.
async fn connect(url: &str) -> Result<Ws> {
    let host = url
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .with_context(|| format!("not a ws:// URL: {url}"))?;
    let tcp = TcpStream::connect(host)
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    tcp.set_nodelay(true)?;
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, Stamped::new(tcp)?, None)
        .await
        .with_context(|| format!("no WebSocket handshake with {url}"))?;
    Ok(ws)
}

/// A connection that has joined the benchmark's room.
async fn join(url: &str) -> Result<Ws> {
    let mut ws = connect(url).await?;
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
    fanout_stalled(url, receivers, 0, count, Pace::new(rate), |_| {})
}

/// [`fanout`] that never gets more than [`WINDOW`] messages ahead of its slowest receiver:
/// at or above what the server and the receivers sustain, the rate they sustain. Faster than
/// that is not a rate but a race to which reader falls a queue behind first (mcchatd lets
/// such a reader go as too slow; node-ws-rooms.js buffers without bound).
pub(crate) fn fanout_windowed(
    url: &str,
    receivers: usize,
    count: u64,
    rate: Option<u64>,
) -> Result<Fanout> {
    let pace = Pace {
        windowed: true,
        ..Pace::new(rate)
    };
    fanout_stalled(url, receivers, 0, count, pace, |_| {})
}

/// How the sender sends.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pace {
    /// Messages a second; `None`: as fast as it can.
    pub(crate) rate: Option<u64>,
    /// At most [`WINDOW`] ahead of the slowest receiver.
    pub(crate) windowed: bool,
}

impl Pace {
    pub(crate) fn new(rate: Option<u64>) -> Self {
        Self {
            rate,
            windowed: false,
        }
    }
}

/// [`fanout`] with `stalled` more receivers that join and then never read; `during` is
/// called once the sending is done, before the stalled ones let go (to read the server's
/// memory then).
pub(crate) fn fanout_stalled(
    url: &str,
    receivers: usize,
    stalled: usize,
    count: u64,
    pace: Pace,
    during: impl FnOnce(&Fanout),
) -> Result<Fanout> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let delivered = Arc::new(AtomicU64::new(0));
        let last_ns = Arc::new(AtomicU64::new(0));
        // What each receiver has read (u64::MAX once it has stopped), for a windowed sender.
        let progress: Arc<Vec<AtomicU64>> =
            Arc::new((0..receivers).map(|_| AtomicU64::new(0)).collect());
        let caught_up = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        let mut asleep = Vec::new();
        for _ in 0..stalled {
            asleep.push(join(url).await?);
        }
        for me in 0..receivers {
            let mut ws = join(url).await?;
            let delivered = Arc::clone(&delivered);
            let last_ns = Arc::clone(&last_ns);
            let progress = Arc::clone(&progress);
            let caught_up = Arc::clone(&caught_up);
            tasks.push(tokio::spawn(async move {
                let done = Done(&progress[me], &caught_up);
                let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).ok()?;
                let mut read = h.clone();
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
                        // (No stamp: not counted, and a run with none fails below.)
                        let arrived = ws.get_ref().arrived_ns();
                        if arrived > 0 {
                            let _ = h.record(arrived.saturating_sub(at) / 1000);
                        }
                        let _ = read.record(now.saturating_sub(at) / 1000);
                        got += 1;
                        delivered.fetch_add(1, Ordering::Relaxed);
                        last_ns.fetch_max(now, Ordering::Relaxed);
                        progress[me].store(got, Ordering::Relaxed);
                        if got.is_multiple_of(WINDOW_STEP) {
                            caught_up.notify_one();
                        }
                    }
                }
                drop(done);
                Some((h, read))
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
            if let Some(rate) = pace.rate {
                let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
                tokio::time::sleep_until(due.into()).await;
            }
            if pace.windowed && i.is_multiple_of(WINDOW_STEP) {
                loop {
                    let slowest = progress
                        .iter()
                        .map(|p| p.load(Ordering::Relaxed))
                        .min()
                        .unwrap_or(u64::MAX);
                    if slowest == u64::MAX || i.saturating_sub(slowest) <= WINDOW {
                        break;
                    }
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), caught_up.notified()).await;
                }
            }
            let msg = format!(
                r#"{{"type":"chat","payload":{{"message":"{} {pad}"}}}}"#,
                now_ns()
            );
            tx.send(Message::text(msg)).await?;
        }
        let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let mut read_latency = latency.clone();
        for t in tasks {
            if let Some((h, read)) = t.await? {
                latency.add(&h)?;
                read_latency.add(&read)?;
            }
        }
        drain.abort();
        let delivered = delivered.load(Ordering::Relaxed);
        if delivered == 0 {
            bail!("no deliveries from {url}");
        }
        if latency.len() < read_latency.len() {
            bail!(
                "{} of {} deliveries from {url} had no kernel arrival stamp (SO_TIMESTAMPNS)",
                read_latency.len() - latency.len(),
                read_latency.len()
            );
        }
        let secs = last_ns.load(Ordering::Relaxed).saturating_sub(first).max(1) as f64 / 1e9;
        let out = Fanout {
            sent: count,
            delivered,
            deliveries_per_s: delivered as f64 / secs,
            latency_us: latency,
            read_latency_us: read_latency,
        };
        during(&out);
        drop(asleep);
        Ok(out)
    })
}

/// Messages a windowed sender may be ahead of the slowest receiver: half of mcchatd's queue of
/// 512 frames per connection, the rest room for what is in flight.
const WINDOW: u64 = 256;
/// How often receivers report their progress and the sender looks at it.
const WINDOW_STEP: u64 = 32;

/// Marks a receiver as stopped when its task ends, however it ends, so that the sender does
/// not wait for it.
struct Done<'a>(&'a AtomicU64, &'a tokio::sync::Notify);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.store(u64::MAX, Ordering::Relaxed);
        self.1.notify_one();
    }
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
            v.push(connect(url).await?);
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

/// What a reconnect storm measured.
#[derive(Debug)]
pub(crate) struct Storm {
    pub(crate) clients: usize,
    pub(crate) sent: u64,
    /// From the restarted server being ready until the last client was back in the room.
    pub(crate) rejoin_ms: f64,
    /// Clients that were back in the room.
    pub(crate) rejoined: usize,
    /// Messages shown twice to one client, and messages never shown to one (summed over
    /// clients), and the losses the server reported as gaps.
    pub(crate) duplicates: u64,
    pub(crate) missing: u64,
    pub(crate) reported_lost: u64,
}

/// `clients` clients in `room`, each reconnecting as the page does (back-off from 250 ms,
/// doubling to 2 s, with jitter; `since` the last offset it saw). `send(i)` says message i
/// (1-based, `"<i>"` as its text) on the LAN, `restart()` restarts the server; the storm is
/// `count` messages at `rate` a second with the restart after a third of them.
pub(crate) fn storm(
    url: &str,
    room: &str,
    clients: usize,
    count: u64,
    rate: u64,
    mut send: impl FnMut(u64) -> Result<()>,
    mut restart: impl FnMut() -> Result<()>,
) -> Result<Storm> {
    use std::sync::Mutex;
    use std::sync::atomic::AtomicBool;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    let restarted_at = Arc::new(Mutex::new(None::<Instant>));
    let joined = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for c in 0..clients {
        let (url, room) = (url.to_owned(), room.to_owned());
        let (stop, restarted_at, joined) = (
            Arc::clone(&stop),
            Arc::clone(&restarted_at),
            Arc::clone(&joined),
        );
        handles.push(rt.spawn(async move {
            let mut seen = vec![0u8; count as usize + 1];
            let mut since: Option<(u64, u64)> = None;
            let mut back_at: Option<Instant> = None;
            let mut lost = 0u64;
            let mut backoff = Duration::from_millis(250);
            let mut first = true;
            while !stop.load(Ordering::Relaxed) {
                let Ok((mut ws, _)) =
                    tokio_tungstenite::connect_async_with_config(url.as_str(), None, true).await
                else {
                    let jitter =
                        Duration::from_millis(u64::from(crate::load::now_ns() as u32 % 250));
                    tokio::time::sleep(backoff + jitter).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                };
                let since_json = since.map_or(String::new(), |(e, o)| {
                    format!(r#","since":{{"epoch":{e},"offset":{o}}}"#)
                });
                let join = format!(
                    r#"{{"type":"join","room":"{room}","name":"c{c}","history":0{since_json}}}"#
                );
                if ws.send(Message::text(join)).await.is_err() {
                    continue;
                }
                loop {
                    let m = tokio::select! {
                        m = ws.next() => m,
                        () = tokio::time::sleep(Duration::from_millis(200)) => {
                            if stop.load(Ordering::Relaxed) { break; }
                            continue;
                        }
                    };
                    let Some(Ok(Message::Text(t))) = m else { break };
                    let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                    match v["type"].as_str() {
                        Some("joined") => {
                            backoff = Duration::from_millis(250);
                            if first {
                                first = false;
                                joined.fetch_add(1, Ordering::Relaxed);
                            } else if back_at.is_none()
                                && restarted_at.lock().map(|r| r.is_some()).unwrap_or(false)
                            {
                                back_at = Some(Instant::now());
                            }
                            // Where it stands: its own last offset while the epoch holds
                            // (what it missed comes next, from history); the room's now if
                            // it is new here or the server could not recover it.
                            if let (Some(e), Some(o)) = (v["epoch"].as_u64(), v["offset"].as_u64())
                                && (since.is_none_or(|(old, _)| old != e)
                                    || v["recovered"] == false)
                            {
                                since = Some((e, o));
                            }
                        }
                        Some("chat") => {
                            if let Some(i) =
                                v["text"].as_str().and_then(|t| t.parse::<usize>().ok())
                                && i < seen.len()
                            {
                                seen[i] = seen[i].saturating_add(1);
                            }
                            if let (Some((e, _)), Some(o)) = (since, v["offset"].as_u64()) {
                                since = Some((e, o));
                            }
                        }
                        Some("gap") => lost += v["count"].as_u64().unwrap_or(0),
                        _ => {}
                    }
                }
            }
            (seen, back_at, lost)
        }));
    }
    // Everyone in before the first message.
    let t0 = Instant::now();
    while joined.load(Ordering::Relaxed) < clients as u64 {
        if t0.elapsed() > Duration::from_secs(60) {
            bail!(
                "only {} of {clients} clients joined",
                joined.load(Ordering::Relaxed)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let start = Instant::now();
    let mut ready = None;
    for i in 1..=count {
        let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        send(i)?;
        if i == count / 3 {
            restart()?;
            let now = Instant::now();
            ready = Some(now);
            if let Ok(mut r) = restarted_at.lock() {
                *r = Some(now);
            }
        }
    }
    // Time for the last repairs and recoveries.
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    let mut out = Storm {
        clients,
        sent: count,
        rejoin_ms: 0.0,
        rejoined: 0,
        duplicates: 0,
        missing: 0,
        reported_lost: 0,
    };
    for h in handles {
        let (seen, back_at, lost) = rt.block_on(h)?;
        out.duplicates += seen
            .iter()
            .map(|&n| u64::from(n.saturating_sub(1)))
            .sum::<u64>();
        out.missing += seen[1..].iter().filter(|&&n| n == 0).count() as u64;
        out.reported_lost += lost;
        if let (Some(b), Some(r)) = (back_at, ready) {
            out.rejoined += 1;
            out.rejoin_ms = out
                .rejoin_ms
                .max(b.saturating_duration_since(r).as_secs_f64() * 1e3);
        }
    }
    Ok(out)
}
