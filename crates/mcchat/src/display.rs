//! How events look: one line each, as text (optionally coloured) or as JSON.
//!
//! Every piece of network text goes through [`sanitize::for_terminal`] here, the one place
//! output is formatted, so no front end can forget it.

use anstyle::{AnsiColor, Style};
use jiff::Timestamp;
use jiff::tz::TimeZone;
use mcchat_core::presence::Change;
use mcchat_core::room::fnv1a32;
use mcchat_core::sanitize;
use mcchat_core::wire::Kind;
use serde::Serialize;

use mcchat_core::peer::{Event, Received};

use crate::writer::Line;

/// Colours for sender names, chosen by a hash of the name so each name keeps its colour
/// across messages, runs and machines.
const PALETTE: [AnsiColor; 12] = [
    AnsiColor::Red,
    AnsiColor::Green,
    AnsiColor::Yellow,
    AnsiColor::Blue,
    AnsiColor::Magenta,
    AnsiColor::Cyan,
    AnsiColor::BrightRed,
    AnsiColor::BrightGreen,
    AnsiColor::BrightYellow,
    AnsiColor::BrightBlue,
    AnsiColor::BrightMagenta,
    AnsiColor::BrightCyan,
];

/// The colour a sender name is shown in.
pub(crate) fn name_style(name: &str) -> Style {
    let i = fnv1a32(name.as_bytes()) as usize % PALETTE.len();
    PALETTE[i].on_default().bold()
}

/// `HH:MM:SS` in the local time zone.
pub(crate) fn clock(ts_ms: u64) -> String {
    let ts = i64::try_from(ts_ms)
        .ok()
        .and_then(|ms| Timestamp::from_millisecond(ms).ok())
        .unwrap_or_else(Timestamp::now);
    let tz = TimeZone::try_system().unwrap_or(TimeZone::UTC);
    ts.to_zoned_datetime(tz).strftime("%H:%M:%S").to_string()
}

fn rfc3339(ts_ms: u64) -> String {
    i64::try_from(ts_ms)
        .ok()
        .and_then(|ms| Timestamp::from_millisecond(ms).ok())
        .unwrap_or_else(Timestamp::now)
        .to_string()
}

fn name(sender: &str, color: bool) -> String {
    let safe = sanitize::for_terminal(sender);
    if color {
        let s = name_style(sender);
        format!("{s}{safe}{s:#}")
    } else {
        safe.into_owned()
    }
}

/// A message as one line: `12:04:05 alice: hello` or `12:04:05 * alice waves`.
pub(crate) fn message_line(m: &Received, color: bool) -> String {
    let text = sanitize::for_terminal(&m.text);
    let who = name(&m.sender, color);
    // Arrival time: a sender's clock may be wrong, or lie.
    let time = clock(m.recv_ms);
    match m.kind {
        Kind::Action => format!("{time} * {who} {text}"),
        _ => format!("{time} {who}: {text}"),
    }
}

/// A presence change as one line: `12:04:05 -- alice joined`.
pub(crate) fn presence_line(change: &Change, ts_ms: u64, color: bool) -> String {
    let (who, what) = match change {
        Change::Joined(n) => (n, "joined"),
        Change::Left(n) => (n, "left"),
        Change::TimedOut(n) => (n, "left (no heartbeat)"),
    };
    format!("{} -- {} {what}", clock(ts_ms), name(who, color))
}

/// An event as one text line.
pub(crate) fn event_line(event: &Event, now_ms: u64, color: bool) -> String {
    match event {
        Event::Message(m) => message_line(m, color),
        Event::Presence(c) => presence_line(c, now_ms, color),
        Event::Lost { sender, count } => {
            let what = if *count == 1 { "message" } else { "messages" };
            format!(
                "{} -- {count} {what} from {} could not be repaired and were lost",
                clock(now_ms),
                name(sender, color)
            )
        }
        // The driver acts on these; they are shown only as a diagnostic.
        Event::Subscribed => format!("{} -- subscribed", clock(now_ms)),
        Event::Ended(why) => format!("{} -- {}", clock(now_ms), sanitize::for_terminal(why)),
    }
}

fn skipped_line(count: u64, now_ms: u64) -> String {
    let what = if count == 1 { "message" } else { "messages" };
    format!(
        "{} -- {count} {what} not shown: output too slow",
        clock(now_ms)
    )
}

/// An output line as text.
pub(crate) fn text_line(line: &Line, now_ms: u64, color: bool) -> String {
    match line {
        Line::Event(e) => event_line(e, now_ms, color),
        Line::Skipped(count) => skipped_line(*count, now_ms),
        Line::Text(t) => t.clone(),
    }
}

/// An output line as JSON (`listen --json`); a reply to the user is not for scripts.
pub(crate) fn json_output_line(line: &Line, room: &str, now_ms: u64) -> Option<String> {
    match line {
        Line::Event(e) => Some(json_line(e, room, now_ms)),
        Line::Skipped(count) => Some(json_plain(
            room,
            "",
            &format!("{count} not shown"),
            "skipped",
            now_ms,
        )),
        Line::Text(_) => None,
    }
}

fn json_plain(room: &str, sender: &str, text: &str, kind: &'static str, now_ms: u64) -> String {
    let line = JsonLine {
        room,
        sender,
        text,
        ts: rfc3339(now_ms),
        from: None,
        kind,
        id: None,
        seq: None,
        repair: false,
    };
    escape_for_terminal(&serde_json::to_string(&line).unwrap_or_default())
}

