//! mcchatd's control contract: the request a client sends on the status connection (TCP on
//! the relay port, or the local Unix socket) and the one JSON document the daemon answers
//! with (docs/PROTOCOL.md 4.4 and 6). The daemon builds its answers from these types and the
//! CLI reads them back into the same types, so the two cannot drift apart.
//!
//! - A request is one line: [`Request::parse`] on the daemon, [`Request::line`] on the client.
//!   `status` is a bare word, not JSON, which is why [`Request`] itself has no serde form;
//!   the JSON request `{"history": QUERY}` is [`HistoryRequest`].
//! - The answers: [`Status`] for `status`, [`HistoryAnswer`] for a history query,
//!   [`ErrorAnswer`] for anything the daemon refuses. A client reading the answer to a
//!   history query takes a [`HistoryReply`], which is either.
//!
//! Compatibility: the answers tolerate fields they do not know, so an older `mcchat` reads a
//! newer daemon's status. Requests do not (`deny_unknown_fields`): a misspelt key in a query
//! is an error rather than a silently wider query. Field names and JSON types are the
//! contract; the order of keys in an object is not.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::wire::{self, Kind};

/// The relay port mcchatd listens on by default (UDP for relaying, TCP for these requests).
pub const DEFAULT_RELAY_PORT: u16 = 5554;

/// Where mcchatd's local status socket is by default (systemd's `RuntimeDirectory=mcchat`).
pub const DEFAULT_STATUS_SOCKET: &str = "/run/mcchat/mcchatd.sock";

/// The longest request line the daemon reads, in bytes.
pub const MAX_REQUEST_LINE: usize = 4096;

/// Messages one history query returns at most.
pub const MAX_QUERY: u32 = 10_000;

/// Messages a history query returns when it gives no `limit`.
pub const DEFAULT_QUERY_LIMIT: u32 = 100;

/// The request line that asks for the status document (so do an empty line, end of input,
/// and nothing at all within the daemon's wait).
pub const STATUS_REQUEST: &str = "status";

/// One request line, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `status`, an empty line or nothing: the [`Status`] document.
    Status,
    /// `{"history": QUERY}`: a [`HistoryAnswer`].
    History(HistoryQuery),
}

impl Request {
    /// Parses a request line (surrounding whitespace and the newline are ignored). The
    /// query's limits are not checked here: see [`HistoryQuery::check`].
    pub fn parse(line: &str) -> Result<Self, RequestError> {
        let line = line.trim();
        if line.is_empty() || line == STATUS_REQUEST {
            return Ok(Self::Status);
        }
        serde_json::from_str::<HistoryRequest>(line)
            .map(|r| Self::History(r.history))
            .map_err(|e| RequestError::Malformed(e.to_string()))
    }

    /// The request as a client sends it, without the newline.
    pub fn line(&self) -> String {
        match self {
            Self::Status => STATUS_REQUEST.to_owned(),
            Self::History(query) => {
                let request = HistoryRequest {
                    history: query.clone(),
                };
                // A struct of strings and integers always serialises.
                serde_json::to_string(&request).unwrap_or_default()
            }
        }
    }
}

/// Why a request was refused. The daemon answers with the message as an [`ErrorAnswer`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// Neither `status` nor a well-formed `{"history": QUERY}`; holds the JSON parser's
    /// message.
    #[error("bad request ({0}); send `status` or {{\"history\":{{\"room\":\"NAME\"}}}}")]
    Malformed(String),
    /// A history query asked for more than [`MAX_QUERY`] messages.
    #[error("limit {0} is too large; use at most {MAX_QUERY}")]
    LimitTooLarge(u32),
}

/// The JSON request line `{"history": QUERY}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryRequest {
    /// The query.
    pub history: HistoryQuery,
}

