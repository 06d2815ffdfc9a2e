//! The web port: the chat page, its WebSocket and `/healthz`, served with axum. It only moves
//! bytes: each connection's task parses what its client sends (`protocol`), hands it to the
//! driver as a [`WebEvent`], and writes what the driver queues for it. What a web client is
//! in a room (its engine, its room's view) is the hub's (`hub/web.rs`, `hub/view.rs`).
//!
//! Every cost is bounded: connections (`max_connections`), frames (16 KiB), messages per
//! connection per second, and the queue of frames for each: a client that does not read is
//! closed ("too slow") without anyone else waiting for it.

pub(crate) mod config;
pub(crate) mod protocol;
pub(crate) mod runtime;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::stream::SplitStream;
use futures_util::{SinkExt, StreamExt};
use mcchat_core::control::HistoryQuery;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::history::Reader;
use crate::hub::web::{ConnId, Joined, Refusal, WebInput};
use crate::limiter::Single;
use protocol::{BadRequest, MAX_FRAME, Request, WebFrame};

/// Frames queued for one connection before it counts as too slow.
pub(crate) const SEND_QUEUE: usize = 512;
/// A connection's input is read only while fewer frames than this wait for it, its inputs
/// the driver has not taken yet counted too (a quarter of [`SEND_QUEUE`]: the rest is room
/// for what one turn of the driver puts on the queue).
const READ_WHILE_QUEUED: usize = SEND_QUEUE / 4;
/// Frames written with one flush at most.
const WRITE_BATCH: usize = 64;
/// Bad frames from one connection before it is closed.
const MAX_ABUSE: u32 = 20;
/// Close codes (RFC 6455 7.4.1).
const CLOSE_AWAY: u16 = 1001;
const CLOSE_POLICY: u16 = 1008;
const CLOSE_TOO_BIG: u16 = 1009;
const CLOSE_TRY_AGAIN: u16 = 1013;

/// The chat page, embedded: no build step, nothing fetched from elsewhere.
const PAGE: &str = include_str!("page.html");

/// What the driver sends a connection's task.
#[derive(Debug)]
pub(crate) enum ToConn {
    Frame(Arc<WebFrame>),
    Joined(Joined),
    Refused(Refusal, bool),
}

/// What a connection's task tells the driver.
#[derive(Debug)]
pub(crate) struct WebEvent {
    pub(crate) conn: ConnId,
    pub(crate) input: WebInput,
    /// With [`WebInput::Open`]: where the driver queues the connection's frames.
    pub(crate) tx: Option<mpsc::Sender<ToConn>>,
    /// With what a client sent: counted as on its way until the driver has taken it.
    pub(crate) pending: Option<Pending>,
}

/// One of a connection's inputs between its task and the driver: [`WebEvent`]s wait in one
/// queue for all connections, and what the driver has not taken yet has not put its frames
/// on the connection's queue either, so it counts against the connection's reading (see
/// [`READ_WHILE_QUEUED`]) until the driver drops the event.
#[derive(Debug)]
pub(crate) struct Pending(Arc<AtomicUsize>);

impl Pending {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(count))
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Text mode (`/ws?format=text`): chat messages as `sender: text` strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Text,
}

/// What every handler shares.
pub(crate) struct WebState {
    pub(crate) events: mpsc::Sender<WebEvent>,
    pub(crate) history: Option<Reader>,
    pub(crate) settings: config::WebSettings,
    /// The configured rooms, for the page's list.
    pub(crate) rooms: Vec<String>,
    pub(crate) is_allowed: Box<dyn Fn(SocketAddr) -> bool + Send + Sync>,
    pub(crate) token: CancellationToken,
    next: AtomicU64,
    open: Arc<AtomicUsize>,
}

impl WebState {
    pub(crate) fn new(
        events: mpsc::Sender<WebEvent>,
        history: Option<Reader>,
        settings: config::WebSettings,
        rooms: Vec<String>,
        is_allowed: Box<dyn Fn(SocketAddr) -> bool + Send + Sync>,
        token: CancellationToken,
    ) -> Self {
        Self {
            events,
            history,
            settings,
            rooms,
            is_allowed,
            token,
            next: AtomicU64::new(1),
            open: Arc::new(AtomicUsize::new(0)),
        }
    }
}

/// The routes: `/`, `/ws`, `/healthz`, `/rooms.json`. Tests drive this without a server.
pub(crate) fn app(state: Arc<WebState>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/ws", get(ws))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/rooms.json", get(rooms))
        .with_state(state)
}

