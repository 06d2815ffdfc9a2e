//! Requests to mcchatd's status port (TCP on the relay port, or the local Unix socket): one
//! request line out, one JSON document back. `mcchat status`, `mcchat history` and the
//! catch-up of `mcchat join` all go through here.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use std::io::{Read, Write};

use mcchat_core::control::{HistoryQuery, HistoryRecord, Request, Status};
use mcchat_core::peer::Received;
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

/// Asks for history and returns it whole, oldest first, within `timeout` in all (`join`'s
/// catch-up: a few messages, and it must not hold up the conversation).
pub(crate) async fn history(
    endpoint: &Endpoint,
    query: &HistoryQuery,
    timeout: Duration,
) -> Result<Vec<Received>> {
    let mut messages = Vec::new();
    let ask = history_each(endpoint, query, timeout, |m| {
        messages.push(m);
        Ok(())
    });
    tokio::time::timeout(timeout, ask)
        .await
        .with_context(|| format!("mcchatd did not answer within {} s", timeout.as_secs_f32()))??;
    Ok(messages)
}

/// A connection to the status port, in blocking mode: a history answer is read as it
/// streams in, on a thread of its own.
enum Blocking {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl Blocking {
    async fn connect(endpoint: &Endpoint, timeout: Duration) -> Result<Self> {
        match endpoint {
            Endpoint::Tcp(spec) => {
                let addr = via::resolve(spec).await?;
                let connect = move || std::net::TcpStream::connect_timeout(&addr, timeout);
                let stream = tokio::task::spawn_blocking(connect)
                    .await
                    .context("the connecting thread failed")?
                    .with_context(|| format!("cannot connect to mcchatd at {addr} (TCP)"))?;
                Ok(Self::Tcp(stream))
            }
            Endpoint::Unix(path) => std::os::unix::net::UnixStream::connect(path)
                .map(Self::Unix)
                .with_context(|| {
                    format!(
                        "cannot connect to {} (is mcchatd running here? try --via HOST)",
                        path.display()
                    )
                }),
        }
    }

    fn set_read_timeout(&self, t: Duration) -> std::io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_read_timeout(Some(t)),
            Self::Unix(s) => s.set_read_timeout(Some(t)),
        }
    }
}

impl Read for Blocking {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Blocking {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Asks for history and hands each message to `each` as it arrives, oldest first: an answer
/// of any length is read with bounded memory, and given up only if nothing arrives for
/// `progress` (not for its total time: a slow link gets it whole). Returns how many came.
pub(crate) async fn history_each(
    endpoint: &Endpoint,
    query: &HistoryQuery,
    progress: Duration,
    mut each: impl FnMut(Received) -> Result<()>,
) -> Result<u64> {
    let line = format!("{}\n", Request::History(query.clone()).line());
    let mut stream = Blocking::connect(endpoint, progress).await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(256);
    let room = query.room.clone();
    let from = endpoint.clone();
    let reading = tokio::task::spawn_blocking(move || -> Result<u64> {
        stream.set_read_timeout(progress)?;
        stream
            .write_all(line.as_bytes())
            .with_context(|| format!("cannot send the query to mcchatd at {from}"))?;
        read_history(std::io::BufReader::new(stream), &room, &from, |m| {
            tx.blocking_send(m).is_ok()
        })
    });
    while let Some(m) = rx.recv().await {
        each(m)?;
    }
    reading.await.context("the reading thread failed")?
}

/// Keeps the first bytes read, for an error about an answer this mcchat cannot read.
struct Start<R> {
    inner: R,
    seen: Vec<u8>,
}

impl<R: Read> Read for Start<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let keep = n.min(80 - self.seen.len().min(80));
        self.seen.extend_from_slice(&buf[..keep]);
        Ok(n)
    }
}

/// How an answer ended, as the streaming reader saw it.
enum Ending {
    /// The messages, all of them.
    Done,
    /// `{"error": ...}`.
    Refused(String),
    /// `each` wanted no more.
    Stopped,
}

/// The answer document, read as it streams: `messages` element by element into `each`.
struct Answer<'a, F> {
    room: &'a str,
    each: &'a mut F,
    count: &'a mut u64,
}

