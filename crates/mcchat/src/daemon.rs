//! Requests to mcchatd's status port (TCP on the relay port, or the local Unix socket): one
//! request line out, one JSON document back. `mcchat status`, `mcchat history` and the
//! catch-up of `mcchat join` all go through here.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use mcchat_core::wire::{InstanceId, Kind};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::via;
use mcchat_core::peer::Received;

/// Where a daemon answers.
#[derive(Debug, Clone)]
pub(crate) enum Endpoint {
    /// `--via HOST[:PORT]`: TCP on the relay port.
    Tcp(String),
    /// The local Unix socket.
    Unix(PathBuf),
}

impl Endpoint {
    pub(crate) fn new(via: Option<&str>, socket: PathBuf) -> Self {
        match via {
            Some(spec) => Self::Tcp(spec.to_owned()),
            None => Self::Unix(socket),
        }
    }
}

/// The largest answer read; a daemon with 10,000 subscribers writes about 1 MiB of status,
/// 10,000 history messages about 3 MiB.
const MAX_ANSWER: u64 = 64 << 20;

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, line: &str) -> Result<Vec<u8>> {
    // One write, so the request usually travels in one segment.
    stream.write_all(format!("{line}\n").as_bytes()).await?;
    let mut doc = Vec::new();
    stream.take(MAX_ANSWER).read_to_end(&mut doc).await?;
    Ok(doc)
}

/// Sends `line` and returns the JSON document the daemon answers with.
pub(crate) async fn request(endpoint: &Endpoint, line: &str, timeout: Duration) -> Result<String> {
    let ask = async {
        match endpoint {
            Endpoint::Tcp(spec) => {
                let addr = via::resolve(spec).await?;
                let stream = tokio::net::TcpStream::connect(addr)
                    .await
                    .with_context(|| format!("cannot connect to mcchatd at {addr} (TCP)"))?;
                exchange(stream, line)
                    .await
                    .with_context(|| format!("failed to read mcchatd's answer from {addr}"))
            }
            Endpoint::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .with_context(|| {
                        format!(
                            "cannot connect to {} (is mcchatd running here? try --via HOST)",
                            path.display()
                        )
                    })?;
                exchange(stream, line).await.with_context(|| {
                    format!("failed to read mcchatd's answer from {}", path.display())
                })
            }
        }
    };
    let doc = tokio::time::timeout(timeout, ask)
        .await
        .with_context(|| format!("mcchatd did not answer within {} s", timeout.as_secs_f32()))??;
    Ok(String::from_utf8_lossy(&doc).trim().to_owned())
}

/// A history request (docs/PROTOCOL.md 6).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct HistoryQuery {
    pub(crate) room: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) since_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) grep: Option<String>,
    pub(crate) limit: u32,
}

#[derive(Debug, Deserialize)]
struct Record {
    room: String,
    kind: String,
    sender: String,
    text: String,
    id: Option<String>,
    seq: Option<u64>,
    ts_ms: Option<u64>,
    recv_ms: u64,
}

/// A history answer: `messages`, or `error`. Neither (a status document, say) is refused.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Answer {
    Messages { messages: Vec<Record> },
    Error { error: String },
}

/// Asks for history; the messages come oldest first.
pub(crate) async fn history(
    endpoint: &Endpoint,
    query: &HistoryQuery,
    timeout: Duration,
) -> Result<Vec<Received>> {
    let line = serde_json::json!({ "history": query }).to_string();
    let doc = request(endpoint, &line, timeout).await?;
    parse_history(&doc, &query.room)
}

fn parse_history(doc: &str, room: &str) -> Result<Vec<Received>> {
    let answer: Answer = serde_json::from_str(doc).with_context(|| {
        let start: String = doc.chars().take(80).collect();
        format!("mcchatd's history answer is not what this mcchat understands: {start:?} (a daemon older than the history feature?)")
    })?;
    let messages = match answer {
        Answer::Error { error } => bail!("mcchatd: {error}"),
        Answer::Messages { messages } => messages,
    };
    Ok(messages
        .into_iter()
        // The daemon answers for the room asked; anything else is not shown.
        .filter(|r| r.room == room)
        .map(|r| Received {
            kind: if r.kind == Kind::Action.name() {
                Kind::Action
            } else {
                Kind::Message
            },
            room: r.room,
            sender: r.sender,
            text: r.text,
            ts_ms: r.ts_ms.unwrap_or(r.recv_ms),
            recv_ms: r.recv_ms,
            from: None,
            instance: r.id.as_deref().and_then(InstanceId::parse),
            seq: r.seq,
            repair: false,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_and_errors_say_what_the_daemon_said() {
        let doc = r#"{"room":"room1","messages":[
            {"room":"room1","kind":"action","sender":"al","text":"waves","id":"00000000000000ff",
             "seq":3,"ts_ms":5,"recv_ms":6},
            {"room":"other","kind":"message","sender":"x","text":"y","id":null,"seq":null,
             "ts_ms":null,"recv_ms":1},
            {"room":"room1","kind":"message","sender":"b","text":"bare","id":null,"seq":null,
             "ts_ms":null,"recv_ms":9}]}"#;
        let got = parse_history(doc, "room1").unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].kind, Kind::Action);
        assert_eq!(got[0].instance, Some(InstanceId(0xff)));
        assert_eq!((got[1].ts_ms, got[1].seq), (9, None));
        let e = parse_history(r#"{"error":"history is off"}"#, "room1").unwrap_err();
        assert_eq!(e.to_string(), "mcchatd: history is off");
        assert!(parse_history("<html>", "room1").is_err());
        assert!(
            parse_history(r#"{"version":"0.1.0","rooms":[]}"#, "room1").is_err(),
            "a status document is not an empty history"
        );
    }
}
