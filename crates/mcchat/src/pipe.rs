//! `mcchat join` without a terminal: every stdin line is a message, every event a stdout line,
//! and EOF leaves the room. This is what `tail -f build.log | mcchat join ci --name bot` runs.

use anyhow::Result;
use mcchat_core::wire::Kind;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, BufReader};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::driver::{Input, Peer};
use crate::note;

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

/// Reads lines from `input` until EOF and sends what `map` makes of them on `tx`. Ends early
/// if the receiver is gone. Invalid UTF-8 is replaced with U+FFFD rather than dropping the
/// line.
pub(crate) async fn read_lines<R: AsyncRead + Unpin, T>(
    input: R,
    tx: mpsc::Sender<T>,
    mut map: impl FnMut(Line) -> Option<T>,
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
        let Some(item) = map(line) else {
            continue;
        };
        if tx.send(item).await.is_err() {
            return Ok(());
        }
    }
}

/// What a stdin line asks for: every non-empty line is a message.
fn to_input(line_no: &mut u64, line: Line) -> Option<Input> {
    *line_no += 1;
    match line {
        Line::Text(text) if text.is_empty() => None,
        Line::Text(text) => Some(Input::Say(Kind::Message, text)),
        Line::TooLong(len) => {
            note(&format!(
                "stdin line {line_no} is {len} bytes, over the {MAX_LINE}-byte limit; skipped it"
            ));
            None
        }
    }
}

/// Runs the room until stdin ends or a signal arrives.
pub(crate) async fn run(mut peer: Peer, shutdown: impl Future<Output = Result<()>>) -> Result<()> {
    peer.enter().await?;
    note(&format!("joined {}", peer.describe()));
    let mut out = crate::stdout_writer(false, peer.room().name().to_string())?;
    let (tx, rx) = mpsc::channel(64);
    let mut line_no = 0u64;
    let reader: JoinHandle<std::io::Result<()>> =
        tokio::spawn(read_lines(tokio::io::stdin(), tx, move |line| {
            to_input(&mut line_no, line)
        }));
    let result = peer.run(Some(rx), &mut out, shutdown, true).await;
    // The reader may still wait on stdin (after a signal); it must not outlive this loop.
    reader.abort();
    if let Ok(Err(e)) = reader.await {
        tracing::warn!(error = %e, "reading stdin failed");
    }
    crate::finish(result, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8]) -> Vec<Line> {
        let (tx, mut rx) = mpsc::channel(1024);
        read_lines(input, tx, Some).await.unwrap();
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