impl<'de, F: FnMut(Received) -> bool> serde::de::DeserializeSeed<'de> for Answer<'_, F> {
    type Value = Ending;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Ending, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, F: FnMut(Received) -> bool> serde::de::Visitor<'de> for Answer<'_, F> {
    type Value = Ending;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a history answer")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Ending, A::Error> {
        let mut ending = None;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "messages" => {
                    let seed = Messages {
                        room: self.room,
                        each: &mut *self.each,
                        count: &mut *self.count,
                    };
                    ending = Some(map.next_value_seed(seed)?);
                }
                "error" => ending = Some(Ending::Refused(map.next_value()?)),
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
            if matches!(ending, Some(Ending::Stopped)) {
                return Ok(Ending::Stopped);
            }
        }
        ending.ok_or_else(|| serde::de::Error::custom("neither messages nor an error"))
    }
}

struct Messages<'a, F> {
    room: &'a str,
    each: &'a mut F,
    count: &'a mut u64,
}

impl<'de, F: FnMut(Received) -> bool> serde::de::DeserializeSeed<'de> for Messages<'_, F> {
    type Value = Ending;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Ending, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, F: FnMut(Received) -> bool> serde::de::Visitor<'de> for Messages<'_, F> {
    type Value = Ending;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of messages")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Ending, A::Error> {
        while let Some(r) = seq.next_element::<HistoryRecord>()? {
            *self.count += 1;
            // The daemon answers for the room asked; anything else is not shown.
            if r.room == self.room && !(self.each)(Received::from(r)) {
                return Ok(Ending::Stopped);
            }
        }
        Ok(Ending::Done)
    }
}

/// Reads a history answer from `reader`, handing each message of `room` to `each` (which
/// returns false to stop); returns how many messages the answer held.
fn read_history<R: Read>(
    reader: R,
    room: &str,
    endpoint: &Endpoint,
    mut each: impl FnMut(Received) -> bool,
) -> Result<u64> {
    use serde::de::DeserializeSeed as _;
    let mut start = Start {
        inner: reader,
        seen: Vec::new(),
    };
    let mut count = 0;
    let mut de = serde_json::Deserializer::from_reader(&mut start);
    let read = Answer {
        room,
        each: &mut each,
        count: &mut count,
    }
    .deserialize(&mut de);
    match read {
        Ok(Ending::Done | Ending::Stopped) => Ok(count),
        Ok(Ending::Refused(error)) => bail!("mcchatd: {error}"),
        Err(e) if e.is_io() => bail!(
            "failed to read mcchatd's answer from {endpoint} after {count} messages: {e} \
             (nothing arrived for too long?)"
        ),
        Err(e) if e.is_eof() && count > 0 => bail!(
            "mcchatd's answer from {endpoint} was cut short after {count} messages (the daemon \
             stopped or its database failed; see its log)"
        ),
        Err(_) => {
            // The parser stopped at the first byte it could not take: the rest of the start
            // (what has arrived of it) says more.
            let mut more = [0u8; 80];
            let want = 80usize.saturating_sub(start.seen.len());
            if let Ok(n) = start.inner.read(&mut more[..want]) {
                start.seen.extend_from_slice(&more[..n]);
            }
            bail!(
                "mcchatd at {endpoint} sent a history answer this mcchat cannot read: it begins \
                 {:?}; versions differ? (a daemon older than the history feature?)",
                start_of(&String::from_utf8_lossy(&start.seen))
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mcchat_core::wire::{InstanceId, Kind};

    fn endpoint() -> Endpoint {
        Endpoint::Tcp("192.0.2.1:5554".into())
    }

    fn parse_history(doc: &str, room: &str, endpoint: &Endpoint) -> Result<Vec<Received>> {
        let mut got = Vec::new();
        read_history(doc.as_bytes(), room, endpoint, |m| {
            got.push(m);
            true
        })?;
        Ok(got)
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
        // An answer that ends part-way (the daemon stopped) says so, with how far it got.
        let cut = &doc[..doc.find("{\"room\":\"other\"").unwrap()];
        let e = parse_history(cut, "room1", &endpoint()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "mcchatd's answer from 192.0.2.1:5554 was cut short after 1 messages (the daemon \
             stopped or its database failed; see its log)"
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