/// A history query (docs/PROTOCOL.md 6). Absent fields do not filter; a client leaves them
/// out of the line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    /// The room; required.
    pub room: String,
    /// Only messages the daemon received at or after this (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
    /// Only messages whose text contains this, ignoring ASCII case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grep: Option<String>,
    /// The newest this many (default [`DEFAULT_QUERY_LIMIT`], at most [`MAX_QUERY`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Only messages stored after this offset (a row id: [`HistoryRecord::offset`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
    /// Only messages stored before this offset (paging back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<u64>,
}

impl HistoryQuery {
    /// A query for the last [`DEFAULT_QUERY_LIMIT`] messages of `room`.
    pub fn new(room: impl Into<String>) -> Self {
        Self {
            room: room.into(),
            since_ms: None,
            grep: None,
            limit: None,
            after: None,
            before: None,
        }
    }

    /// Checks the limits a daemon enforces.
    pub fn check(&self) -> Result<(), RequestError> {
        match self.limit {
            Some(limit) if limit > MAX_QUERY => Err(RequestError::LimitTooLarge(limit)),
            _ => Ok(()),
        }
    }

    /// How many messages the query returns at most: its `limit` or the default, capped at
    /// [`MAX_QUERY`].
    pub fn max_messages(&self) -> u32 {
        self.limit.unwrap_or(DEFAULT_QUERY_LIMIT).min(MAX_QUERY)
    }
}

/// One stored message, as a history answer carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRecord {
    /// The room.
    pub room: String,
    /// `message` or `action` ([`Kind::name`]).
    pub kind: String,
    /// The sender's name.
    pub sender: String,
    /// The text, as received (clients sanitise it before showing it).
    pub text: String,
    /// The sender's instance id (hex), for deduplication; `null` for bare datagrams.
    pub id: Option<String>,
    /// The sender's sequence number; `null` for bare datagrams.
    pub seq: Option<u64>,
    /// The sender's clock, ms since the epoch; `null` when it sent none.
    pub ts_ms: Option<u64>,
    /// When the daemon received it, ms since the epoch.
    pub recv_ms: u64,
    /// Its place in the daemon's history (the row id), for paging and for a web client's
    /// recovery; absent where not stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

impl HistoryRecord {
    /// The record mcchatd stores for a chat datagram (`msg` or `me`) received at `recv_ms`;
    /// `None` for anything else, which history does not keep.
    pub fn decode(data: &[u8], recv_ms: u64) -> Option<Self> {
        let frame = wire::decode(data).ok()?;
        if !matches!(frame.meta.kind, Kind::Message | Kind::Action) {
            return None;
        }
        Some(Self {
            room: frame.room.to_owned(),
            kind: frame.meta.kind.name().to_owned(),
            sender: frame.sender.to_owned(),
            text: frame.text.to_owned(),
            id: frame.meta.instance.map(|i| i.to_string()),
            seq: frame.meta.seq,
            ts_ms: frame.meta.ts_ms,
            recv_ms,
            offset: None,
        })
    }
}

/// The answer to a history query.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryAnswer {
    /// The room asked for.
    pub room: String,
    /// The messages, oldest first.
    pub messages: Vec<HistoryRecord>,
}

/// The answer to a request the daemon refused or could not serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorAnswer {
    /// What was wrong, and what to send instead when that is known.
    pub error: String,
}

impl ErrorAnswer {
    /// The answer saying `error`.
    pub fn new(error: impl Into<String>) -> Self {
        Self {
            error: error.into(),
        }
    }
}

/// What a client may get back for a history query. A document that is neither (a status
/// document, say) does not parse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HistoryReply {
    /// The messages.
    Messages(HistoryAnswer),
    /// The daemon's refusal.
    Error(ErrorAnswer),
}

