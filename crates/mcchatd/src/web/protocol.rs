//! The WebSocket protocol (docs/PROTOCOL.md 7), with no I/O: what a client's text frame
//! asks for, and the JSON (and text-mode) frames the daemon sends. Frames for a room are
//! encoded once here and shared by every connection in it.

use axum::extract::ws::Utf8Bytes;
use mcchat_core::control::HistoryRecord;
use mcchat_core::wire::{InstanceId, Kind};
use serde::{Deserialize, Serialize};

use crate::hub::web::Joined;

/// Most bytes in one client frame.
pub(crate) const MAX_FRAME: usize = 16 * 1024;
/// Scrollback a join gets unless it asks for another amount, and the most it may ask.
pub(crate) const SCROLLBACK: u32 = 100;
pub(crate) const MAX_SCROLLBACK: u32 = 500;
/// Most messages a `since` recovers; a page further behind gets a fresh scrollback.
pub(crate) const MAX_RECOVER: u32 = 5000;

/// One frame for web clients: its JSON, and what text mode sends (`None`: nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WebFrame {
    /// Shared bytes: every connection's copy is a reference count, not a copy.
    pub(crate) json: Utf8Bytes,
    pub(crate) text: Option<Utf8Bytes>,
}

/// Where a page was: the `joined` epoch and the last offset it saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub(crate) struct Since {
    pub(crate) epoch: u64,
    pub(crate) offset: u64,
}

/// What a client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Request {
    Join {
        room: String,
        name: Option<String>,
        since: Option<Since>,
        scrollback: Option<u32>,
    },
    Chat {
        text: String,
        action: bool,
    },
    Leave,
    History {
        before: Option<u64>,
        limit: Option<u32>,
    },
    Ping,
}

/// Why a client frame was not understood; the code goes into its `error` frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BadRequest {
    #[error("not JSON: {0}")]
    Json(String),
    #[error("unknown type {0:?}: use join, chat (or message), leave or history")]
    UnknownType(String),
    #[error("{0}")]
    Missing(&'static str),
}

impl BadRequest {
    pub(crate) fn code(&self) -> &'static str {
        match self {
            Self::Json(_) => "bad_json",
            Self::UnknownType(_) => "unknown_type",
            Self::Missing(_) => "bad_request",
        }
    }
}

/// Both seed shapes' fields, and ours.
#[derive(Debug, Deserialize)]
struct Raw {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    room: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    action: bool,
    #[serde(default)]
    since: Option<Since>,
    #[serde(default)]
    history: Option<u32>,
    #[serde(default)]
    before: Option<u64>,
    #[serde(default)]
    limit: Option<u32>,
    #[serde(default)]
    payload: Option<RawPayload>,
}

#[derive(Debug, Default, Deserialize)]
struct RawPayload {
    #[serde(default, rename = "roomId")]
    room_id: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

/// Parses one client text frame.
pub(crate) fn parse(frame: &str) -> Result<Request, BadRequest> {
    let raw: Raw = serde_json::from_str(frame).map_err(|e| BadRequest::Json(e.to_string()))?;
    let payload = raw.payload.unwrap_or_default();
    match raw.kind.as_str() {
        "join" => {
            let room = raw.room.or(payload.room_id).ok_or(BadRequest::Missing(
                "join needs a room: {\"type\":\"join\",\"room\":\"room1\"}",
            ))?;
            Ok(Request::Join {
                room,
                name: raw.name.or(payload.name),
                since: raw.since,
                scrollback: raw.history,
            })
        }
        "chat" | "message" => {
            let text = raw
                .message
                .or(raw.text)
                .or(payload.message)
                .ok_or(BadRequest::Missing(
                    "chat needs a message: {\"type\":\"message\",\"message\":\"hi\"}",
                ))?;
            Ok(Request::Chat {
                text,
                action: raw.action,
            })
        }
        "leave" => Ok(Request::Leave),
        "history" => Ok(Request::History {
            before: raw.before,
            limit: raw.limit,
        }),
        "ping" => Ok(Request::Ping),
        other => Err(BadRequest::UnknownType(truncate(other, 64).to_owned())),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// A message as a chat frame describes it.
pub(crate) struct ChatFrame<'a> {
    pub(crate) room: &'a str,
    pub(crate) sender: &'a str,
    pub(crate) text: &'a str,
    pub(crate) action: bool,
    pub(crate) id: Option<(InstanceId, u64)>,
    pub(crate) ts: u64,
    /// The room's watermark after it (or, from history, its own offset).
    pub(crate) offset: u64,
    pub(crate) history: bool,
}

#[derive(Serialize)]
struct ChatJson<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    room: &'a str,
    sender: &'a str,
    text: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    action: bool,
    id: Option<String>,
    ts: u64,
    offset: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    history: bool,
    /// The first seed's shape, so its clients read our frames unchanged.
    payload: SeedPayload<'a>,
}

#[derive(Serialize)]
struct SeedPayload<'a> {
    #[serde(rename = "roomId")]
    room_id: &'a str,
    from: &'a str,
    message: &'a str,
}

