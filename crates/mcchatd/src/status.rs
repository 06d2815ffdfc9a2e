//! The status document and room history, and the listeners that serve them: TCP on the
//! relay port (the TCP handshake proves the address, so answering cannot reflect or amplify)
//! and a local Unix socket.
//!
//! A client connects and may send one request line: `status`, or a JSON history query
//! `{"history":{"room":"room1","limit":20}}`. It reads one JSON document back and the daemon
//! closes the connection. A client that sends nothing within [`REQUEST_WAIT`] gets the
//! status, so `nc HOST 5554 </dev/null` still works.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mcchat_core::control::{self, ErrorAnswer, HistoryAnswer, HistoryQuery, Request};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::history::Reader;

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
pub(crate) type StatusRequest = oneshot::Sender<String>;

/// How long a status client may take to read the answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Status connections served at once; more are closed at once, so status can never crowd
/// out relaying (each answer is built by the relay loop).
pub(crate) const MAX_STATUS_CLIENTS: usize = 8;

/// The connection slots shared by the TCP and Unix listeners.
pub(crate) fn slots() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(MAX_STATUS_CLIENTS))
}

async fn answer<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: S,
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
            let (tx, rx) = oneshot::channel();
            if services.status.send(tx).await.is_err() {
                return;
            }
            let Ok(doc) = rx.await else { return };
            doc
        }
        Ok(Request::History(query)) => history_answer(query, services.history.as_ref()).await,
        Err(e) => error_doc(&e.to_string()),
    };
    let write = async {
        w.write_all(doc.as_bytes()).await?;
        w.write_all(b"\n").await?;
        w.shutdown().await
    };
    if let Ok(Err(error)) = tokio::time::timeout(WRITE_TIMEOUT, write).await {
        tracing::debug!(%error, "status client went away");
    }
}

fn error_doc(message: &str) -> String {
    to_json(&ErrorAnswer::new(message))
}

/// The document as one line. The control types are strings, integers and string-keyed maps,
/// which always serialise.
pub(crate) fn to_json(doc: &impl serde::Serialize) -> String {
    serde_json::to_string(doc).unwrap_or_else(|_| "{}".to_owned())
}

/// Answers a history query: the messages, or `{"error": ...}` saying what was wrong.
async fn history_answer(query: HistoryQuery, history: Option<&Reader>) -> String {
    let Some(history) = history else {
        return error_doc("history is off on this daemon (state_dir is \"\" or not writable)");
    };
    if let Err(e) = query.check() {
        return error_doc(&e.to_string());
    }
    let room = query.room.clone();
    match history.query(query).await {
        Ok(messages) => to_json(&HistoryAnswer { room, messages }),
        Err(e) => {
            tracing::warn!(error = %e, "history query failed");
            error_doc(&format!("history query failed: {e}"))
        }
    }
}

/// Answers one status client on its own task, if a slot is free; otherwise closes it.
fn spawn_answer<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    slots: &Arc<Semaphore>,
    services: &Services,
    token: &CancellationToken,
    tracker: &TaskTracker,
) {
    let Ok(permit) = Arc::clone(slots).try_acquire_owned() else {
        tracing::debug!("status: too many clients at once");
        return;
    };
    let services = services.clone();
    let token = token.clone();
    tracker.spawn(async move {
        // Shutdown ends a slow client's answer at once rather than after its timeouts.
        tokio::select! {
            () = token.cancelled() => {}
            () = answer(stream, &services) => {}
        }
        drop(permit);
    });
}

/// Serves status on TCP until `token` is cancelled; `allowed` decides who may ask.
pub(crate) async fn serve_tcp(
    listener: TcpListener,
    services: Services,
    allowed: impl Fn(SocketAddr) -> bool + Send + 'static,
    slots: Arc<Semaphore>,
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
                spawn_answer(stream, &slots, &services, &token, &tracker)
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
    slots: Arc<Semaphore>,
    token: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            () = token.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => spawn_answer(stream, &slots, &services, &token, &tracker),
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
