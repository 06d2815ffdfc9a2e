//! The status document and room history, and the listeners that serve them: TCP on the
//! relay port (the TCP handshake proves the address, so answering cannot reflect or amplify)
//! and a local Unix socket.
//!
//! A client connects and may send one request line: `status`, or a JSON history query
//! `{"history":{"room":"room1","limit":20}}`. It reads one JSON document back and the daemon
//! closes the connection. A client that sends nothing within [`REQUEST_WAIT`] gets the
//! status, so `nc HOST 5554 </dev/null` still works.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mcchat_core::control::{self, ErrorAnswer, HistoryQuery, Request};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::history::Reader;
use crate::hub::admission::{net_key, source_key};

/// What the listeners answer with: status from the relay loop, history from the database.
#[derive(Debug, Clone)]
pub(crate) struct Services {
    pub(crate) status: mpsc::Sender<StatusRequest>,
    pub(crate) history: Option<Reader>,
}

/// How long the daemon waits for a request line to begin before it sends the status.
pub(crate) const REQUEST_WAIT: Duration = Duration::from_millis(100);
/// How long a request line that has begun may take to end.
const REQUEST_TIME: Duration = Duration::from_secs(2);
/// The longest request line.
const MAX_REQUEST: u64 = control::MAX_REQUEST_LINE as u64;

/// A request for the current status, answered by the relay loop.
#[derive(Debug)]
pub(crate) struct StatusRequest {
    /// Asked on the local socket: the answer may list subscribers' addresses.
    pub(crate) local: bool,
    pub(crate) reply: oneshot::Sender<String>,
}

/// How long a client may read nothing of the answer before it is closed: a slow reader (a
/// VPN, Wi-Fi) gets a long history whole, however long that takes, and one that stops
/// reading gives its slot back.
const WRITE_PROGRESS: Duration = Duration::from_secs(10);
/// The answer is written in pieces of this size, each within [`WRITE_PROGRESS`].
const WRITE_PIECE: usize = 64 * 1024;

/// TCP status connections served at once; more are closed at once, so status can never crowd
/// out relaying (each answer is built by the relay loop).
pub(crate) const MAX_TCP_CLIENTS: usize = 8;
/// TCP status connections from one address at once (its second only while at most half the
/// slots are taken, so that taking them all needs as many hosts as there are slots) ...
pub(crate) const PER_ADDRESS: usize = 2;
/// ... and from one IPv6 /64 (one host may have many of its addresses): so taking every
/// slot needs at least four hosts, each proven by its TCP handshake.
pub(crate) const PER_NET: usize = 4;
/// Connections on the local socket at once: slots of their own, which no one on the network
/// can take (`mcchat join`'s catch-up, `mcchat status` on the host).
pub(crate) const MAX_LOCAL_CLIENTS: usize = 4;
/// History answers written at once for TCP clients (each holds at most two pages of
/// `history::PAGE` messages in memory, and a blocking thread while it reads), and one more
/// for the local socket, which the network cannot take; a query waits
/// up to [`HISTORY_WAIT`] for its turn.
pub(crate) const MAX_HISTORY_ANSWERS: usize = 2;
const HISTORY_WAIT: Duration = Duration::from_secs(10);

/// The connection slots of the TCP and Unix listeners.
#[derive(Debug, Clone)]
pub(crate) struct Slots {
    tcp: Arc<Semaphore>,
    local: Arc<Semaphore>,
    /// History answers for TCP clients, and one of its own for the local socket.
    history: Arc<Semaphore>,
    local_history: Arc<Semaphore>,
    /// Connections held per address and per IPv6 /64.
    sources: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// A connection's slot, given back when it is dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    _permit: OwnedSemaphorePermit,
    /// On the local socket (its answers may show subscribers' addresses).
    local: bool,
    /// The per-source counts it holds (none on the local socket).
    keys: Vec<IpAddr>,
    sources: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        for key in &self.keys {
            if let Some(n) = sources.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    sources.remove(key);
                }
            }
        }
    }
}

