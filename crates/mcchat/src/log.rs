//! Where diagnostics go. Normally stderr; while the terminal front end is active, through the
//! line editor's external printer, so a `-v` log line never lands in the middle of the line
//! being typed (STYLE: user-facing output and logs on separate, non-interfering paths).
//!
//! Either way a thread of its own writes them, behind a bounded queue, so a stalled terminal
//! (Ctrl-S, a frozen ssh link) or a stderr nobody reads never blocks the driver loop: a line
//! the queue cannot take is dropped and counted, and the count is written with the next line
//! that gets through. `main` gives the queue a moment to drain before the process exits.

use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rustyline::ExternalPrinter;

/// The printer logs go through while set.
static PRINTER: Mutex<Option<Box<dyn ExternalPrinter + Send>>> = Mutex::new(None);

/// Lines that may wait for stderr.
const QUEUE: usize = 512;

/// The queue to the log thread, started on first use.
static QUEUE_TX: OnceLock<Option<SyncSender<String>>> = OnceLock::new();
/// Lines queued and not yet written; lines dropped and not yet reported.
static PENDING: AtomicUsize = AtomicUsize::new(0);
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Sends log lines through `printer` until [`to_stderr`].
pub(crate) fn to_printer(printer: impl ExternalPrinter + Send + 'static) {
    if let Ok(mut p) = PRINTER.lock() {
        *p = Some(Box::new(printer));
    }
}

/// Sends log lines to stderr again.
pub(crate) fn to_stderr() {
    if let Ok(mut p) = PRINTER.lock() {
        *p = None;
    }
}

fn sender() -> Option<&'static SyncSender<String>> {
    QUEUE_TX
        .get_or_init(|| {
            let (tx, rx) = mpsc::sync_channel::<String>(QUEUE);
            std::thread::Builder::new()
                .name("log".into())
                .spawn(move || {
                    for text in rx {
                        let dropped = DROPPED.swap(0, Ordering::Relaxed);
                        if dropped > 0 {
                            write_now(&format!(
                                "mcchat: {dropped} log lines dropped: stderr too slow\n"
                            ));
                        }
                        write_now(&text);
                        PENDING.fetch_sub(1, Ordering::Relaxed);
                    }
                })
                .ok()
                .map(|_| tx)
        })
        .as_ref()
}

fn write_now(text: &str) {
    if let Ok(mut printer) = PRINTER.lock()
        && let Some(p) = printer.as_mut()
        && p.print(text.to_owned()).is_ok()
    {
        return;
    }
    // Logging must never fail the program; a closed stderr loses the line.
    let _ = std::io::stderr().write_all(text.as_bytes());
}

/// Queues `text` (one or more whole lines) for stderr or the printer; never blocks.
pub(crate) fn emit(text: String) {
    let Some(tx) = sender() else {
        write_now(&text);
        return;
    };
    PENDING.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = tx.try_send(text) {
        PENDING.fetch_sub(1, Ordering::Relaxed);
        match e {
            TrySendError::Full(_) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
            TrySendError::Disconnected(text) => write_now(&text),
        }
    }
}

/// Waits (at most `within`) until what was queued has been written: called before exit.
pub fn flush(within: Duration) {
    let deadline = Instant::now() + within;
    while PENDING.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let dropped = DROPPED.swap(0, Ordering::Relaxed);
    if dropped > 0 {
        write_now(&format!(
            "mcchat: {dropped} log lines dropped: stderr too slow\n"
        ));
    }
}

/// One log event's bytes, delivered when dropped (tracing writes each event in one go).
pub struct LogWriter(Vec<u8>);

/// A writer for `tracing_subscriber::fmt().with_writer(...)`.
pub fn log_writer() -> LogWriter {
    LogWriter(Vec::new())
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            emit(String::from_utf8_lossy(&self.0).into_owned());
        }
    }
}