async fn page(
    State(state): State<Arc<WebState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    if !(state.is_allowed)(peer) {
        return (StatusCode::FORBIDDEN, "not allowed\n").into_response();
    }
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

async fn rooms(State(state): State<Arc<WebState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(&state.rooms).unwrap_or_else(|_| "[]".into()),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct WsParams {
    #[serde(default)]
    format: Option<String>,
}

/// Whether a page at `origin` may open the WebSocket of `host`: the same host, or listed.
fn origin_ok(origin: Option<&str>, host: Option<&str>, allowed: &[String]) -> bool {
    let Some(origin) = origin else {
        // Not a browser (browsers always send Origin on a WebSocket): the allow list of
        // addresses still applies.
        return true;
    };
    if allowed.iter().any(|a| a == origin) {
        return true;
    }
    let served = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    served.is_some() && served == host
}

async fn ws(
    State(state): State<Arc<WebState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(params): Query<WsParams>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if !(state.is_allowed)(peer) {
        return (StatusCode::FORBIDDEN, "not allowed\n").into_response();
    }
    let text = |h| {
        headers
            .get(h)
            .and_then(|v: &header::HeaderValue| v.to_str().ok())
    };
    if !origin_ok(
        text(header::ORIGIN),
        text(header::HOST),
        &state.settings.origins,
    ) {
        tracing::info!(%peer, origin = ?text(header::ORIGIN), "web connection refused: origin");
        return (
            StatusCode::FORBIDDEN,
            "this page's origin may not connect; add it to [web] origins\n",
        )
            .into_response();
    }
    let format = match params.format.as_deref() {
        None | Some("json") => Format::Json,
        Some("text") => Format::Text,
        Some(_) => {
            return (StatusCode::BAD_REQUEST, "format is json or text\n").into_response();
        }
    };
    // Counted before the upgrade, so a storm cannot pass the cap between check and count.
    let open = Arc::clone(&state.open);
    if open.fetch_add(1, Ordering::AcqRel) >= state.settings.max_connections {
        open.fetch_sub(1, Ordering::AcqRel);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many web connections; try again later\n",
        )
            .into_response();
    }
    let guard = OpenGuard(open);
    let conn = state.next.fetch_add(1, Ordering::Relaxed);
    upgrade
        .max_frame_size(MAX_FRAME)
        .max_message_size(MAX_FRAME)
        // Small buffers for many idle connections; frames queued together leave in one
        // write of up to 8 KiB (with no write buffer every frame was a syscall of its own:
        // 0.64 M deliveries/s instead of 2.5 M).
        .read_buffer_size(4 * 1024)
        .write_buffer_size(8 * 1024)
        .max_write_buffer_size(256 * 1024)
        .on_upgrade(move |socket| async move {
            let _guard = guard;
            Connection::new(conn, peer, format, state).run(socket).await;
        })
}

/// A connection's reading half: hands each frame the client sends to its task, and ends
/// after the stream's end, an error or a close (or when the task is gone).
async fn read_frames(
    mut stream: SplitStream<WebSocket>,
    to: mpsc::Sender<Result<Message, axum::Error>>,
) {
    while let Some(frame) = stream.next().await {
        let last = !matches!(&frame, Ok(m) if !matches!(m, Message::Close(_)));
        if to.send(frame).await.is_err() || last {
            break;
        }
    }
}

struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One WebSocket connection's task.
struct Connection {
    conn: ConnId,
    peer: SocketAddr,
    format: Format,
    state: Arc<WebState>,
    bucket: Single,
    abuse: u32,
    /// The room asked for (before the hub confirms it), so chat before a join is refused.
    room: Option<String>,
    /// What the last join asked of history: its `since` and scrollback.
    pending_join: Option<(Option<protocol::Since>, Option<u32>)>,
    /// The room joined, and the oldest offset shown (where paging back goes on from).
    joined: Option<(Joined, u64)>,
    /// Its inputs the driver has not taken yet ([`Pending`]).
    in_flight: Arc<AtomicUsize>,
}

/// How a connection ends: a close frame to send, if any.
type Ending = Option<(u16, String)>;

impl Connection {
    fn new(conn: ConnId, peer: SocketAddr, format: Format, state: Arc<WebState>) -> Self {
        let bucket = Single::new(state.settings.rate, state.settings.burst, Instant::now());
        Self {
            conn,
            peer,
            format,
            state,
            bucket,
            abuse: 0,
            room: None,
            pending_join: None,
            joined: None,
            in_flight: Arc::new(AtomicUsize::new(0)),
        }
    }

    async fn run(mut self, socket: WebSocket) {
        let (tx, mut rx) = mpsc::channel(SEND_QUEUE);
        let (mut sink, stream) = socket.split();
        // The reading half on a task of its own, handing over one frame at a time (so the
        // client is still read only as fast as this task takes its frames). Why: this task
        // wakes once per frame queued for it, and every wake-up polled the socket's reading
        // side too (tungstenite, hyper's upgrade, the reactor's readiness lock): 8% of the
        // daemon thread's time in a profile at 1,000 msg/s to 100 clients, under 2% since.
        // Polling an empty queue costs a few atomic operations.
        let (input_tx, mut input) = mpsc::channel(1);
        let _reader = AbortOnDropHandle::new(tokio::spawn(read_frames(stream, input_tx)));
        let open = WebEvent {
            conn: self.conn,
            input: WebInput::Open {
                addr: self.peer.ip(),
            },
            tx: Some(tx),
            pending: None,
        };
        if self.state.events.send(open).await.is_err() {
            return;
        }
        let token = self.state.token.clone();
        // Registered with the token once, not once per wake-up.
        let stopping = token.cancelled();
        tokio::pin!(stopping);
        let ending: Ending = loop {
            // Frames out first: a client is only ever too slow because it does not read,
            // never because it writes faster than its own echoes are sent.
            //
            // And its next frame is read only while its own queue is short. Every chat line
            // it sends comes back to it in its room's order (PROTOCOL 7), written by the same
            // web threads as everyone's copies, so a client that floods (within a generous
            // `rate`) is paced by how fast the room is written out instead of filling the
            // other members' queues until they are let go as too slow.
            let may_read = rx.len() + self.in_flight.load(Ordering::Relaxed) < READ_WHILE_QUEUED;
            tokio::select! {
                biased;
                () = &mut stopping => break Some((CLOSE_AWAY, "mcchatd is stopping".into())),
                out = rx.recv() => match out {
                    // The driver let go of this connection: it did not keep up.
                    None => break Some((CLOSE_TRY_AGAIN, format!("too slow: more than {SEND_QUEUE} frames behind"))),
                    Some(out) => if let Err(end) = self.deliver_batch(out, &mut rx, &mut sink).await {
                        break end;
                    },
                },
                msg = input.recv(), if may_read => match msg {
                    None | Some(Ok(Message::Close(_))) => break None,
                    Some(Err(e)) => {
                        let text = e.to_string();
                        let code = if text.contains("too long") || text.contains("too big") {
                            CLOSE_TOO_BIG
                        } else {
                            CLOSE_POLICY
                        };
                        break Some((code, format!("bad frame: {text}")));
                    }
                    Some(Ok(Message::Text(t))) => {
                        if let Some(end) = self.on_text(t.as_str(), &mut sink).await {
                            break Some(end);
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        if let Some(end) = self
                            .bad(&mut sink, "binary", "binary frames are not accepted: send JSON text")
                            .await
                        {
                            break Some(end);
                        }
                    }
                    Some(Ok(_)) => {} // ping and pong: answered by the library
                },
            }
        };
        if let Some((code, reason)) = ending {
            tracing::info!(conn = self.conn, peer = %self.peer, code, %reason, "web connection closed");
            let close = Message::Close(Some(CloseFrame {
                code,
                reason: Utf8Bytes::from(reason),
            }));
            let _ = tokio::time::timeout(Duration::from_millis(200), sink.send(close)).await;
        }
        let _ = self
            .state
            .events
            .send(WebEvent {
                conn: self.conn,
                input: WebInput::Closed,
                tx: None,
                pending: None,
            })
            .await;
    }

    async fn send(&self, sink: &mut Sink, text: String) -> Result<(), Ending> {
        sink.send(Message::Text(Utf8Bytes::from(text)))
            .await
            .map_err(|_| None)
    }

    async fn bad(&mut self, sink: &mut Sink, code: &str, message: &str) -> Option<(u16, String)> {
        self.abuse += 1;
        if self.abuse > MAX_ABUSE {
            return Some((CLOSE_POLICY, format!("{MAX_ABUSE} bad frames: {message}")));
        }
        self.send(sink, self.error(code, message))
            .await
            .err()
            .map(|_| (CLOSE_AWAY, String::new()))
    }

    /// An error frame: JSON, or in text mode a line.
    fn error(&self, code: &str, message: &str) -> String {
        match self.format {
            Format::Json => protocol::error_json(code, message),
            Format::Text => format!("error: {message}"),
        }
    }

    async fn on_text(&mut self, text: &str, sink: &mut Sink) -> Option<(u16, String)> {
        if !self.bucket.take(Instant::now()) {
            return self
                .bad(
                    sink,
                    "rate_limited",
                    "too many messages: this one was dropped; slow down",
                )
                .await;
        }
        let request = match protocol::parse(text) {
            Ok(r) => r,
            Err(e) => {
                let code = e.code();
                let message = match &e {
                    BadRequest::Json(_) => format!("{e} (frames are JSON objects with a \"type\")"),
                    _ => e.to_string(),
                };
                return self.bad(sink, code, &message).await;
            }
        };
        let input = match request {
            Request::Join {
                room,
                name,
                since,
                scrollback,
            } => {
                self.room = Some(room.clone());
                self.pending_join = Some((since, scrollback));
                WebInput::Join {
                    room,
                    name: name.unwrap_or_else(|| format!("web{}", self.conn)),
                }
            }
            Request::Chat { text, action } => {
                if self.room.is_none() {
                    return self
                        .bad(
                            sink,
                            "not_joined",
                            "join a room first: {\"type\":\"join\",\"room\":\"room1\"}",
                        )
                        .await;
                }
                WebInput::Say { text, action }
            }
            Request::Leave => {
                self.room = None;
                self.joined = None;
                WebInput::Leave
            }
            Request::History { before, limit } => {
                return self.page_back(before, limit, sink).await;
            }
            Request::Ping => {
                return self
                    .send(sink, r#"{"type":"pong"}"#.to_owned())
                    .await
                    .err()
                    .map(|_| (CLOSE_AWAY, String::new()));
            }
        };
        let event = WebEvent {
            conn: self.conn,
            input,
            tx: None,
            pending: Some(Pending::new(&self.in_flight)),
        };
        if self.state.events.send(event).await.is_err() {
            return Some((CLOSE_AWAY, "mcchatd is stopping".into()));
        }
        None
    }

    /// Writes what the driver queued; `Err` ends the connection.
    async fn deliver(&mut self, out: ToConn, sink: &mut Sink) -> Result<(), Ending> {
        match out {
            ToConn::Frame(f) => self.write_frame(&f, sink).await,
            ToConn::Joined(j) => self.on_joined(j, sink).await,
            ToConn::Refused(r, close) => {
                if matches!(r.code, "bad_room" | "bad_name") {
                    self.room = None;
                    self.pending_join = None;
                }
                self.send(sink, self.error(r.code, &r.message)).await?;
                if close {
                    return Err(Some((CLOSE_POLICY, r.message)));
                }
                Ok(())
            }
        }
    }

    async fn write_frame(&self, f: &WebFrame, sink: &mut Sink) -> Result<(), Ending> {
        self.feed_frame(f, sink).await?;
        sink.flush().await.map_err(|_| None)
    }

    /// Queues a frame in the sink without flushing.
    async fn feed_frame(&self, f: &WebFrame, sink: &mut Sink) -> Result<(), Ending> {
        let text = match self.format {
            Format::Json => f.json.clone(),
            Format::Text => match &f.text {
                Some(t) => t.clone(),
                None => return Ok(()),
            },
        };
        sink.feed(Message::Text(text)).await.map_err(|_| None)
    }

    /// `first` and the frames queued behind it (up to [`WRITE_BATCH`]), written with one
    /// flush: at saturation one write carries many frames.
    async fn deliver_batch(
        &mut self,
        first: ToConn,
        rx: &mut mpsc::Receiver<ToConn>,
        sink: &mut Sink,
    ) -> Result<(), Ending> {
        let ToConn::Frame(f) = first else {
            return self.deliver(first, sink).await;
        };
        self.feed_frame(&f, sink).await?;
        for _ in 1..WRITE_BATCH {
            match rx.try_recv() {
                Ok(ToConn::Frame(f)) => self.feed_frame(&f, sink).await?,
                Ok(other) => {
                    sink.flush().await.map_err(|_| None)?;
                    return self.deliver(other, sink).await;
                }
                Err(_) => break,
            }
        }
        sink.flush().await.map_err(|_| None)
    }

    /// In a room: `joined`, then what history has for this client (what it missed, when its
    /// `since` is recoverable, or a fresh scrollback), then live frames (queued meanwhile).
    async fn on_joined(&mut self, j: Joined, sink: &mut Sink) -> Result<(), Ending> {
        let (since, scrollback) = self.pending_join.take().unwrap_or((None, None));
        let same_epoch = since.filter(|s| s.epoch == j.epoch && s.offset <= j.offset);
        let mut recovered = false;
        let mut records = Vec::new();
        if let (true, Some(reader)) = (j.history, &self.state.history) {
            if let Some(s) = same_epoch {
                let q = HistoryQuery {
                    after: Some(s.offset),
                    before: Some(j.offset.saturating_add(1)),
                    limit: Some(protocol::MAX_RECOVER),
                    ..HistoryQuery::new(j.room.as_str())
                };
                if let Ok(r) = reader.query(q).await
                    && r.len() < protocol::MAX_RECOVER as usize
                {
                    recovered = true;
                    records = r;
                }
            }
            let scrollback = scrollback
                .unwrap_or(protocol::SCROLLBACK)
                .min(protocol::MAX_SCROLLBACK);
            if !recovered && scrollback > 0 {
                let q = HistoryQuery {
                    before: Some(j.offset.saturating_add(1)),
                    limit: Some(scrollback),
                    ..HistoryQuery::new(j.room.as_str())
                };
                match reader.query(q).await {
                    Ok(r) => records = r,
                    Err(error) => {
                        tracing::warn!(%error, room = %j.room, "web client's scrollback not read");
                    }
                }
            }
        } else {
            // Nothing stored: only a client that missed nothing is whole.
            recovered = same_epoch.is_some_and(|s| s.offset == j.offset);
        }
        if self.format == Format::Json {
            self.send(sink, protocol::joined_json(&j, recovered))
                .await?;
        }
        let oldest = records
            .first()
            .and_then(|r| r.offset)
            .unwrap_or(j.offset.saturating_add(1));
        for r in &records {
            self.write_frame(&protocol::record_frame(r), sink).await?;
        }
        self.joined = Some((j, oldest));
        Ok(())
    }

    /// `history`: older messages than the oldest shown.
    async fn page_back(
        &mut self,
        before: Option<u64>,
        limit: Option<u32>,
        sink: &mut Sink,
    ) -> Option<(u16, String)> {
        let (Some((j, oldest)), Some(reader)) = (&self.joined, &self.state.history) else {
            return self
                .bad(
                    sink,
                    "no_history",
                    "no history here: join a room that keeps history first",
                )
                .await;
        };
        let limit = limit.unwrap_or(50).clamp(1, 200);
        let q = HistoryQuery {
            before: Some(before.unwrap_or(*oldest)),
            limit: Some(limit),
            ..HistoryQuery::new(j.room.as_str())
        };
        let room = j.room.to_string();
        let records = match reader.query(q).await {
            Ok(r) => r,
            Err(e) => {
                return self
                    .send(sink, protocol::error_json("history_failed", &e.to_string()))
                    .await
                    .err()
                    .map(|_| (CLOSE_AWAY, String::new()));
            }
        };
        if let (Some((_, oldest)), Some(first)) =
            (&mut self.joined, records.first().and_then(|r| r.offset))
        {
            *oldest = (*oldest).min(first);
        }
        let more = records.len() == limit as usize;
        self.send(sink, protocol::history_json(&room, &records, more))
            .await
            .err()
            .map(|_| (CLOSE_AWAY, String::new()))
    }
}

type Sink = futures_util::stream::SplitSink<WebSocket, Message>;

/// Serves the routes on `listener` until `stop`, on the runtime this runs on (the listener is
/// registered with that runtime's reactor here).
pub(crate) async fn serve(
    listener: std::net::TcpListener,
    state: Arc<WebState>,
    stop: CancellationToken,
) {
    use axum::serve::ListenerExt as _;
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(error) => {
            tracing::error!(%error, "web listener failed");
            return;
        }
    };
    let app = app(state).into_make_service_with_connect_info::<SocketAddr>();
    // Small frames go out at once: Nagle's algorithm with delayed ACKs would hold a chat
    // line for up to 40 ms.
    let listener = listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY on a web connection");
        }
    });
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::error!(%error, "web listener failed");
    }
}

#[cfg(test)]
mod tests {
    use super::origin_ok;

    #[test]
    fn origin_is_the_served_host_or_listed() {
        let allowed = vec!["http://chat.lan".to_owned()];
        assert!(origin_ok(None, Some("x"), &[]));
        assert!(origin_ok(
            Some("http://127.0.0.1:8080"),
            Some("127.0.0.1:8080"),
            &[]
        ));
        assert!(origin_ok(Some("https://h:1"), Some("h:1"), &[]));
        assert!(!origin_ok(
            Some("http://evil.example"),
            Some("127.0.0.1:8080"),
            &[]
        ));
        assert!(!origin_ok(Some("null"), Some("127.0.0.1:8080"), &[]));
        assert!(!origin_ok(Some("http://127.0.0.1:8080"), None, &[]));
        assert!(origin_ok(
            Some("http://chat.lan"),
            Some("10.0.0.1:80"),
            &allowed
        ));
    }
}