fn chat_json<'a>(c: &ChatFrame<'a>) -> ChatJson<'a> {
    ChatJson {
        kind: "chat",
        room: c.room,
        sender: c.sender,
        text: c.text,
        action: c.action,
        id: c.id.map(|(i, s)| format!("{i}:{s}")),
        ts: c.ts,
        offset: c.offset,
        history: c.history,
        payload: SeedPayload {
            room_id: c.room,
            from: c.sender,
            message: c.text,
        },
    }
}

fn to_json(v: &impl Serialize) -> String {
    // Serialising these plain structs cannot fail.
    serde_json::to_string(v).unwrap_or_else(|_| "{}".to_owned())
}

pub(crate) fn chat_frame(c: &ChatFrame<'_>) -> WebFrame {
    let text = if c.action {
        format!("* {} {}", c.sender, c.text)
    } else {
        format!("{}: {}", c.sender, c.text)
    };
    WebFrame {
        json: to_json(&chat_json(c)).into(),
        text: Some(text.into()),
    }
}

/// Who came and went since the last presence frame (oldest first; never empty), and who is
/// here now. `name` and `event` are the last change's, for clients that read one.
pub(crate) fn presence_frame(
    room: &str,
    changes: &[(String, &'static str)],
    members: &[String],
) -> WebFrame {
    #[derive(Serialize)]
    struct C<'a> {
        name: &'a str,
        event: &'a str,
    }
    #[derive(Serialize)]
    struct P<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        room: &'a str,
        name: &'a str,
        event: &'a str,
        changes: Vec<C<'a>>,
        members: &'a [String],
    }
    let (name, event) = changes.last().map_or(("", ""), |(n, e)| (n.as_str(), *e));
    WebFrame {
        json: to_json(&P {
            kind: "presence",
            room,
            name,
            event,
            changes: changes
                .iter()
                .map(|(name, event)| C { name, event })
                .collect(),
            members,
        })
        .into(),
        text: None,
    }
}

pub(crate) fn gap_frame(room: &str, sender: &str, count: u64) -> WebFrame {
    #[derive(Serialize)]
    struct G<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        room: &'a str,
        sender: &'a str,
        count: u64,
    }
    WebFrame {
        json: to_json(&G {
            kind: "gap",
            room,
            sender,
            count,
        })
        .into(),
        text: None,
    }
}

pub(crate) fn error_json(code: &str, message: &str) -> String {
    #[derive(Serialize)]
    struct E<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        code: &'a str,
        message: &'a str,
    }
    to_json(&E {
        kind: "error",
        code,
        message,
    })
}

pub(crate) fn joined_json(j: &Joined, recovered: bool) -> String {
    #[derive(Serialize)]
    struct J<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        room: &'a str,
        name: &'a str,
        id: &'a str,
        epoch: u64,
        offset: u64,
        members: &'a [String],
        recovered: bool,
        history: bool,
        payload: JP<'a>,
    }
    #[derive(Serialize)]
    struct JP<'a> {
        #[serde(rename = "roomId")]
        room_id: &'a str,
        id: &'a str,
    }
    to_json(&J {
        kind: "joined",
        room: j.room.as_str(),
        name: &j.name,
        id: &j.id,
        epoch: j.epoch,
        offset: j.offset,
        members: &j.members,
        recovered,
        history: j.history,
        payload: JP {
            room_id: j.room.as_str(),
            id: &j.id,
        },
    })
}

/// A stored message as a chat frame (`history: true`, its own offset).
pub(crate) fn record_frame(r: &HistoryRecord) -> WebFrame {
    chat_frame(&ChatFrame::stored(r))
}