/// The status document (docs/PROTOCOL.md 4.4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The daemon's version (its package version, e.g. `0.1.0`).
    pub version: String,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
    /// Where the rooms came from, e.g. `/etc/mcchat/rooms.toml (system config)`.
    pub rooms_file: String,
    /// The relay addresses as bound (`ADDR:PORT`; the port the system chose for a `:0`); status answers on TCP on the same ports.
    pub listen: Vec<String>,
    /// Subscriptions at the moment, over all rooms.
    pub subscribers: u64,
    /// The groups the daemon is joined to (`GROUP:PORT`), sorted.
    pub joined_groups: Vec<String>,
    /// Every room the daemon knows (configured, subscribed to or joined), by name.
    pub rooms: Vec<RoomStatus>,
    /// What the daemon has done since it started.
    pub counters: Counters,
    /// The repair cache (docs/PROTOCOL.md 5.1).
    pub repair_cache: RepairCacheStats,
    /// Room history; `null` when history is off.
    pub history: Option<HistoryStatus>,
    /// Web connections now, in a room or not. (Absent from older answers.)
    #[serde(default)]
    pub web_clients: u64,
    /// The bridge to other sites over NATS; absent when the daemon does not bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<SiteStatus>,
}

/// The daemon's link to other sites (docs/PROTOCOL.md 8).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteStatus {
    /// This daemon's site name.
    pub site: String,
    /// Connected to a NATS server now.
    pub connected: bool,
    /// The server it is connected to (or last tried), as `host:port`.
    pub server: Option<String>,
    /// JetStream is on at the server (gaps are fetched from the stream, one daemon per LAN
    /// injects by lease); without it the link is core NATS only.
    pub jetstream: bool,
    /// The rooms bridged now, and those this daemon injects into their group (holds the
    /// lease of).
    pub rooms: Vec<String>,
    pub injecting: Vec<String>,
    /// Messages published to other sites, and received from them (before deduplication).
    pub published: u64,
    pub received: u64,
    /// Received copies dropped as already seen, and as this site's own.
    pub duplicates: u64,
    pub own: u64,
    /// Messages not published because the link was too far behind.
    pub publish_dropped: u64,
    /// Times a room's reader resumed from the stream (after a gap or a lost connection).
    pub resumes: u64,
    /// Messages from NATS refused before the hub (longer than a datagram, or on a subject
    /// not the room's).
    #[serde(default)]
    pub refused: u64,
    /// Times the link was lost, and the last error, if any.
    pub disconnects: u64,
    pub last_error: Option<String>,
}

/// One room the daemon knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomStatus {
    /// The room's name.
    pub name: String,
    /// Its group and port (`GROUP:PORT`).
    pub group: String,
    /// In the rooms file (else its group is derived from the name).
    pub configured: bool,
    /// `keep = true`: the daemon stays joined with no subscribers.
    pub keep: bool,
    /// The daemon is joined to the room's group now.
    pub joined: bool,
    /// Its subscribers, by address.
    pub subscribers: Vec<SubscriberStatus>,
    /// Web clients in the room now. (Absent from older answers.)
    #[serde(default)]
    pub web_clients: u64,
}

/// One subscriber of a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriberStatus {
    /// Its address and port (`ADDR:PORT`): on the local socket only. Over TCP the daemon
    /// leaves it out, so that no one on the network learns whose addresses to forge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    /// The name it subscribed with (untrusted: sanitise before showing).
    pub name: String,
    /// Seconds until its lease runs out unless renewed.
    pub expires_in_secs: u64,
}

