//! Output on a thread of its own, behind a bounded queue, so a slow reader of `mcchat join`
//! or `mcchat listen` (a pager, `| (sleep 5; cat)`, a stuck terminal) never stalls the
//! driver loop: heartbeats, NACKs, repairs and renewals go on whatever the output does.
//!
//! The queue's policy when full: the line is not queued and counted; the next line that fits
//! is preceded by one `-- N messages not shown: output too slow` ([`Line::Skipped`]), so
//! nothing is left out without a word.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::time::Duration;

use anyhow::{Context as _, Result};
use mcchat_core::peer::Event;
use tokio::sync::oneshot;

/// How many lines may wait for the output.
pub(crate) const QUEUE: usize = 256;

/// One line of output.
#[derive(Debug)]
pub(crate) enum Line {
    /// Something that happened in the room.
    Event(Event),
    /// `count` lines were not shown because the output could not keep up.
    Skipped(u64),
    /// A reply to the user (`/who`, `/help`, an error), already formatted.
    Text(String),
}

/// Counts shared with the writer thread.
#[derive(Debug, Default)]
struct Counts {
    queued: AtomicU64,
    written: AtomicU64,
    /// Lines skipped that no notice has told of yet, for the writer's last line.
    unreported: AtomicU64,
}

/// The handle the driver writes through.
pub(crate) struct Output {
    tx: Option<SyncSender<Line>>,
    skipped: u64,
    counts: Arc<Counts>,
    /// The writer's error (a closed stdout, a failed terminal), once.
    failed: oneshot::Receiver<anyhow::Error>,
    done: Receiver<()>,
}

impl Output {
    /// Starts the writer thread, which hands every line to `sink` in order.
    pub(crate) fn spawn<F>(capacity: usize, mut sink: F) -> Result<Self>
    where
        F: FnMut(&Line) -> Result<()> + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel::<Line>(capacity);
        let (fail_tx, failed) = oneshot::channel();
        let (done_tx, done) = mpsc::channel();
        let counts = Arc::new(Counts::default());
        let shared = Arc::clone(&counts);
        std::thread::Builder::new()
            .name("output".into())
            .spawn(move || {
                let mut result = Ok(());
                for line in rx {
                    result = sink(&line);
                    if result.is_err() {
                        break;
                    }
                    shared.written.fetch_add(1, Ordering::Relaxed);
                }
                let left = shared.unreported.swap(0, Ordering::Relaxed);
                if result.is_ok() && left > 0 {
                    result = sink(&Line::Skipped(left));
                }
                if let Err(e) = result {
                    let _ = fail_tx.send(e);
                }
                let _ = done_tx.send(());
            })
            .context("failed to start the output thread")?;
        Ok(Self {
            tx: Some(tx),
            skipped: 0,
            counts,
            failed,
            done,
        })
    }

    /// Queues `line`, or counts it if the queue is full. Never blocks.
    pub(crate) fn show(&mut self, line: Line) {
        let Some(tx) = &self.tx else {
            return;
        };
        if self.skipped > 0 {
            match tx.try_send(Line::Skipped(self.skipped)) {
                Ok(()) => {
                    self.counts.queued.fetch_add(1, Ordering::Relaxed);
                    self.skipped = 0;
                }
                Err(_) => {
                    self.skipped += 1;
                    return;
                }
            }
        }
        match tx.try_send(line) {
            Ok(()) => {
                self.counts.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_)) => self.skipped += 1,
            // The writer has stopped; `failed` says why.
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Lines not shown so far because the output was too slow.
    pub(crate) fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Resolves with the writer's error when it fails (stdout closed): the run ends.
    /// Cancel-safe (a `select!` arm).
    pub(crate) async fn failed(&mut self) -> anyhow::Error {
        match (&mut self.failed).await {
            Ok(e) => e,
            Err(_) => std::future::pending().await,
        }
    }

    /// Ends the output: what is queued is written within `within`, then a last notice of
    /// what was skipped. Returns the writer's error, if it had one.
    pub(crate) fn finish(mut self, within: Duration) -> Result<()> {
        self.counts
            .unreported
            .fetch_add(self.skipped, Ordering::Relaxed);
        drop(self.tx.take());
        if self.done.recv_timeout(within).is_err() {
            // The reader is not reading: exit anyway, and say so where it can be seen.
            let waiting = self.counts.queued.load(Ordering::Relaxed)
                - self.counts.written.load(Ordering::Relaxed);
            crate::note(&format!(
                "{waiting} lines not shown: output too slow (gave up after {within:?})"
            ));
            return Ok(());
        }
        match self.failed.try_recv() {
            Ok(e) => Err(e),
            Err(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn a_slow_sink_costs_skipped_lines_never_a_wait() {
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink_seen = Arc::clone(&seen);
        let mut first = true;
        let mut out = Output::spawn(4, move |line: &Line| {
            if first {
                // The reader is slow: nothing is written until the test lets it.
                let _ = gate_rx.recv();
                first = false;
            }
            sink_seen.lock().unwrap().push(match line {
                Line::Text(t) => t.clone(),
                Line::Skipped(n) => format!("skipped {n}"),
                Line::Event(_) => "event".into(),
            });
            Ok(())
        })
        .unwrap();
        for i in 0..100 {
            out.show(Line::Text(i.to_string()));
        }
        // 1 taken by the writer, 4 queued: the other 95 were counted, not waited for.
        assert!(out.skipped() >= 90, "{}", out.skipped());
        gate_tx.send(()).unwrap();
        out.finish(Duration::from_secs(5)).unwrap();
        let seen = seen.lock().unwrap();
        let shown = seen.iter().filter(|l| !l.starts_with("skipped")).count() as u64;
        let skipped: u64 = seen
            .iter()
            .filter_map(|l| l.strip_prefix("skipped "))
            .map(|n| n.parse::<u64>().unwrap())
            .sum();
        assert_eq!(shown + skipped, 100, "{seen:?}");
        assert_eq!(
            seen.last().map(String::as_str),
            Some(&*format!("skipped {skipped}"))
        );
    }
}
