//! The status document and the listeners that serve it: TCP on the relay port (the TCP
//! handshake proves the address, so answering cannot reflect or amplify) and a local Unix
//! socket. A client connects and reads one JSON document; the daemon closes the connection.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use std::sync::Arc;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, UnixListener};

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::counters::Counters;

/// One subscriber, as status shows it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SubscriberStatus {
    pub(crate) addr: String,
    pub(crate) name: String,
    pub(crate) expires_in_secs: u64,
}

/// One room the daemon knows.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RoomStatus {
    pub(crate) name: String,
    pub(crate) group: String,
    pub(crate) configured: bool,
    pub(crate) keep: bool,
    pub(crate) joined: bool,
    pub(crate) subscribers: Vec<SubscriberStatus>,
}

/// The whole status document.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Status {
    pub(crate) version: &'static str,
    pub(crate) uptime_secs: u64,
    pub(crate) rooms_file: String,
    pub(crate) listen: Vec<String>,
    pub(crate) subscribers: usize,
    pub(crate) joined_groups: Vec<String>,
    pub(crate) rooms: Vec<RoomStatus>,
    pub(crate) counters: Counters,
}

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

async fn answer<W: tokio::io::AsyncWrite + Unpin>(
    mut w: W,
    requests: &mpsc::Sender<StatusRequest>,
) {
    let (tx, rx) = oneshot::channel();
    if requests.send(tx).await.is_err() {
        return;
    }
    let Ok(doc) = rx.await else { return };
    let write = async {
        w.write_all(doc.as_bytes()).await?;
        w.write_all(b"\n").await?;
        w.shutdown().await
    };
    if let Ok(Err(error)) = tokio::time::timeout(WRITE_TIMEOUT, write).await {
        tracing::debug!(%error, "status client went away");
    }
}

/// Answers one status client on its own task, if a slot is free; otherwise closes it.
fn spawn_answer<W: tokio::io::AsyncWrite + Unpin + Send + 'static>(
    stream: W,
    slots: &Arc<Semaphore>,
    requests: &mpsc::Sender<StatusRequest>,
    tracker: &TaskTracker,
) {
    let Ok(permit) = Arc::clone(slots).try_acquire_owned() else {
        tracing::debug!("status: too many clients at once");
        return;
    };
    let requests = requests.clone();
    tracker.spawn(async move {
        answer(stream, &requests).await;
        drop(permit);
    });
}

/// Serves status on TCP until `token` is cancelled; `allowed` decides who may ask.
pub(crate) async fn serve_tcp(
    listener: TcpListener,
    requests: mpsc::Sender<StatusRequest>,
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
                spawn_answer(stream, &slots, &requests, &tracker)
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
    requests: mpsc::Sender<StatusRequest>,
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
            Ok((stream, _)) => spawn_answer(stream, &slots, &requests, &tracker),
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
pub(crate) fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
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