/// The relay's counters since start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Datagrams received on the relay port.
    pub received_unicast: u64,
    /// Datagrams received from groups.
    pub received_multicast: u64,
    /// Datagrams sent to a group for a unicast client.
    pub relayed_to_group: u64,
    /// Datagrams sent to subscribers (one per subscriber).
    pub relayed_to_subscribers: u64,
    /// The daemon's own forwards heard back from a group, and ignored.
    pub own_forwards_ignored: u64,
    /// Cookie challenges sent.
    pub challenges: u64,
    /// New subscriptions.
    pub subscribed: u64,
    /// Renewals.
    pub renewed: u64,
    /// Subscriptions ended by the client.
    pub unsubscribed: u64,
    /// Subscriptions whose lease ran out.
    pub expired: u64,
    /// NACKs at the relay port that proved no subscription (no valid cookie): not answered
    /// from the cache, passed on to the room. (Absent from mcchatd 0.1.0's answers.)
    #[serde(default)]
    pub nacks_unproven: u64,
    /// Datagrams relayed at the relay port for sources that proved no address (no valid
    /// cookie), under the budget they share. (Absent from mcchatd 0.1.0's answers.)
    #[serde(default)]
    pub relayed_unproven: u64,
    /// Web connections accepted. (The web counters are absent from older answers.)
    #[serde(default)]
    pub web_connections: u64,
    /// Web connections refused by the allow list.
    #[serde(default)]
    pub web_refused: u64,
    /// Datagrams web clients' engines sent (messages, presence, repairs).
    #[serde(default)]
    pub relayed_from_web: u64,
    /// Frames encoded for web clients (each once for all the clients of its room).
    #[serde(default)]
    pub web_frames: u64,
    /// Messages web clients were told are lost.
    #[serde(default)]
    pub web_gaps: u64,
    /// Drops by reason (docs/PROTOCOL.md 2.5 and 4.3: `bad_room`, `not_allowed`, ...); a
    /// reason that never happened is absent.
    pub dropped: BTreeMap<String, u64>,
}

/// The repair cache's state and counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairCacheStats {
    /// Messages held now.
    pub messages: u64,
    /// Bytes held now, with overhead.
    pub bytes: u64,
    /// Messages evicted for the byte budget before their age ran out.
    pub evicted_for_space: u64,
    /// Repairs sent to a group for a sender that did not.
    pub repairs_to_group: u64,
    /// Repairs sent straight to a `--via` subscriber.
    pub repairs_to_subscribers: u64,
    /// Standby repairs not needed because the sender repaired first.
    pub standby_skipped: u64,
    /// Repairs not sent because a repair budget was spent (PROTOCOL.md 5.1). (Absent from
    /// mcchatd 0.1.0's answers.)
    #[serde(default)]
    pub repairs_over_budget: u64,
}

