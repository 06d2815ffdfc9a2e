//! stdout for chat lines: flushed per line, and a closed pipe (`mcchat listen | head`) ends the
//! program cleanly instead of as an error.

use std::io::{IsTerminal as _, Write as _};

/// stdout was closed by the reader; `main` exits 0 on it.
#[derive(Debug, thiserror::Error)]
#[error("stdout closed")]
pub struct StdoutClosed;

/// A line writer on stdout.
pub(crate) struct Stdout(std::io::Stdout);

impl Stdout {
    pub(crate) fn new() -> Self {
        Self(std::io::stdout())
    }

    pub(crate) fn is_terminal(&self) -> bool {
        self.0.is_terminal()
    }

    /// Writes `line` and a newline, and flushes.
    pub(crate) fn line(&mut self, line: &str) -> anyhow::Result<()> {
        let mut lock = self.0.lock();
        let r = writeln!(lock, "{line}").and_then(|()| lock.flush());
        map(r)
    }

    /// Writes raw bytes and flushes.
    pub(crate) fn write_bytes(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let mut lock = self.0.lock();
        let r = lock.write_all(bytes).and_then(|()| lock.flush());
        map(r)
    }
}

fn map(r: std::io::Result<()>) -> anyhow::Result<()> {
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("failed to write to stdout")),
    }
}
