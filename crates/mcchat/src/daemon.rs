//! Requests to mcchatd's status port (TCP on the relay port, or the local Unix socket): one
//! request line out, one JSON document back. `mcchat status`, `mcchat history` and the
//! catch-up of `mcchat join` all go through here.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use mcchat_core::control::{HistoryQuery, HistoryReply, Request, Status};
use mcchat_core::peer::Received;
use mcchat_core::wire::{InstanceId, Kind};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::via;

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

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(spec) => f.write_str(spec),
            Self::Unix(path) => write!(f, "{}", path.display()),
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

/// Asks for the status document; also returns it as the daemon wrote it, for `--json`
/// (which passes on fields this mcchat does not know).
pub(crate) async fn status(endpoint: &Endpoint, timeout: Duration) -> Result<(Status, String)> {
    let doc = request(endpoint, &Request::Status.line(), timeout).await?;
    let status = parse_status(&doc, endpoint)?;
    Ok((status, doc))
}

fn parse_status(doc: &str, endpoint: &Endpoint) -> Result<Status> {
    serde_json::from_str(doc).map_err(|e| {
        /// Just the version, which every status document has had.
        #[derive(serde::Deserialize)]
        struct Version {
            version: String,
        }
        let versions = match serde_json::from_str::<Version>(doc) {
            Ok(v) => format!(
                "mcchatd {}, mcchat {}",
                v.version,
                env!("CARGO_PKG_VERSION")
            ),
            Err(_) => format!(
                "mcchat {}; it begins {:?}",
                env!("CARGO_PKG_VERSION"),
                start_of(doc)
            ),
        };
        anyhow::anyhow!(
            "mcchatd at {endpoint} sent a status document this mcchat cannot read: {e}; \
             versions differ? ({versions})"
        )
    })
}

/// The first characters of a document, for an error.
fn start_of(doc: &str) -> String {
    doc.chars().take(80).collect()
}

/// Asks for history; the messages come oldest first.
pub(crate) async fn history(
    endpoint: &Endpoint,
    query: &HistoryQuery,
    timeout: Duration,
) -> Result<Vec<Received>> {
    let line = Request::History(query.clone()).line();
    let doc = request(endpoint, &line, timeout).await?;
    parse_history(&doc, &query.room, endpoint)
}

fn parse_history(doc: &str, room: &str, endpoint: &Endpoint) -> Result<Vec<Received>> {
    let answer: HistoryReply = serde_json::from_str(doc).map_err(|_| {
        // serde's message for an untagged enum says only that nothing matched.
        anyhow::anyhow!(
            "mcchatd at {endpoint} sent a history answer this mcchat cannot read: it begins \
             {:?}; versions differ? (a daemon older than the history feature?)",
            start_of(doc)
        )
    })?;
    let messages = match answer {
        HistoryReply::Error(e) => bail!("mcchatd: {}", e.error),
        HistoryReply::Messages(answer) => answer.messages,
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

    fn endpoint() -> Endpoint {
        Endpoint::Tcp("192.0.2.1:5554".into())
    }

    #[test]
    fn answers_parse_and_errors_say_what_the_daemon_said() {
        let doc = r#"{"room":"room1","messages":[
            {"room":"room1","kind":"action","sender":"al","text":"waves","id":"00000000000000ff",
             "seq":3,"ts_ms":5,"recv_ms":6},
            {"room":"other","kind":"message","sender":"x","text":"y","id":null,"seq":null,
             "ts_ms":null,"recv_ms":1},
            {"room":"room1","kind":"message","sender":"b","text":"bare","id":null,"seq":null,
             "ts_ms":null,"recv_ms":9}]}"#;
        let got = parse_history(doc, "room1", &endpoint()).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].kind, Kind::Action);
        assert_eq!(got[0].instance, Some(InstanceId(0xff)));
        assert_eq!((got[1].ts_ms, got[1].seq), (9, None));
        let e = parse_history(r#"{"error":"history is off"}"#, "room1", &endpoint()).unwrap_err();
        assert_eq!(e.to_string(), "mcchatd: history is off");
        let e = parse_history("<html>", "room1", &endpoint()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "mcchatd at 192.0.2.1:5554 sent a history answer this mcchat cannot read: it begins \
             \"<html>\"; versions differ? (a daemon older than the history feature?)"
        );
        assert!(
            parse_history(r#"{"version":"0.1.0","rooms":[]}"#, "room1", &endpoint()).is_err(),
            "a status document is not an empty history"
        );
    }

    #[test]
    fn a_status_document_this_mcchat_cannot_read_is_a_clear_error() {
        let e = parse_status(r#"{"version":"9.0.0","rooms":[]}"#, &endpoint()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "mcchatd at 192.0.2.1:5554 sent a status document this mcchat cannot read: \
                 missing field `uptime_secs` at line 1 column 30; versions differ? \
                 (mcchatd 9.0.0, mcchat {})",
                env!("CARGO_PKG_VERSION")
            )
        );
        let unix = Endpoint::Unix("/run/mcchat/mcchatd.sock".into());
        let e = parse_status("not json", &unix).unwrap_err().to_string();
        assert!(
            e.starts_with(
                "mcchatd at /run/mcchat/mcchatd.sock sent a status document this mcchat cannot \
                 read: expected ident at line 1 column 2; versions differ? (mcchat "
            ) && e.ends_with("; it begins \"not json\")"),
            "{e}"
        );
    }
}