impl Slots {
    pub(crate) fn new() -> Self {
        Self {
            tcp: Arc::new(Semaphore::new(MAX_TCP_CLIENTS)),
            local: Arc::new(Semaphore::new(MAX_LOCAL_CLIENTS)),
            history: Arc::new(Semaphore::new(MAX_HISTORY_ANSWERS)),
            local_history: Arc::new(Semaphore::new(1)),
            sources: Arc::default(),
        }
    }

    /// A slot for a TCP client from `ip`, if the total, its address and its /64 have room.
    pub(crate) fn tcp(&self, ip: IpAddr) -> Option<Slot> {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        let addr = source_key(ip);
        let busy = MAX_TCP_CLIENTS - self.tcp.available_permits() >= MAX_TCP_CLIENTS / 2;
        let per_address = if busy { 1 } else { PER_ADDRESS };
        let mut keys = vec![(addr, per_address)];
        keys.extend(net_key(ip).map(|net| (net, PER_NET)));
        if keys
            .iter()
            .any(|(k, cap)| sources.get(k).copied().unwrap_or(0) >= *cap)
        {
            return None;
        }
        let permit = Arc::clone(&self.tcp).try_acquire_owned().ok()?;
        for (k, _) in &keys {
            *sources.entry(*k).or_insert(0) += 1;
        }
        Some(Slot {
            _permit: permit,
            local: false,
            keys: keys.into_iter().map(|(k, _)| k).collect(),
            sources: Arc::clone(&self.sources),
        })
    }

    /// A slot on the local socket, if one is free.
    pub(crate) fn local(&self) -> Option<Slot> {
        let permit = Arc::clone(&self.local).try_acquire_owned().ok()?;
        Some(Slot {
            _permit: permit,
            local: true,
            keys: Vec::new(),
            sources: Arc::clone(&self.sources),
        })
    }
}

async fn answer<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: S,
    local: bool,
    history: &Arc<Semaphore>,
    services: &Services,
) {
    let (r, mut w) = tokio::io::split(stream);
    let mut line = Vec::new();
    let mut reader = tokio::io::BufReader::new(r.take(MAX_REQUEST));
    // Nothing within the wait, EOF or an empty line all mean "status". A request that has
    // begun gets time to arrive whole (a lost segment is retransmitted in 200 ms or more).
    let started = tokio::time::timeout(REQUEST_WAIT, reader.fill_buf())
        .await
        .is_ok_and(|b| b.is_ok_and(|b| !b.is_empty()));
    if started {
        let _ = tokio::time::timeout(REQUEST_TIME, reader.read_until(b'\n', &mut line)).await;
    }
    let line = String::from_utf8_lossy(&line);
    let doc = match Request::parse(&line) {
        Ok(Request::Status) => {
            let (reply, rx) = oneshot::channel();
            if services
                .status
                .send(StatusRequest { local, reply })
                .await
                .is_err()
            {
                return;
            }
            let Ok(doc) = rx.await else { return };
            doc
        }
        Ok(Request::History(query)) => {
            let turn = tokio::time::timeout(HISTORY_WAIT, Arc::clone(history).acquire_owned());
            match turn.await {
                Ok(Ok(_turn)) => match history_pages(query, services.history.as_ref()).await {
                    Ok((room, pages)) => {
                        if stream_history(&mut w, &room, pages).await {
                            let _ = tokio::time::timeout(WRITE_PROGRESS, w.shutdown()).await;
                        }
                        return;
                    }
                    Err(doc) => doc,
                },
                _ => error_doc(&format!(
                    "history is busy ({MAX_HISTORY_ANSWERS} queries at once); try again"
                )),
            }
        }
        Err(e) => error_doc(&e.to_string()),
    };
    drop(line);
    let mut doc = doc.into_bytes();
    doc.push(b'\n');
    if write_timed(&mut w, &doc).await {
        let _ = tokio::time::timeout(WRITE_PROGRESS, w.shutdown()).await;
    }
}

/// Writes `bytes` in pieces of [`WRITE_PIECE`], each within [`WRITE_PROGRESS`]; false if the
/// client went away or stopped reading.
async fn write_timed<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> bool {
    for piece in bytes.chunks(WRITE_PIECE) {
        match tokio::time::timeout(WRITE_PROGRESS, w.write_all(piece)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::debug!(%error, "status client went away");
                return false;
            }
            Err(_) => {
                tracing::debug!("status client stopped reading");
                return false;
            }
        }
    }
    true
}

