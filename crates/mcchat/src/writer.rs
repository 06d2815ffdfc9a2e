//! Output on a thread of its own, behind a bounded queue, so a slow reader of `mcchat join`
//! or `mcchat listen` (a pager, `| (sleep 5; cat)`, a stuck terminal) never stalls the
//! driver loop: heartbeats, NACKs, repairs and renewals go on whatever the output does.
//!
//! The queue is bounded in bytes ([`QUEUE_BYTES`], weighed by the text a line carries) and in
//! lines ([`QUEUE_LINES`]): a burst (a long gap repaired, history) fits; a reader that stops
//! does not hold more. The policy when it is full: the line is not queued and is counted, and
//! one `-- N messages not shown: output too slow` ([`Line::Skipped`]) stands where they were,
//! written by the writer as soon as it has caught up (or before the next line queued,
//! whichever comes first). Nothing is left out without a word.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::time::Duration;

use anyhow::{Context as _, Result};
use mcchat_core::peer::Event;
use tokio::sync::oneshot;

/// Bytes of lines that may wait for the output (their text; each line counts 64 more).
pub(crate) const QUEUE_BYTES: usize = 256 * 1024;
/// Lines that may wait for the output.
pub(crate) const QUEUE_LINES: usize = 4096;

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

impl Line {
    /// What a line weighs in the queue's byte budget.
    fn weight(&self) -> usize {
        64 + match self {
            Self::Event(Event::Message(m)) => m.text.len() + m.sender.len(),
            Self::Text(t) => t.len(),
            Self::Event(_) | Self::Skipped(_) => 0,
        }
    }
}

/// Counts shared with the writer thread.
#[derive(Debug, Default)]
struct Shared {
    bytes: AtomicUsize,
    lines: AtomicUsize,
    /// Lines skipped that no notice has told of yet: whoever takes them (the writer when it
    /// has caught up, the driver before its next line) writes the notice.
    unreported: AtomicU64,
    skipped_total: AtomicU64,
    /// Skipped notices queued and not yet written, and the lines they count.
    notices: AtomicU64,
    noticed: AtomicU64,
}

/// The handle the driver writes through.
pub(crate) struct Output {
    tx: Option<Sender<(Line, usize)>>,
    max_bytes: usize,
    max_lines: usize,
    shared: Arc<Shared>,
    /// The writer's error (a closed stdout, a failed terminal), once.
    failed: oneshot::Receiver<anyhow::Error>,
    done: Receiver<()>,
}

impl Output {
    /// Starts the writer thread, which hands every line to `sink` in order; the queue holds
    /// at most `max_bytes` (by [`Line::weight`]) and `max_lines`.
    pub(crate) fn spawn<F>(max_bytes: usize, max_lines: usize, mut sink: F) -> Result<Self>
    where
        F: FnMut(&Line) -> Result<()> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<(Line, usize)>();
        let (fail_tx, failed) = oneshot::channel();
        let (done_tx, done) = mpsc::channel();
        let shared = Arc::new(Shared::default());
        let counts = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("output".into())
            .spawn(move || {
                let result = write_all(&rx, &counts, &mut sink);
                if let Err(e) = result {
                    let _ = fail_tx.send(e);
                }
                let _ = done_tx.send(());
            })
            .context("failed to start the output thread")?;
        Ok(Self {
            tx: Some(tx),
            max_bytes,
            max_lines,
            shared,
            failed,
            done,
        })
    }

    /// Queues `line`, or counts it if the queue is full. Never blocks.
    pub(crate) fn show(&mut self, line: Line) {
        if self.tx.is_none() {
            return;
        }
        let weight = line.weight();
        let full = self.shared.bytes.load(Ordering::Relaxed) + weight > self.max_bytes
            || self.shared.lines.load(Ordering::Relaxed) >= self.max_lines;
        if full {
            self.shared.unreported.fetch_add(1, Ordering::Relaxed);
            self.shared.skipped_total.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let unreported = self.shared.unreported.swap(0, Ordering::Relaxed);
        if unreported > 0 {
            self.shared.notices.fetch_add(1, Ordering::Relaxed);
            self.shared.noticed.fetch_add(unreported, Ordering::Relaxed);
            self.queue(Line::Skipped(unreported));
        }
        self.queue(line);
    }

    fn queue(&self, line: Line) {
        let Some(tx) = &self.tx else {
            return;
        };
        let weight = line.weight();
        self.shared.bytes.fetch_add(weight, Ordering::Relaxed);
        self.shared.lines.fetch_add(1, Ordering::Relaxed);
        // A send fails only once the writer has stopped; `failed` says why.
        let _ = tx.send((line, weight));
    }

    /// Lines not shown so far because the output was too slow.
    pub(crate) fn skipped(&self) -> u64 {
        self.shared.skipped_total.load(Ordering::Relaxed)
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
        drop(self.tx.take());
        if self.done.recv_timeout(within).is_err() {
            // The reader is not reading: exit anyway, and say so where it can be seen.
            let waiting = self.shared.lines.load(Ordering::Relaxed) as u64;
            let notices = self.shared.notices.load(Ordering::Relaxed);
            let skipped = self.shared.unreported.load(Ordering::Relaxed);
            // A queued notice stands for the lines it counts, not for one.
            let lines = (waiting - notices.min(waiting))
                + self.shared.noticed.load(Ordering::Relaxed)
                + skipped;
            crate::note(&format!(
                "{lines} lines not shown: output too slow (gave up after {within:?})"
            ));
            return Ok(());
        }
        match self.failed.try_recv() {
            Ok(e) => Err(e),
            Err(_) => Ok(()),
        }
    }
}

