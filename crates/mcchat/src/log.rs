//! Where diagnostics go. Normally stderr; while the terminal front end is active, through the
//! line editor's external printer, so a `-v` log line never lands in the middle of the line
//! being typed (STYLE: user-facing output and logs on separate, non-interfering paths).

use std::io::Write;
use std::sync::Mutex;

use rustyline::ExternalPrinter;

/// The printer logs go through while set.
static PRINTER: Mutex<Option<Box<dyn ExternalPrinter + Send>>> = Mutex::new(None);

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
        if self.0.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(&self.0).into_owned();
        if let Ok(mut printer) = PRINTER.lock()
            && let Some(p) = printer.as_mut()
            && p.print(text.clone()).is_ok()
        {
            return;
        }
        // Logging must never fail the program; a closed stderr loses the line.
        let _ = std::io::stderr().write_all(text.as_bytes());
    }
}