/// Writes a history answer as its pages come: the same one-line document as ever
/// (`{"room":..,"messages":[..]}`), never more than a page of it in memory, and timed out
/// only for lack of progress. A database error half-way ends the connection before the
/// document does, which a client reports as an answer cut short.
async fn stream_history<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    room: &str,
    mut pages: crate::history::Pages,
) -> bool {
    let mut buf = format!("{{\"room\":{},\"messages\":[", to_json(&room)).into_bytes();
    let mut first = true;
    while let Some(page) = pages.recv().await {
        let page = match page {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "history query failed part-way");
                return false;
            }
        };
        for record in &page {
            if !first {
                buf.push(b',');
            }
            first = false;
            // Plain strings and integers: serialising cannot fail.
            let _ = serde_json::to_writer(&mut buf, record);
        }
        if !write_timed(w, &buf).await {
            return false;
        }
        buf.clear();
    }
    buf.extend_from_slice(b"]}\n");
    write_timed(w, &buf).await
}

fn error_doc(message: &str) -> String {
    to_json(&ErrorAnswer::new(message))
}

/// The document as one line. The control types are strings, integers and string-keyed maps,
/// which always serialise.
pub(crate) fn to_json(doc: &impl serde::Serialize) -> String {
    serde_json::to_string(doc).unwrap_or_else(|_| "{}".to_owned())
}

/// Starts answering a history query: its room and pages, or the `{"error": ...}` document
/// saying what was wrong.
async fn history_pages(
    query: HistoryQuery,
    history: Option<&Reader>,
) -> Result<(String, crate::history::Pages), String> {
    let Some(history) = history else {
        return Err(error_doc(
            "history is off on this daemon (state_dir is \"\" or not writable)",
        ));
    };
    if let Err(e) = query.check() {
        return Err(error_doc(&e.to_string()));
    }
    let room = query.room.clone();
    match history.pages(query).await {
        Ok(pages) => Ok((room, pages)),
        Err(e) => {
            tracing::warn!(error = %e, "history query failed");
            Err(error_doc(&format!("history query failed: {e}")))
        }
    }
}

/// Answers one status client on its own task, if a slot is free; otherwise closes it.
fn spawn_answer<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    slot: Option<Slot>,
    slots: &Slots,
    services: &Services,
    token: &CancellationToken,
    tracker: &TaskTracker,
) {
    let Some(permit) = slot else {
        tracing::debug!("status: too many clients at once");
        return;
    };
    let local = permit.local;
    let history = Arc::clone(if local {
        &slots.local_history
    } else {
        &slots.history
    });
    let services = services.clone();
    let token = token.clone();
    tracker.spawn(async move {
        // Shutdown ends a slow client's answer at once rather than after its timeouts.
        tokio::select! {
            () = token.cancelled() => {}
            () = answer(stream, local, &history, &services) => {}
        }
        drop(permit);
    });
}