fn lost_text(count: u64) -> String {
    format!("{count} lost")
}

/// One `listen --json` object.
#[derive(Debug, Serialize)]
struct JsonLine<'a> {
    room: &'a str,
    sender: &'a str,
    text: &'a str,
    ts: String,
    from: Option<String>,
    kind: &'static str,
    id: Option<String>,
    seq: Option<u64>,
    /// Arrived as a repair (a retransmission after a loss).
    repair: bool,
}

/// An event as one JSON line (no trailing newline). JSON escapes control characters itself,
/// so text is not sanitised here: scripts get it exactly.
pub(crate) fn json_line(event: &Event, room: &str, now_ms: u64) -> String {
    let line = match event {
        Event::Message(m) => JsonLine {
            room: &m.room,
            sender: &m.sender,
            text: &m.text,
            ts: rfc3339(m.ts_ms),
            from: m.from.map(|a| a.to_string()),
            kind: m.kind.name(),
            id: m.instance.map(|i| i.to_string()),
            seq: m.seq,
            repair: m.repair,
        },
        Event::Lost { sender, count } => {
            return json_plain(room, sender, &lost_text(*count), "lost", now_ms);
        }
        Event::Presence(c) => {
            let (sender, kind) = match c {
                Change::Joined(n) => (n.as_str(), "join"),
                Change::Left(n) | Change::TimedOut(n) => (n.as_str(), "leave"),
            };
            return json_plain(room, sender, "", kind, now_ms);
        }
        Event::Subscribed => return json_plain(room, "", "", "subscribed", now_ms),
        Event::Ended(why) => return json_plain(room, "", why, "ended", now_ms),
    };
    // Serialising a struct of strings and integers cannot fail.
    let json = serde_json::to_string(&line).unwrap_or_default();
    escape_for_terminal(&json)
}

/// JSON escapes only characters below U+0020; DEL, the C1 controls (CSI is U+009B), the
/// bidirectional controls, the invisible and format characters and U+2028/U+2029 (which
/// end a line in JavaScript) would still reach a terminal or a script raw. Written as `\uXXXX` they are the
/// same JSON string, and harmless.
fn escape_for_terminal(json: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if sanitize::for_terminal(c.encode_utf8(&mut [0; 4])).len() != c.len_utf8() {
            // JSON's `\u` takes UTF-16 units: a character beyond the BMP (the tag
            // characters) is written as its surrogate pair. Writing to a String cannot fail.
            for unit in c.encode_utf16(&mut [0; 2]) {
                let _ = write!(out, "\\u{unit:04x}");
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: Kind, sender: &str, text: &str) -> Received {
        Received {
            kind,
            room: "room1".into(),
            sender: sender.into(),
            text: text.into(),
            ts_ms: 1_763_900_000_123,
            recv_ms: 1_763_900_000_123,
            from: Some("192.0.2.1:5555".parse().unwrap()),
            instance: None,
            seq: None,
            repair: false,
        }
    }

    #[test]
    fn lines_are_sanitised() {
        let line = message_line(&msg(Kind::Message, "bob", "\x1b[31mred\x07"), false);
        assert!(line.ends_with(" bob: \\x1b[31mred\\x07"), "{line}");
        let line = message_line(&msg(Kind::Action, "bob", "waves"), false);
        assert!(line.ends_with(" * bob waves"), "{line}");
    }

    #[test]
    fn colours_are_stable_per_name() {
        assert_eq!(name_style("alice"), name_style("alice"));
        let line = message_line(&msg(Kind::Message, "alice", "hi"), true);
        assert!(
            line.contains(&format!("{}alice", name_style("alice"))),
            "{line:?}"
        );
    }

    #[test]
    fn json_has_the_documented_keys() {
        let line = json_line(
            &Event::Message(msg(Kind::Message, "bob", "a\"b")),
            "room1",
            0,
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["text"], "a\"b");
        assert_eq!(v["ts"], "2025-11-23T12:13:20.123Z");
        assert_eq!(v["from"], "192.0.2.1:5555");
        assert_eq!(v["kind"], "message");
        assert!(v["seq"].is_null());
        let line = json_line(
            &Event::Message(msg(Kind::Message, "b", "\u{9b}2J\u{202e}x\x7f")),
            "r",
            0,
        );
        assert!(line.contains(r#""text":"\u009b2J\u202ex\u007f""#), "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["text"], "\u{9b}2J\u{202e}x\x7f");
        let text = "a\u{2028}b\u{2029}c\u{200b}\u{e0041}";
        let line = json_line(
            &Event::Message(msg(Kind::Message, "al\u{200b}ice", text)),
            "r",
            0,
        );
        assert!(
            line.contains(r#""text":"a\u2028b\u2029c\u200b\udb40\udc41""#),
            "{line}"
        );
        assert!(line.contains(r#""sender":"al\u200bice""#), "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["text"], text, "the same string, escaped");
    }

    #[test]
    fn skipped_lines_are_reported_in_both_forms() {
        let line = text_line(&Line::Skipped(37), 0, false);
        assert!(
            line.ends_with(" -- 37 messages not shown: output too slow"),
            "{line}"
        );
        let json = json_output_line(&Line::Skipped(37), "room1", 0).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["kind"], "skipped");
        assert_eq!(v["text"], "37 not shown");
        assert!(json_output_line(&Line::Text("in room1: a".into()), "room1", 0).is_none());
    }
}