/// Room history, when it is on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryStatus {
    /// The database file.
    pub path: String,
    /// Messages not stored because the writer was too far behind the relay.
    pub dropped: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The status document as mcchatd 0.1.0 wrote it before these types existed (captured
    /// from its `status_json` with every field set), byte for byte.
    const STATUS_0_1_0: &str = concat!(
        r#"{"version":"0.1.0","uptime_secs":42,"#,
        r#""rooms_file":"/etc/mcchat/rooms.toml (system config)","#,
        r#""listen":["127.0.0.1:5554","[::1]:5554"],"subscribers":1,"#,
        r#""joined_groups":["239.255.77.1:5555"],"#,
        r#""rooms":[{"name":"room1","group":"239.255.77.1:5555","configured":true,"#,
        r#""keep":false,"joined":true,"#,
        r#""subscribers":[{"addr":"127.0.0.1:40000","name":"alice","expires_in_secs":59}]}],"#,
        r#""counters":{"received_unicast":1,"received_multicast":2,"relayed_to_group":3,"#,
        r#""relayed_to_subscribers":4,"own_forwards_ignored":5,"challenges":6,"subscribed":7,"#,
        r#""renewed":8,"unsubscribed":9,"expired":10,"#,
        r#""dropped":{"bad_cookie":11,"not_allowed":12}},"#,
        r#""repair_cache":{"messages":13,"bytes":14,"evicted_for_space":15,"#,
        r#""repairs_to_group":16,"repairs_to_subscribers":17,"standby_skipped":18},"#,
        r#""history":{"path":"/var/lib/mcchat/history.sqlite3","dropped":19}}"#
    );

    fn status() -> Status {
        Status {
            version: "0.1.0".into(),
            uptime_secs: 42,
            rooms_file: "/etc/mcchat/rooms.toml (system config)".into(),
            listen: vec!["127.0.0.1:5554".into(), "[::1]:5554".into()],
            subscribers: 1,
            joined_groups: vec!["239.255.77.1:5555".into()],
            rooms: vec![RoomStatus {
                name: "room1".into(),
                group: "239.255.77.1:5555".into(),
                configured: true,
                keep: false,
                joined: true,
                subscribers: vec![SubscriberStatus {
                    addr: Some("127.0.0.1:40000".into()),
                    name: "alice".into(),
                    expires_in_secs: 59,
                }],
                web_clients: 0,
            }],
            counters: Counters {
                received_unicast: 1,
                received_multicast: 2,
                relayed_to_group: 3,
                relayed_to_subscribers: 4,
                own_forwards_ignored: 5,
                challenges: 6,
                subscribed: 7,
                renewed: 8,
                unsubscribed: 9,
                expired: 10,
                nacks_unproven: 0,
                relayed_unproven: 0,
                // What mcchatd 0.1.0 wrote has none of the web counters.
                web_connections: 0,
                web_refused: 0,
                relayed_from_web: 0,
                web_frames: 0,
                web_gaps: 0,
                dropped: [
                    ("bad_cookie".to_owned(), 11),
                    ("not_allowed".to_owned(), 12),
                ]
                .into(),
            },
            repair_cache: RepairCacheStats {
                messages: 13,
                bytes: 14,
                evicted_for_space: 15,
                repairs_to_group: 16,
                repairs_to_subscribers: 17,
                standby_skipped: 18,
                repairs_over_budget: 0,
            },
            history: Some(HistoryStatus {
                path: "/var/lib/mcchat/history.sqlite3".into(),
                dropped: 19,
            }),
            web_clients: 0,
            site: None,
        }
    }

    fn record() -> HistoryRecord {
        HistoryRecord {
            room: "room1".into(),
            kind: "action".into(),
            sender: "al".into(),
            text: "waves".into(),
            id: Some("00000000000000ff".into()),
            seq: Some(3),
            ts_ms: Some(5),
            recv_ms: 6,
            offset: None,
        }
    }

    fn round_trip<T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(
        value: &T,
    ) {
        let json = serde_json::to_string(value).unwrap();
        let back: T = serde_json::from_str(&json).unwrap();
        assert_eq!(&back, value, "through {json}");
    }

    #[test]
    fn everything_round_trips() {
        let full = status();
        round_trip(&full);
        round_trip(&Status {
            history: None,
            rooms: Vec::new(),
            ..status()
        });
        round_trip(&record());
        round_trip(&HistoryRecord {
            id: None,
            seq: None,
            ts_ms: None,
            ..record()
        });
        let query = HistoryQuery {
            room: "room1".into(),
            since_ms: Some(1_763_900_000_000),
            grep: Some("deploy".into()),
            limit: Some(100),
            after: Some(7),
            before: Some(90),
        };
        round_trip(&query);
        round_trip(&HistoryRequest {
            history: query.clone(),
        });
        let answer = HistoryAnswer {
            room: "room1".into(),
            messages: vec![record(), record()],
        };
        round_trip(&answer);
        round_trip(&HistoryReply::Messages(answer));
        round_trip(&HistoryReply::Error(ErrorAnswer::new("history is off")));
        round_trip(&ErrorAnswer::new("no"));
        for request in [Request::Status, Request::History(query)] {
            assert_eq!(Request::parse(&request.line()), Ok(request));
        }
    }

    #[test]
    fn the_status_document_is_the_one_mcchatd_0_1_0_wrote_plus_new_counters() {
        // What 0.1.0 wrote, with the counters added since at the ends of their objects.
        let now = STATUS_0_1_0
            .replace(
                r#""expired":10,"#,
                r#""expired":10,"nacks_unproven":0,"relayed_unproven":0,"web_connections":0,"web_refused":0,"relayed_from_web":0,"web_frames":0,"web_gaps":0,"#,
            )
            .replace(
                r#""expires_in_secs":59}]}]"#,
                r#""expires_in_secs":59}],"web_clients":0}]"#,
            )
            .replace(
                r#""dropped":19}}"#,
                r#""dropped":19},"web_clients":0}"#,
            )
            .replace(
                r#""standby_skipped":18}"#,
                r#""standby_skipped":18,"repairs_over_budget":0}"#,
            );
        assert_eq!(serde_json::to_string(&status()).unwrap(), now);
        // A new client reads an old daemon's document.
        let read: Status = serde_json::from_str(STATUS_0_1_0).unwrap();
        assert_eq!(read, status());
        let off = STATUS_0_1_0.replace(
            r#"{"path":"/var/lib/mcchat/history.sqlite3","dropped":19}"#,
            "null",
        );
        assert_ne!(off, STATUS_0_1_0);
        let read: Status = serde_json::from_str(&off).unwrap();
        assert_eq!(read.history, None);
    }

    #[test]
    fn history_answers_as_mcchatd_0_1_0_wrote_them_parse() {
        // It built them with serde_json::json!, whose objects sort their keys; key order is
        // not part of the contract.
        let old = concat!(
            r#"{"messages":[{"id":"00000000000000ff","kind":"action","recv_ms":6,"#,
            r#""room":"room1","sender":"al","seq":3,"text":"waves","ts_ms":5},"#,
            r#"{"id":null,"kind":"message","recv_ms":9,"room":"room1","sender":"b","#,
            r#""seq":null,"text":"bare","ts_ms":null}],"room":"room1"}"#
        );
        let answer = HistoryAnswer {
            room: "room1".into(),
            messages: vec![
                record(),
                HistoryRecord {
                    kind: "message".into(),
                    sender: "b".into(),
                    text: "bare".into(),
                    id: None,
                    seq: None,
                    ts_ms: None,
                    recv_ms: 9,
                    ..record()
                },
            ],
        };
        let read: HistoryReply = serde_json::from_str(old).unwrap();
        assert_eq!(read, HistoryReply::Messages(answer.clone()));
        let now: serde_json::Value = serde_json::to_value(&answer).unwrap();
        let then: serde_json::Value = serde_json::from_str(old).unwrap();
        assert_eq!(now, then, "the same names, types and values");
        let error = r#"{"error":"history is off"}"#;
        assert_eq!(
            serde_json::to_string(&ErrorAnswer::new("history is off")).unwrap(),
            error
        );
        let read: HistoryReply = serde_json::from_str(error).unwrap();
        assert_eq!(
            read,
            HistoryReply::Error(ErrorAnswer::new("history is off"))
        );
        assert!(
            serde_json::from_str::<HistoryReply>(STATUS_0_1_0).is_err(),
            "a status document is not an empty history"
        );
    }

    #[test]
    fn answers_tolerate_fields_they_do_not_know() {
        let newer = STATUS_0_1_0
            .replacen('{', r#"{"shiny":{"new":[1,2]},"#, 1)
            .replace(r#""keep":false,"#, r#""keep":false,"topic":"lunch","#)
            .replace(
                r#""expires_in_secs":59"#,
                r#""expires_in_secs":59,"via":true"#,
            )
            .replace(
                r#""standby_skipped":18"#,
                r#""standby_skipped":18,"hits":7"#,
            )
            .replace(r#""dropped":19"#, r#""dropped":19,"failures":0"#);
        assert_eq!(newer.matches("shiny").count(), 1);
        for field in ["topic", "via", "hits", "failures"] {
            assert!(newer.contains(field), "{field} not planted");
        }
        let read: Status = serde_json::from_str(&newer).unwrap();
        assert_eq!(read, status());
        let record = r#"{"messages":[{"room":"r","kind":"message","sender":"s","text":"t","id":null,"seq":null,"ts_ms":null,"recv_ms":1,"edited":true}],"room":"r","more":false}"#;
        let read: HistoryReply = serde_json::from_str(record).unwrap();
        assert!(matches!(read, HistoryReply::Messages(a) if a.messages.len() == 1));
    }

    #[test]
    fn a_status_document_missing_a_field_does_not_parse() {
        let older = STATUS_0_1_0.replace(r#""uptime_secs":42,"#, "");
        assert_ne!(older, STATUS_0_1_0);
        let e = serde_json::from_str::<Status>(&older).unwrap_err();
        assert!(e.to_string().contains("missing field `uptime_secs`"), "{e}");
    }

    #[test]
    fn request_lines_parse_as_the_daemon_has_always_accepted_them() {
        for line in ["", "status", "  status \r\n", "\n"] {
            assert_eq!(Request::parse(line), Ok(Request::Status), "{line:?}");
        }
        assert_eq!(
            Request::parse(r#"{"history":{"room":"room1","limit":20}}"#),
            Ok(Request::History(HistoryQuery {
                limit: Some(20),
                ..HistoryQuery::new("room1")
            }))
        );
        assert_eq!(
            Request::parse(r#"{"history":{"room":"a","since_ms":null,"grep":null,"limit":null}}"#),
            Ok(Request::History(HistoryQuery::new("a"))),
            "null is the same as absent"
        );
        assert_eq!(
            Request::History(HistoryQuery {
                limit: Some(20),
                ..HistoryQuery::new("room1")
            })
            .line(),
            r#"{"history":{"room":"room1","limit":20}}"#,
            "absent fields are left out"
        );
        let refused = [
            (
                r#"{"history":{"room":"a","bogus":1}}"#,
                "unknown field `bogus`",
            ),
            (
                r#"{"history":{"room":"a"},"more":1}"#,
                "unknown field `more`",
            ),
            (r#"{"history":{"room":1}}"#, "invalid type: integer `1`"),
            (r#"{"history":{}}"#, "missing field `room`"),
            ("STATUS", "expected value"),
            (r#""status""#, "invalid type: string"),
        ];
        for (line, why) in refused {
            let e = Request::parse(line).unwrap_err();
            let text = e.to_string();
            assert!(
                text.starts_with("bad request (") && text.contains(why),
                "{line}: {text}"
            );
            assert!(
                text.ends_with(r#"; send `status` or {"history":{"room":"NAME"}}"#),
                "{text}"
            );
        }
    }

    #[test]
    fn query_limits() {
        let mut q = HistoryQuery::new("a");
        assert_eq!((q.check(), q.max_messages()), (Ok(()), DEFAULT_QUERY_LIMIT));
        q.limit = Some(MAX_QUERY);
        assert_eq!((q.check(), q.max_messages()), (Ok(()), MAX_QUERY));
        q.limit = Some(MAX_QUERY + 1);
        assert_eq!(q.check(), Err(RequestError::LimitTooLarge(MAX_QUERY + 1)));
        assert_eq!(
            q.check().unwrap_err().to_string(),
            "limit 10001 is too large; use at most 10000"
        );
    }

    #[test]
    fn only_chat_datagrams_become_records() {
        let r = HistoryRecord::decode(b"@id=00000000000000aa;seq=7;ts=5;kind=me room1|al|waves", 9)
            .unwrap();
        assert_eq!(
            r,
            HistoryRecord {
                room: "room1".into(),
                kind: "action".into(),
                sender: "al".into(),
                text: "waves".into(),
                id: Some("00000000000000aa".into()),
                seq: Some(7),
                ts_ms: Some(5),
                recv_ms: 9,
                offset: None,
            }
        );
        assert_eq!(HistoryRecord::decode(b"room1|al|bare", 1).unwrap().id, None);
        assert_eq!(HistoryRecord::decode(b"@kind=hb room1|al|", 1), None);
        assert_eq!(HistoryRecord::decode(b"not a datagram", 1), None);
    }
}