/// Serves status on TCP until `token` is cancelled; `allowed` decides who may ask.
pub(crate) async fn serve_tcp(
    listener: TcpListener,
    services: Services,
    allowed: impl Fn(SocketAddr) -> bool + Send + 'static,
    slots: Slots,
    token: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            () = token.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) if allowed(peer) => {
                let slot = slots.tcp(peer.ip());
                spawn_answer(stream, slot, &slots, &services, &token, &tracker)
            }
            Ok((_, peer)) => tracing::debug!(%peer, "status request from a network not allowed"),
            Err(error) => {
                tracing::warn!(%error, "status listener: accept failed");
                // Typically EMFILE: give the system a moment rather than spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Serves status on a Unix socket until `token` is cancelled.
pub(crate) async fn serve_unix(
    listener: UnixListener,
    services: Services,
    slots: Slots,
    token: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            () = token.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                let slot = slots.local();
                spawn_answer(stream, slot, &slots, &services, &token, &tracker)
            }
            Err(error) => {
                tracing::warn!(%error, "status socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Binds the Unix status socket, replacing a stale one. It is world-writable (connecting
/// needs write permission): status is read-only and holds nothing secret, so any local user
/// may run `mcchat status`.
///
/// A socket file another process still serves on (a second mcchatd started by mistake) is
/// left alone: the call fails with `AddrInUse`, and the running daemon keeps its status.
pub(crate) fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another process (a running mcchatd?) serves status on this socket",
        ));
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

/// Removes the Unix status socket on the way out.
pub(crate) fn unlink(path: Option<PathBuf>) {
    if let Some(p) = path {
        let _ = std::fs::remove_file(p);
    }
}

#[cfg(test)]
mod unix_socket_tests {
    use super::*;

    #[tokio::test]
    async fn a_second_daemon_does_not_take_a_served_status_socket() {
        let dir = std::env::temp_dir().join(format!("mcchatd-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let first = bind_unix(&path).unwrap();
        let second = bind_unix(&path);
        assert_eq!(second.unwrap_err().kind(), std::io::ErrorKind::AddrInUse);
        // The first still serves: a client reaches it.
        let client = tokio::net::UnixStream::connect(&path).await;
        assert!(client.is_ok());
        assert!(first.accept().await.is_ok());
        // A stale file (nobody serving) is replaced.
        drop(first);
        assert!(bind_unix(&path).is_ok());
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[cfg(test)]
mod slot_tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// PROTOCOL 4.4: two connections per address, four per IPv6 /64, eight over TCP in all;
    /// the local socket has its own; a slot comes back when its connection ends.
    #[test]
    fn connections_are_capped_per_address_per_net_and_in_all() {
        let slots = Slots::new();
        let a: Vec<Slot> = (0..PER_ADDRESS)
            .map(|_| slots.tcp(ip("192.0.2.1")).expect("a slot"))
            .collect();
        assert!(
            slots.tcp(ip("192.0.2.1")).is_none(),
            "a third from one address"
        );
        assert!(
            slots.tcp(ip("::ffff:192.0.2.1")).is_none(),
            "the same address, mapped"
        );
        // One /64, many addresses: four at most.
        let net: Vec<Slot> = (1..=4)
            .filter_map(|i| slots.tcp(ip(&format!("2001:db8::{i}"))))
            .collect();
        assert_eq!(net.len(), PER_NET);
        assert!(slots.tcp(ip("2001:db8::99")).is_none());
        // Eight in all: two more from elsewhere, then none.
        let rest: Vec<Slot> = (2..=3)
            .filter_map(|i| slots.tcp(ip(&format!("192.0.2.{i}"))))
            .collect();
        assert_eq!(rest.len(), 2);
        assert!(slots.tcp(ip("192.0.2.9")).is_none(), "all eight are taken");
        // Taken by the network, the local socket still has its own.
        let local: Vec<Slot> = (0..MAX_LOCAL_CLIENTS)
            .filter_map(|_| slots.local())
            .collect();
        assert_eq!(local.len(), MAX_LOCAL_CLIENTS);
        assert!(slots.local().is_none());
        drop(a);
        assert!(slots.tcp(ip("192.0.2.1")).is_some(), "given back");
        drop(net);
        assert!(
            slots
                .sources
                .lock()
                .unwrap()
                .get(&ip("2001:db8::"))
                .is_none()
        );
    }

    /// Issue 11's review: four slow readers, two connections each, held all eight slots. An
    /// address's second connection is taken only while half the slots are free: four hosts
    /// get six, and two are left for everyone else.
    #[test]
    fn a_second_connection_per_address_only_while_half_the_slots_are_free() {
        let slots = Slots::new();
        let held: Vec<Slot> = (1..=4)
            .flat_map(|i| [ip(&format!("192.0.2.{i}")); 2])
            .filter_map(|a| slots.tcp(a))
            .collect();
        assert_eq!(held.len(), 6);
        let others = [slots.tcp(ip("192.0.2.50")), slots.tcp(ip("192.0.2.51"))];
        assert!(others.iter().all(Option::is_some));
        assert!(slots.tcp(ip("192.0.2.52")).is_none(), "all eight are taken");
    }
}