impl<'a> ChatFrame<'a> {
    /// A stored message (`history: true`, its own offset).
    fn stored(r: &'a HistoryRecord) -> Self {
        Self {
            room: &r.room,
            sender: &r.sender,
            text: &r.text,
            action: r.kind == Kind::Action.name(),
            id: r.id.as_deref().and_then(InstanceId::parse).zip(r.seq),
            ts: r.ts_ms.unwrap_or(r.recv_ms),
            offset: r.offset.unwrap_or(0),
            history: true,
        }
    }
}

/// The answer to a `history` request: older messages, oldest first.
pub(crate) fn history_json(room: &str, records: &[HistoryRecord], more: bool) -> String {
    #[derive(Serialize)]
    struct H<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        room: &'a str,
        messages: Vec<ChatJson<'a>>,
        more: bool,
    }
    let frames: Vec<ChatFrame<'_>> = records.iter().map(ChatFrame::stored).collect();
    to_json(&H {
        kind: "history",
        room,
        messages: frames.iter().map(chat_json).collect(),
        more,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_seed_shapes_and_ours_parse() {
        assert_eq!(
            parse(r#"{"type":"join","payload":{"roomId":"red"}}"#),
            Ok(Request::Join {
                room: "red".into(),
                name: None,
                since: None,
                scrollback: None
            })
        );
        assert_eq!(
            parse(r#"{"type":"chat","payload":{"message":"hi"}}"#),
            Ok(Request::Chat {
                text: "hi".into(),
                action: false
            })
        );
        assert_eq!(
            parse(r#"{"type":"join","room":"room1"}"#),
            Ok(Request::Join {
                room: "room1".into(),
                name: None,
                since: None,
                scrollback: None
            })
        );
        assert_eq!(
            parse(r#"{"type":"message","message":"hi"}"#),
            Ok(Request::Chat {
                text: "hi".into(),
                action: false
            })
        );
        assert_eq!(
            parse(
                r#"{"type":"join","room":"room1","name":"ann","since":{"epoch":7,"offset":9},"history":20}"#
            ),
            Ok(Request::Join {
                room: "room1".into(),
                name: Some("ann".into()),
                since: Some(Since {
                    epoch: 7,
                    offset: 9
                }),
                scrollback: Some(20)
            })
        );
        assert_eq!(parse(r#"{"type":"leave"}"#), Ok(Request::Leave));
        assert_eq!(
            parse(r#"{"type":"history","before":40,"limit":10}"#),
            Ok(Request::History {
                before: Some(40),
                limit: Some(10)
            })
        );
    }

    #[test]
    fn bad_frames_get_a_code_and_a_hint() {
        let code = |f: &str| parse(f).unwrap_err().code();
        assert_eq!(code("not json"), "bad_json");
        assert_eq!(code(r#"{"room":"x"}"#), "bad_json");
        assert_eq!(code(r#"{"type":"join","room":5}"#), "bad_json");
        assert_eq!(code(r#"{"type":"dance"}"#), "unknown_type");
        assert_eq!(code(r#"{"type":"join"}"#), "bad_request");
        assert_eq!(code(r#"{"type":"chat"}"#), "bad_request");
        let long = format!(r#"{{"type":"{}"}}"#, "x".repeat(10_000));
        assert!(parse(&long).unwrap_err().to_string().len() < 200);
    }

    #[test]
    fn a_chat_frame_has_our_fields_the_seed_shape_and_a_text_line() {
        let f = chat_frame(&ChatFrame {
            room: "room1",
            sender: "ann",
            text: "<b>hi</b>",
            action: false,
            id: Some((InstanceId(0xab), 3)),
            ts: 5,
            offset: 9,
            history: false,
        });
        let v: serde_json::Value = serde_json::from_str(f.json.as_str()).unwrap();
        assert_eq!(v["type"], "chat");
        assert_eq!(v["id"], "00000000000000ab:3");
        assert_eq!(v["offset"], 9);
        assert_eq!(v["payload"]["from"], "ann");
        assert_eq!(v["payload"]["message"], "<b>hi</b>");
        assert_eq!(
            f.text.as_ref().map(Utf8Bytes::as_str),
            Some("ann: <b>hi</b>")
        );
    }
}
