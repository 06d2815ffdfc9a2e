//! Reading the configuration again (SIGHUP), off the relay loop and bounded in time.
//!
//! Why: the rooms file is read from disk, which can block (a hung network mount, a FIFO
//! named by mistake is refused but a slow disk is not); the relay loop must keep relaying
//! meanwhile. The read runs on a blocking thread; if it has not ended within
//! [`RELOAD_TIMEOUT`], the reload fails with that error and the running configuration is
//! kept (the thread is left to finish on its own, and the next reload waits for it rather
//! than start a second thread beside it). One reload runs at a time; a signal that comes
//! while one runs makes one more afterwards, since the file may have changed since the first
//! began.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::notify;
use crate::settings::Settings;

/// Reads the configuration (the rooms file and the flags).
pub(crate) type Loader = Arc<dyn Fn() -> Result<Settings> + Send + Sync>;

/// How long one read of the configuration may take.
pub(crate) const RELOAD_TIMEOUT: Duration = Duration::from_secs(5);

/// The reloads asked for, and their results.
pub(super) struct Reloads {
    loader: Loader,
    tx: mpsc::Sender<Result<Settings>>,
    /// Results, for the relay loop's `select!` (cancel-safe).
    pub(super) results: mpsc::Receiver<Result<Settings>>,
    running: bool,
    again: bool,
    /// A blocking read is under way (it may outlive its timeout, stuck in the kernel): the
    /// next waits for it to end rather than start beside it, so a hung mount costs one
    /// thread, and the first read after it recovers applies.
    reading: Arc<watch::Sender<bool>>,
}

impl Reloads {
    pub(super) fn new(loader: Loader) -> Self {
        let (tx, results) = mpsc::channel(1);
        Self {
            loader,
            tx,
            results,
            running: false,
            again: false,
            reading: Arc::new(watch::channel(false).0),
        }
    }

    /// A reload was asked for (SIGHUP).
    pub(super) fn request(&mut self, token: &CancellationToken, tracker: &TaskTracker) {
        if self.running {
            self.again = true;
        } else {
            self.start(token, tracker);
        }
    }

    /// The relay loop has applied a result: start the next read if one was asked for.
    pub(super) fn done(&mut self, token: &CancellationToken, tracker: &TaskTracker) {
        self.running = false;
        if std::mem::take(&mut self.again) {
            self.start(token, tracker);
        }
    }

    fn start(&mut self, token: &CancellationToken, tracker: &TaskTracker) {
        self.running = true;
        notify::reloading();
        let loader = Arc::clone(&self.loader);
        let tx = self.tx.clone();
        let token = token.clone();
        let reading = Arc::clone(&self.reading);
        tracker.spawn(async move {
            let mut idle = reading.subscribe();
            if *idle.borrow() {
                tracing::warn!(
                    "the last read of the configuration has not ended (a file on a hung \
                     mount?); this reload waits for it"
                );
            }
            tokio::select! {
                () = token.cancelled() => return,
                r = idle.wait_for(|busy| !*busy) => if r.is_err() { return },
            }
            reading.send_replace(true);
            let done = Arc::clone(&reading);
            let read = tokio::task::spawn_blocking(move || {
                let result = loader();
                done.send_replace(false);
                result
            });
            let result = tokio::select! {
                // A stop does not wait for a read.
                () = token.cancelled() => return,
                r = tokio::time::timeout(RELOAD_TIMEOUT, read) => r,
            };
            let result = match result {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => Err(anyhow!("reading the configuration failed: {e}")),
                Err(_) => Err(anyhow!(
                    "reading the configuration took more than {} s (a file on a hung mount?)",
                    RELOAD_TIMEOUT.as_secs()
                )),
            };
            let _ = tx.send(result).await;
        });
    }
}