/// The writer thread's loop: every line in order, and the skipped notice whenever the queue
/// runs dry with lines unreported.
fn write_all(
    rx: &Receiver<(Line, usize)>,
    shared: &Shared,
    sink: &mut impl FnMut(&Line) -> Result<()>,
) -> Result<()> {
    let mut next = rx.recv().ok();
    while let Some((line, weight)) = next.take() {
        sink(&line)?;
        if let Line::Skipped(n) = line {
            shared.notices.fetch_sub(1, Ordering::Relaxed);
            shared.noticed.fetch_sub(n, Ordering::Relaxed);
        }
        shared.bytes.fetch_sub(weight, Ordering::Relaxed);
        shared.lines.fetch_sub(1, Ordering::Relaxed);
        next = match rx.try_recv() {
            Ok(item) => Some(item),
            Err(TryRecvError::Empty) => {
                let unreported = shared.unreported.swap(0, Ordering::Relaxed);
                if unreported > 0 {
                    sink(&Line::Skipped(unreported))?;
                }
                rx.recv().ok()
            }
            Err(TryRecvError::Disconnected) => None,
        };
    }
    let unreported = shared.unreported.swap(0, Ordering::Relaxed);
    if unreported > 0 {
        sink(&Line::Skipped(unreported))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    type Seen = Arc<Mutex<Vec<String>>>;

    /// A sink that records what it writes, and waits for `gate` before its first line.
    fn recorder(gate: Option<Receiver<()>>) -> (Seen, impl FnMut(&Line) -> Result<()>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink_seen = Arc::clone(&seen);
        let mut gate = gate;
        let sink = move |line: &Line| {
            if let Some(g) = gate.take() {
                let _ = g.recv();
            }
            sink_seen.lock().unwrap().push(match line {
                Line::Text(t) => t.clone(),
                Line::Skipped(n) => format!("skipped {n}"),
                Line::Event(_) => "event".into(),
            });
            Ok(())
        };
        (seen, sink)
    }

    fn tally(seen: &[String]) -> (u64, u64) {
        let shown = seen.iter().filter(|l| !l.starts_with("skipped")).count() as u64;
        let skipped = seen
            .iter()
            .filter_map(|l| l.strip_prefix("skipped "))
            .map(|n| n.parse::<u64>().unwrap())
            .sum();
        (shown, skipped)
    }

    #[test]
    fn a_slow_sink_costs_skipped_lines_never_a_wait() {
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let (seen, sink) = recorder(Some(gate_rx));
        // Room for 4 lines of this size.
        let mut out = Output::spawn(4 * 65, 100, sink).unwrap();
        for i in 0..100 {
            out.show(Line::Text(i.to_string()));
        }
        assert!(out.skipped() >= 90, "{}", out.skipped());
        gate_tx.send(()).unwrap();
        out.finish(Duration::from_secs(5)).unwrap();
        let seen = seen.lock().unwrap();
        let (shown, skipped) = tally(&seen);
        assert_eq!(shown + skipped, 100, "{seen:?}");
        assert_eq!(shown, 4, "4 lines of 65 bytes fit in 260: {seen:?}");
        assert!(seen.last().unwrap().starts_with("skipped"), "{seen:?}");
    }

    #[test]
    fn a_burst_within_the_budget_is_all_shown() {
        let (seen, sink) = recorder(None);
        let mut out = Output::spawn(QUEUE_BYTES, QUEUE_LINES, sink).unwrap();
        for i in 0..2000 {
            out.show(Line::Text(format!("message {i} with some text in it")));
        }
        assert_eq!(out.skipped(), 0);
        out.finish(Duration::from_secs(5)).unwrap();
        assert_eq!(tally(&seen.lock().unwrap()), (2000, 0));
    }

    #[test]
    fn the_notice_comes_once_the_reader_catches_up_without_another_line() {
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let (seen, sink) = recorder(Some(gate_rx));
        let mut out = Output::spawn(2 * 66, 100, sink).unwrap();
        for i in 0..10 {
            out.show(Line::Text(format!("{i:02}")));
        }
        gate_tx.send(()).unwrap();
        // No further line: the writer says what it skipped as soon as it has caught up.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !seen
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with("skipped"))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                seen.lock().unwrap()
            );
            std::thread::yield_now();
        }
        let (shown, skipped) = tally(&seen.lock().unwrap());
        assert_eq!(shown + skipped, 10);
        out.finish(Duration::from_secs(5)).unwrap();
    }
}
