//! `mcchat join` without a terminal: every stdin line is a message, every event a stdout line,
//! and EOF leaves the room. This is what `tail -f build.log | mcchat join ci --name bot` runs.

use anyhow::{Context as _, Result};
use mcchat_core::wire::Kind;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, BufReader};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::display;
use crate::output::Stdout;
use crate::session::{Event, Session, is_fatal, now_ms};
use crate::{note, shutdown_signal};

/// Longest stdin line accepted; longer ones are reported and skipped, so one runaway line
/// cannot take all memory or flood the room.
pub(crate) const MAX_LINE: usize = 64 * 1024;

/// One read from stdin.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line {
    /// A line, without its line ending.
    Text(String),
    /// A line longer than [`MAX_LINE`], skipped; its length so far.
    TooLong(usize),
}

/// Reads lines from `input` until EOF and sends them on `tx`. Ends early if the receiver is
/// gone. Invalid UTF-8 is replaced with U+FFFD rather than dropping the line.
pub(crate) async fn read_lines<R: AsyncRead + Unpin>(
    input: R,
    tx: mpsc::Sender<Line>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(input);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let limit = (MAX_LINE + 1) as u64;
        let n = (&mut reader)
            .take(limit)
            .read_until(b'\n', &mut buf)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let line = if buf.last() != Some(&b'\n') && buf.len() > MAX_LINE {
            // Skip the rest of the line, however long, in bounded pieces.
            let mut skipped = buf.len();
            loop {
                buf.clear();
                let n = (&mut reader)
                    .take(limit)
                    .read_until(b'\n', &mut buf)
                    .await?;
                skipped += n;
                if n == 0 || buf.last() == Some(&b'\n') {
                    break;
                }
            }
            Line::TooLong(skipped)
        } else {
            while matches!(buf.last(), Some(b'\n' | b'\r')) {
                buf.pop();
            }
            Line::Text(String::from_utf8_lossy(&buf).into_owned())
        };
        if tx.send(line).await.is_err() {
            return Ok(());
        }
    }
}

/// Runs the room until stdin ends or a signal arrives.
pub(crate) async fn run(mut session: Session) -> Result<()> {
    let mut out = Stdout::new();
    let shutdown = shutdown_signal()?;
    session.enter().await?;
    note(&format!("joined {}", session.describe()));

    let (tx, mut rx) = mpsc::channel(64);
    let reader: JoinHandle<std::io::Result<()>> = tokio::spawn(read_lines(tokio::io::stdin(), tx));
    tokio::pin!(shutdown);
    let mut line_no = 0u64;
    let result: Result<()> = loop {
        let due = session.heartbeat_due();
        tokio::select! {
            r = &mut shutdown => break r,
            line = rx.recv() => match line {
                None => break Ok(()),
                Some(Line::Text(text)) => {
                    line_no += 1;
                    if text.is_empty() {
                        continue;
                    }
                    if let Err(e) = session.send(Kind::Message, &text).await {
                        if is_fatal(&e) {
                            break Err(e);
                        }
                        note(&format!("stdin line {line_no} not sent: {e:#}"));
                    }
                }
                Some(Line::TooLong(len)) => {
                    line_no += 1;
                    note(&format!(
                        "stdin line {line_no} is {len} bytes, over the {MAX_LINE}-byte limit; \
                         skipped it"
                    ));
                }
            },
            event = session.recv() => match event {
                Ok(event) => {
                    if let Err(e) = show(&mut out, &event) {
                        break Err(e);
                    }
                }
                Err(e) => break Err(e),
            },
            () = tokio::time::sleep_until(due) => {
                match session.tick().await {
                    Ok(events) => {
                        if let Err(e) = events.iter().try_for_each(|ev| show(&mut out, ev)) {
                            break Err(e);
                        }
                    }
                    Err(e) => break Err(e),
                }
            }
        }
    };
    // The reader may still wait on stdin (after a signal); it must not outlive this loop.
    reader.abort();
    if let Ok(Err(e)) = reader.await {
        tracing::warn!(error = %e, "reading stdin failed");
    }
    let left = session.leave().await;
    session.log_drops();
    result?;
    left.context("failed to send the leave message")?;
    Ok(())
}

fn show(out: &mut Stdout, event: &Event) -> Result<()> {
    out.line(&display::event_line(event, now_ms(), false))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8]) -> Vec<Line> {
        let (tx, mut rx) = mpsc::channel(1024);
        read_lines(input, tx).await.unwrap();
        let mut v = Vec::new();
        while let Ok(l) = rx.try_recv() {
            v.push(l);
        }
        v
    }

    #[tokio::test]
    async fn splits_lines_and_skips_runaways() {
        let mut input = b"one\r\ntwo\n\xffbad\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_LINE * 3));
        input.extend(b"\nlast");
        assert_eq!(
            lines(&input).await,
            vec![
                Line::Text("one".into()),
                Line::Text("two".into()),
                Line::Text("\u{fffd}bad".into()),
                Line::TooLong(MAX_LINE * 3 + 1),
                Line::Text("last".into()),
            ]
        );
    }
}
