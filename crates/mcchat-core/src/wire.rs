//! The datagram format: `[@tags ]room|sender|text`, one UTF-8 datagram per message.
//!
//! This module is the whole contract of `docs/PROTOCOL.md` in code. It is pure: `decode` maps a
//! byte slice to a borrowed [`Frame`] or to the [`DropReason`] the caller counts, and `encode`
//! writes into a caller-supplied buffer. Nothing here allocates on the decode path except to
//! unescape tag values that actually contain escapes.
//!
//! The tag prefix follows IRCv3 message tags (<https://ircv3.net/specs/extensions/message-tags>):
//! `@key=value;key2=value2 ` with `\:` `\s` `\\` `\r` `\n` escapes. Unknown tags are carried
//! and ignored, so later protocol versions can add tags without breaking older peers.

use std::borrow::Cow;
use std::fmt::{self, Write as _};

use crate::room::RoomName;
use crate::tags;

/// Largest datagram mcchat sends or accepts. 1200 bytes fits every path with an IPv6 minimum
/// MTU of 1280 after the IPv6 and UDP headers, so a message is never IP-fragmented.
pub const MAX_DATAGRAM: usize = 1200;

/// Most characters (Unicode scalar values) in a sender name.
pub const MAX_SENDER_CHARS: usize = 32;

/// What a message is for; sent in the `kind` tag. A bare datagram is a [`Kind::Message`].
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Chat text (`kind=msg`).
    Message,
    /// An action, shown as `* alice waves` (`kind=me`).
    Action,
    /// The sender entered the room (`kind=join`).
    Join,
    /// The sender left the room (`kind=leave`).
    Leave,
    /// The sender is still in the room (`kind=hb`).
    Heartbeat,
    /// A receiver asks for messages it missed: `for` (an instance id) and `seqs` (ranges
    /// such as `5-7,9`) say which (`kind=nack`).
    Nack,
    /// Relay control, client to daemon: subscribe to the room, or renew (`kind=sub`).
    Subscribe,
    /// Relay control, client to daemon: end the subscription (`kind=unsub`).
    Unsubscribe,
    /// Relay control, daemon to client: prove you can receive at your address by sending
    /// this `cookie` back (`kind=cookie`).
    Challenge,
    /// Relay control, daemon to client: the subscription is active for `lease` seconds
    /// (`kind=subok`).
    Subscribed,
    /// Relay control, daemon to client: the subscription ended (room removed, daemon
    /// stopping); the text says why (`kind=closed`).
    Closed,
    /// A kind this version does not know: kept out of the chat, never an error.
    Unknown,
}

impl Kind {
    /// The value of the `kind` tag; `None` for [`Kind::Unknown`], which is never sent.
    pub fn tag_value(self) -> Option<&'static str> {
        Some(match self {
            Self::Message => "msg",
            Self::Action => "me",
            Self::Join => "join",
            Self::Leave => "leave",
            Self::Heartbeat => "hb",
            Self::Nack => "nack",
            Self::Subscribe => "sub",
            Self::Unsubscribe => "unsub",
            Self::Challenge => "cookie",
            Self::Subscribed => "subok",
            Self::Closed => "closed",
            Self::Unknown => return None,
        })
    }

    /// Whether this is relay control between a client and mcchatd, which never goes to a
    /// multicast group.
    pub fn is_relay_control(self) -> bool {
        matches!(
            self,
            Self::Subscribe | Self::Unsubscribe | Self::Challenge | Self::Subscribed | Self::Closed
        )
    }

    fn from_tag_value(value: &str) -> Self {
        match value {
            "msg" => Self::Message,
            "me" => Self::Action,
            "join" => Self::Join,
            "leave" => Self::Leave,
            "hb" => Self::Heartbeat,
            "nack" => Self::Nack,
            "sub" => Self::Subscribe,
            "unsub" => Self::Unsubscribe,
            "cookie" => Self::Challenge,
            "subok" => Self::Subscribed,
            "closed" => Self::Closed,
            _ => Self::Unknown,
        }
    }

    /// Whether the text of this kind must be non-empty.
    fn needs_text(self) -> bool {
        matches!(self, Self::Message | Self::Action)
    }

    /// A stable lowercase name for logs and JSON output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Message => "message",
            Self::Action => "action",
            Self::Join => "join",
            Self::Leave => "leave",
            Self::Heartbeat => "heartbeat",
            Self::Nack => "nack",
            Self::Subscribe => "subscribe",
            Self::Unsubscribe => "unsubscribe",
            Self::Challenge => "challenge",
            Self::Subscribed => "subscribed",
            Self::Closed => "closed",
            Self::Unknown => "unknown",
        }
    }
}

/// A random identifier a peer picks at start-up, so receivers can tell one run of a sender from
/// the next (its sequence numbers restart) and recognise their own looped-back datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceId(pub u64);

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl InstanceId {
    /// A fresh random id from the operating system's generator.
    pub fn random() -> std::io::Result<Self> {
        getrandom::u64().map(Self).map_err(std::io::Error::other)
    }

    /// Parses exactly 16 lowercase or uppercase hex digits (as in the `id` and `for` tags).
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u64::from_str_radix(s, 16).ok().map(Self)
    }
}

/// Milliseconds since the Unix epoch, now: the clock of the `ts` tag (and of the times
/// mcchatd stores in history).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The typed view of the tags mcchat itself defines. All optional: a bare datagram has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// `id`: the sender's instance.
    pub instance: Option<InstanceId>,
    /// `seq`: the sender instance's sequence number, starting at 1.
    pub seq: Option<u64>,
    /// `ts`: when it was sent, in milliseconds since the Unix epoch.
    pub ts_ms: Option<u64>,
    /// `kind`; [`Kind::Message`] when absent.
    pub kind: Kind,
}

impl Default for Meta {
    fn default() -> Self {
        Self {
            instance: None,
            seq: None,
            ts_ms: None,
            kind: Kind::Message,
        }
    }
}

/// Why a datagram was not accepted. Every variant is an expected outcome that the receive loop
/// counts and skips, never an error that stops it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum DropReason {
    /// Longer than [`MAX_DATAGRAM`].
    Oversize,
    /// Not valid UTF-8.
    NotUtf8,
    /// The tag prefix is not well formed, or a known tag has a bad value.
    BadTags,
    /// Fewer than two `|` separators.
    MissingField,
    /// The room name breaks the room-name rules.
    BadRoom,
    /// The sender name is empty, too long, or has a control character.
    BadSender,
    /// A message or action with no text.
    EmptyText,
    /// A well-formed datagram naming another room than the group it arrived on.
    WrongRoom,
}

impl DropReason {
    /// Every reason, in a fixed order, for counters and reports.
    pub const ALL: [Self; 8] = [
        Self::Oversize,
        Self::NotUtf8,
        Self::BadTags,
        Self::MissingField,
        Self::BadRoom,
        Self::BadSender,
        Self::EmptyText,
        Self::WrongRoom,
    ];

    /// A short snake_case name for logs, counters and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Oversize => "oversize",
            Self::NotUtf8 => "not_utf8",
            Self::BadTags => "bad_tags",
            Self::MissingField => "missing_field",
            Self::BadRoom => "bad_room",
            Self::BadSender => "bad_sender",
            Self::EmptyText => "empty_text",
            Self::WrongRoom => "wrong_room",
        }
    }

    fn index(self) -> usize {
        // The position in ALL; ALL lists every variant, so this always finds one.
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Counts of dropped datagrams by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DropCounts([u64; DropReason::ALL.len()]);

impl DropCounts {
    /// Counts one drop and returns the new count for that reason.
    pub fn add(&mut self, reason: DropReason) -> u64 {
        let slot = &mut self.0[reason.index()];
        *slot = slot.saturating_add(1);
        *slot
    }

    /// The count for one reason.
    pub fn get(&self, reason: DropReason) -> u64 {
        self.0[reason.index()]
    }

    /// All drops.
    pub fn total(&self) -> u64 {
        self.0.iter().fold(0u64, |a, b| a.saturating_add(*b))
    }

    /// `(reason, count)` for every reason with a non-zero count.
    pub fn nonzero(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL
            .iter()
            .map(|r| (*r, self.get(*r)))
            .filter(|(_, n)| *n > 0)
    }
}

/// The raw, already validated tag section of a frame (without `@` and the trailing space).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tags<'a>(&'a str);

impl<'a> Tags<'a> {
    /// The raw text, escapes included.
    pub fn as_raw(&self) -> &'a str {
        self.0
    }

    /// Every `(key, value)` in order; a tag without `=` has the empty value. Duplicate keys are
    /// all yielded; [`Tags::get`] takes the last, as IRCv3 says.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, Cow<'a, str>)> + 'a {
        let raw = self.0;
        raw.split(';').filter(|t| !t.is_empty()).map(|tag| {
            let (key, value) = tag.split_once('=').unwrap_or((tag, ""));
            (key, unescape(value))
        })
    }

    /// The value of the last tag named `key`.
    pub fn get(&self, key: &str) -> Option<Cow<'a, str>> {
        self.iter()
            .filter(|(k, _)| *k == key)
            .last()
            .map(|(_, v)| v)
    }
}

/// One decoded datagram, borrowing from the received bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The typed mcchat tags.
    pub meta: Meta,
    /// All tags, for extensions this version does not interpret.
    pub tags: Tags<'a>,
    /// The room name, already checked against the room-name rules.
    pub room: &'a str,
    /// The sender name, already checked against the sender rules.
    pub sender: &'a str,
    /// The text, with one trailing line ending removed. May contain `|` and, since it comes
    /// from the network, anything else: sanitise it before it reaches a terminal.
    pub text: &'a str,
}

impl Frame<'_> {
    /// Accepts the frame only if it names `room`: the check that a datagram belongs to the
    /// group it arrived on (two rooms can share a group when their ports differ or their
    /// derived groups collide).
    pub fn check_room(&self, room: &str) -> Result<(), DropReason> {
        if self.room == room {
            Ok(())
        } else {
            Err(DropReason::WrongRoom)
        }
    }
}

/// Decodes one datagram. Never panics, whatever the bytes.
pub fn decode(bytes: &[u8]) -> Result<Frame<'_>, DropReason> {
    if bytes.len() > MAX_DATAGRAM {
        return Err(DropReason::Oversize);
    }
    let s = std::str::from_utf8(bytes).map_err(|_| DropReason::NotUtf8)?;
    // `echo 'room1|bob|hi' | socat ...` sends the newline too: one line ending is framing.
    let s = s
        .strip_suffix("\r\n")
        .or_else(|| s.strip_suffix('\n'))
        .unwrap_or(s);

    let (tags, body) = match s.strip_prefix('@') {
        Some(rest) => {
            let (raw, body) = rest.split_once(' ').ok_or(DropReason::BadTags)?;
            if raw.is_empty() {
                return Err(DropReason::BadTags);
            }
            (Tags(raw), body)
        }
        None => (Tags::default(), s),
    };
    let meta = parse_meta(tags)?;

    let mut parts = body.splitn(3, '|');
    let (Some(room), Some(sender), Some(text)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(DropReason::MissingField);
    };
    if !RoomName::is_valid(room) {
        return Err(DropReason::BadRoom);
    }
    if !is_valid_sender(sender) {
        return Err(DropReason::BadSender);
    }
    if text.is_empty() && meta.kind.needs_text() {
        return Err(DropReason::EmptyText);
    }
    Ok(Frame {
        meta,
        tags,
        room,
        sender,
        text,
    })
}

fn parse_meta(tags: Tags<'_>) -> Result<Meta, DropReason> {
    let mut meta = Meta::default();
    if tags.0.is_empty() {
        return Ok(meta);
    }
    for tag in tags.0.split(';') {
        let (key, value) = tag.split_once('=').unwrap_or((tag, ""));
        if !is_valid_key(key) {
            return Err(DropReason::BadTags);
        }
        // mcchat's own values never contain escapes, so a known tag is read raw: an escaped
        // value there is as malformed as a non-number.
        match key {
            "id" => meta.instance = Some(InstanceId::parse(value).ok_or(DropReason::BadTags)?),
            "seq" => meta.seq = Some(parse_decimal(value)?),
            "ts" => meta.ts_ms = Some(parse_decimal(value)?),
            "kind" => meta.kind = Kind::from_tag_value(value),
            _ => {}
        }
    }
    Ok(meta)
}

fn parse_decimal(value: &str) -> Result<u64, DropReason> {
    if value.is_empty() || value.len() > 20 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(DropReason::BadTags);
    }
    value.parse().map_err(|_| DropReason::BadTags)
}

/// IRCv3 keys: an optional `+` (client-only tag), an optional vendor (a host name) and `/`,
/// then letters, digits and `-`.
fn is_valid_key(key: &str) -> bool {
    let key = key.strip_prefix('+').unwrap_or(key);
    let name = match key.rsplit_once('/') {
        Some((vendor, name)) => {
            if vendor.is_empty()
                || !vendor
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            {
                return false;
            }
            name
        }
        None => key,
    };
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The sender rules: 1 to [`MAX_SENDER_CHARS`] characters, no `|`, no control characters.
pub fn is_valid_sender(sender: &str) -> bool {
    let mut n = 0;
    for c in sender.chars() {
        n += 1;
        if n > MAX_SENDER_CHARS || c == '|' || c.is_control() {
            return false;
        }
    }
    n > 0
}

fn unescape(value: &str) -> Cow<'_, str> {
    if !value.contains('\\') {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some(':') => out.push(';'),
            Some('s') => out.push(' '),
            Some('\\') => out.push('\\'),
            Some('r') => out.push('\r'),
            Some('n') => out.push('\n'),
            Some(other) => out.push(other),
            // A trailing lone backslash is dropped (IRCv3).
            None => {}
        }
    }
    Cow::Owned(out)
}

fn escape_into(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            ';' => out.push_str("\\:"),
            ' ' => out.push_str("\\s"),
            '\\' => out.push_str("\\\\"),
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Why a message could not be encoded. Raised before anything is sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The datagram would exceed [`MAX_DATAGRAM`].
    #[error("message is {len} bytes, more than the {max}-byte datagram limit")]
    TooLong {
        /// The encoded length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The room name breaks the rules.
    #[error("invalid room name {0:?}")]
    BadRoom(String),
    /// The sender name breaks the rules.
    #[error(
        "invalid sender name {0:?}: use 1-{MAX_SENDER_CHARS} characters, no '|' or control characters"
    )]
    BadSender(String),
    /// A message or action with no text.
    #[error("message text is empty")]
    EmptyText,
    /// An extension tag key that is not an IRCv3 key.
    #[error("invalid tag key {0:?}")]
    BadTagKey(String),
}

/// What mcchat writes in front of `room|sender|text`: its own tags plus extension tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header<'a> {
    /// The typed tags; `None` fields are left out.
    pub meta: Meta,
    /// Further `(key, value)` tags, escaped on the way out.
    pub extra: &'a [(&'a str, &'a str)],
}

/// Encodes one datagram into `out` (cleared first). Fails without sending anything if the
/// result would break a rule a receiver enforces.
pub fn encode(
    header: &Header<'_>,
    room: &str,
    sender: &str,
    text: &str,
    out: &mut String,
) -> Result<(), EncodeError> {
    out.clear();
    if !RoomName::is_valid(room) {
        return Err(EncodeError::BadRoom(room.to_owned()));
    }
    if !is_valid_sender(sender) {
        return Err(EncodeError::BadSender(sender.to_owned()));
    }
    if text.is_empty() && header.meta.kind.needs_text() {
        return Err(EncodeError::EmptyText);
    }
    write_tags(header, out)?;
    out.push_str(room);
    out.push('|');
    out.push_str(sender);
    out.push('|');
    out.push_str(text);
    // A text that itself ends in a line ending would lose it to the framing rule in `decode`;
    // one more newline keeps the text exactly as given.
    if text.ends_with('\n') {
        out.push('\n');
    }
    if out.len() > MAX_DATAGRAM {
        return Err(EncodeError::TooLong {
            len: out.len(),
            max: MAX_DATAGRAM,
        });
    }
    Ok(())
}

fn write_tags(header: &Header<'_>, out: &mut String) -> Result<(), EncodeError> {
    let meta = &header.meta;
    let mut first = true;
    let mut sep = |out: &mut String| {
        out.push(if first { '@' } else { ';' });
        first = false;
    };
    // Hop-by-hop tags precede end-to-end ones (PROTOCOL.md 2.8), in the order given.
    for (key, value) in header.extra.iter().filter(|(k, _)| tags::is_hop_by_hop(k)) {
        sep(out);
        write_tag(key, value, out);
    }
    // `write!` into a String cannot fail; the results are ignored for that reason.
    if let Some(id) = meta.instance {
        sep(out);
        let _ = write!(out, "id={id}");
    }
    if let Some(seq) = meta.seq {
        sep(out);
        let _ = write!(out, "seq={seq}");
    }
    if let Some(ts) = meta.ts_ms {
        sep(out);
        let _ = write!(out, "ts={ts}");
    }
    // A plain message needs no kind tag, which keeps a tagless header a bare datagram.
    if let Some(kind) = meta.kind.tag_value().filter(|_| meta.kind != Kind::Message) {
        sep(out);
        let _ = write!(out, "kind={kind}");
    }
    for (key, value) in header.extra.iter().filter(|(k, _)| !tags::is_hop_by_hop(k)) {
        if !is_valid_key(key) || matches!(*key, "id" | "seq" | "ts" | "kind") {
            return Err(EncodeError::BadTagKey((*key).to_owned()));
        }
        sep(out);
        write_tag(key, value, out);
    }
    if !first {
        out.push(' ');
    }
    Ok(())
}

fn write_tag(key: &str, value: &str, out: &mut String) {
    out.push_str(key);
    if !value.is_empty() {
        out.push('=');
        escape_into(value, out);
    }
}

/// Clients pad a relay `sub`/`unsub` to this many bytes, so mcchatd's challenge, which is
/// never longer than the request it answers, always fits (docs/PROTOCOL.md 4.2).
pub const MIN_RELAY_REQUEST: usize = 256;

/// Writes a relay request (`kind` is [`Kind::Subscribe`] or [`Kind::Unsubscribe`]) for
/// `room` into `out`, with the cookie and the client's nonce if there are any, padded with a
/// `pad` tag to at least `pad_to` bytes (0: no padding; clients use [`MIN_RELAY_REQUEST`]).
pub fn relay_request(
    kind: Kind,
    room: &str,
    sender: &str,
    cookie: Option<&str>,
    nonce: Option<&str>,
    pad_to: usize,
    out: &mut String,
) -> Result<(), EncodeError> {
    let encode = |tags: &[(&str, &str)], out: &mut String| {
        let header = Header {
            meta: Meta {
                kind,
                ..Meta::default()
            },
            extra: tags,
        };
        encode(&header, room, sender, "", out)
    };
    let tags: Vec<(&str, &str)> = cookie
        .iter()
        .map(|c| (tags::COOKIE, *c))
        .chain(nonce.iter().map(|n| (tags::NONCE, *n)))
        .collect();
    encode(&tags, out)?;
    // `pad=V;` in front of the other tags (hop-by-hop tags come first).
    let pad_overhead = "pad=;".len();
    if out.len() + pad_overhead < pad_to {
        let pad = "x".repeat(pad_to - out.len() - pad_overhead);
        let mut padded = tags.clone();
        padded.push(("pad", &pad));
        encode(&padded, out)?;
    }
    Ok(())
}

/// Splits `text` into pieces that each fit in one datagram of at most
/// [`tags::MAX_WRITTEN`] bytes (leaving [`tags::HOP_RESERVE`] free for hop-by-hop tags) next
/// to `overhead` bytes of tags, room and sender (see [`overhead`]). Cuts at the last space of
/// a piece when that keeps at least half of it, else at a character boundary; no character is
/// split and, with the spaces at the cuts kept at the end of the piece before, the pieces
/// concatenate to `text` exactly. A piece that ends in a newline counts the one `encode` adds.
pub fn split_text(text: &str, overhead: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut rest = text;
    loop {
        let (piece, tail) = split_first(rest, overhead);
        pieces.push(piece);
        rest = tail;
        if rest.is_empty() {
            return pieces;
        }
    }
}

/// The first piece [`split_text`] would cut from `text`, and the rest (empty if `text` fits
/// whole). For a sender whose header grows from piece to piece (its `seq`), so each piece is
/// measured against its own header.
pub fn split_first(text: &str, overhead: usize) -> (&str, &str) {
    let budget = tags::MAX_WRITTEN.saturating_sub(overhead).max(4);
    // `encode` adds a newline after a text that ends in one.
    let fits = |s: &str| s.len() + usize::from(s.ends_with('\n')) <= budget;
    if fits(text) {
        return (text, "");
    }
    let mut cut = budget;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    if text[..cut].ends_with('\n') && !fits(&text[..cut]) {
        cut -= 1; // the newline goes to the next piece
    }
    if let Some(space) = text[..cut].rfind(' ')
        && space + 1 >= cut / 2
    {
        cut = space + 1;
    }
    text.split_at(cut)
}

/// The bytes `encode` will put around the text for this header, room and sender: what
/// [`split_text`] needs as its overhead.
pub fn overhead(header: &Header<'_>, room: &str, sender: &str) -> Result<usize, EncodeError> {
    let mut out = String::new();
    write_tags(header, &mut out)?;
    Ok(out.len() + room.len() + sender.len() + 2)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn meta(kind: Kind) -> Meta {
        Meta {
            instance: Some(InstanceId(0x0123_4567_89ab_cdef)),
            seq: Some(42),
            ts_ms: Some(1_763_900_000_123),
            kind,
        }
    }

    #[test]
    fn bare_datagram_from_socat_decodes() {
        let f = decode(b"room1|bob|hi there\n").unwrap();
        assert_eq!((f.room, f.sender, f.text), ("room1", "bob", "hi there"));
        assert_eq!(f.meta, Meta::default());
    }

    #[test]
    fn text_may_contain_pipes() {
        let f = decode(b"room1|bob|a|b||c").unwrap();
        assert_eq!(f.text, "a|b||c");
    }

    #[test]
    fn tagged_datagram_decodes() {
        let f =
            decode(b"@id=0123456789abcdef;seq=42;ts=1763900000123;kind=me room1|al|waves").unwrap();
        assert_eq!(f.meta, meta(Kind::Action));
        assert_eq!(f.text, "waves");
    }

    #[test]
    fn encodes_exact_bytes() {
        let mut out = String::new();
        let h = Header {
            meta: meta(Kind::Join),
            extra: &[("+x/y", "a b;c")],
        };
        encode(&h, "room1", "alice", "", &mut out).unwrap();
        assert_eq!(
            out,
            "@id=0123456789abcdef;seq=42;ts=1763900000123;kind=join;+x/y=a\\sb\\:c room1|alice|"
        );
        let f = decode(out.as_bytes()).unwrap();
        assert_eq!(f.tags.get("+x/y").as_deref(), Some("a b;c"));
    }

    #[test]
    fn message_without_tags_is_bare() {
        let mut out = String::new();
        encode(&Header::default(), "r", "s", "t", &mut out).unwrap();
        assert_eq!(out, "r|s|t");
    }

    #[test]
    fn unknown_tags_and_kinds_are_not_errors() {
        let f = decode(b"@future=1;kind=fec;+vendor.example/x=\\s room1|a|").unwrap();
        assert_eq!(f.meta.kind, Kind::Unknown);
        assert_eq!(f.tags.get("future").as_deref(), Some("1"));
        assert_eq!(f.tags.get("+vendor.example/x").as_deref(), Some(" "));
    }

    #[test]
    fn last_duplicate_tag_wins() {
        let f = decode(b"@seq=1;seq=2 r|s|t").unwrap();
        assert_eq!(f.meta.seq, Some(2));
    }

    #[test]
    fn malformed_datagrams_have_reasons() {
        let cases: &[(&[u8], DropReason)] = &[
            (b"room1|bob", DropReason::MissingField),
            (b"", DropReason::MissingField),
            (b"\xff\xfe|a|b", DropReason::NotUtf8),
            (b"room 1|bob|hi", DropReason::BadRoom),
            (b"|bob|hi", DropReason::BadRoom),
            (b"room1||hi", DropReason::BadSender),
            (b"room1|b\x1bb|hi", DropReason::BadSender),
            (b"room1|bob|", DropReason::EmptyText),
            (b"room1|bob|\n", DropReason::EmptyText),
            (b"@seq=x r|s|t", DropReason::BadTags),
            (b"@seq=-1 r|s|t", DropReason::BadTags),
            (b"@seq=99999999999999999999 r|s|t", DropReason::BadTags),
            (b"@id=123 r|s|t", DropReason::BadTags),
            (b"@ r|s|t", DropReason::BadTags),
            (b"@a=b", DropReason::BadTags),
            (b"@k\x01=1 r|s|t", DropReason::BadTags),
            (b"@a;;b r|s|t", DropReason::BadTags),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                decode(bytes),
                Err(*want),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        let big = format!("r|s|{}", "x".repeat(MAX_DATAGRAM));
        assert_eq!(decode(big.as_bytes()), Err(DropReason::Oversize));
    }

    #[test]
    fn sender_limit_counts_characters_not_bytes() {
        assert!(is_valid_sender(&"é".repeat(32)));
        assert!(!is_valid_sender(&"é".repeat(33)));
        assert!(!is_valid_sender("a|b"));
        assert!(!is_valid_sender("a\u{85}b"));
    }

    #[test]
    fn wrong_room_is_a_drop() {
        let f = decode(b"room2|bob|hi").unwrap();
        assert_eq!(f.check_room("room1"), Err(DropReason::WrongRoom));
        assert_eq!(f.check_room("room2"), Ok(()));
    }

    #[test]
    fn too_long_is_refused() {
        let mut out = String::new();
        let text = "x".repeat(MAX_DATAGRAM);
        let err = encode(&Header::default(), "r", "s", &text, &mut out).unwrap_err();
        assert_eq!(
            err,
            EncodeError::TooLong {
                len: MAX_DATAGRAM + 4,
                max: MAX_DATAGRAM
            }
        );
    }

    #[test]
    fn relay_requests_are_padded_and_carry_the_cookie() {
        let mut out = String::new();
        relay_request(
            Kind::Subscribe,
            "room1",
            "alice",
            None,
            Some("0123456789abcdef"),
            MIN_RELAY_REQUEST,
            &mut out,
        )
        .unwrap();
        assert_eq!(out.len(), MIN_RELAY_REQUEST, "{out}");
        let f = decode(out.as_bytes()).unwrap();
        assert_eq!(f.meta.kind, Kind::Subscribe);
        assert!(f.tags.get("cookie").is_none());
        assert_eq!(f.tags.get("nonce").as_deref(), Some("0123456789abcdef"));
        relay_request(
            Kind::Unsubscribe,
            "r",
            "a",
            Some("abc.def"),
            None,
            MIN_RELAY_REQUEST,
            &mut out,
        )
        .unwrap();
        assert_eq!(out.len(), MIN_RELAY_REQUEST, "{out}");
        let f = decode(out.as_bytes()).unwrap();
        assert_eq!(f.meta.kind, Kind::Unsubscribe);
        assert_eq!(f.tags.get("cookie").as_deref(), Some("abc.def"));
        relay_request(Kind::Subscribe, "r", "a", None, None, 0, &mut out).unwrap();
        assert_eq!(out, "@kind=sub r|a|");
    }

    #[test]
    fn drop_counts_count() {
        let mut c = DropCounts::default();
        c.add(DropReason::BadRoom);
        c.add(DropReason::BadRoom);
        c.add(DropReason::WrongRoom);
        assert_eq!(c.get(DropReason::BadRoom), 2);
        assert_eq!(c.total(), 3);
        assert_eq!(
            c.nonzero().collect::<Vec<_>>(),
            vec![(DropReason::BadRoom, 2), (DropReason::WrongRoom, 1)]
        );
    }

    fn arb_kind() -> impl Strategy<Value = Kind> {
        prop_oneof![
            Just(Kind::Message),
            Just(Kind::Action),
            Just(Kind::Join),
            Just(Kind::Leave),
            Just(Kind::Heartbeat),
            Just(Kind::Subscribe),
            Just(Kind::Closed),
        ]
    }

    fn arb_meta() -> impl Strategy<Value = Meta> {
        (
            proptest::option::of(any::<u64>().prop_map(InstanceId)),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u64>()),
            arb_kind(),
        )
            .prop_map(|(instance, seq, ts_ms, kind)| Meta {
                instance,
                seq,
                ts_ms,
                kind,
            })
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1400)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn decode_never_panics_on_near_valid(s in "(@[a-z=;\\\\ ]{0,12} )?[a-z|]{0,6}\\|[^|]{0,6}\\|.{0,20}") {
            let _ = decode(s.as_bytes());
        }

        #[test]
        fn round_trip(
            meta in arb_meta(),
            room in "[A-Za-z0-9._-]{1,64}",
            sender in "[^|\\p{Cc}]{1,32}",
            text in "(?s).{1,200}|[a\\r\\n]{1,4}",
            extra_value in "[ -~\\r\\n;\\\\]{0,20}",
        ) {
            let extra = [("+example.org/note", extra_value.as_str())];
            let header = Header { meta, extra: &extra };
            let mut out = String::new();
            encode(&header, &room, &sender, &text, &mut out).unwrap();
            let f = decode(out.as_bytes()).unwrap();
            prop_assert_eq!(f.meta, meta);
            prop_assert_eq!(f.room, room.as_str());
            prop_assert_eq!(f.sender, sender.as_str());
            prop_assert_eq!(f.text, text.as_str());
            let got = f.tags.get("+example.org/note").unwrap_or_default();
            prop_assert_eq!(got.as_ref(), extra_value.as_str());
        }

        #[test]
        fn split_pieces_fit_and_rejoin(
            text in "(?s).{1,3000}|[x\n ]{1,3000}",
            sender in "[a-z]{1,32}",
            seq in any::<u64>(),
        ) {
            let header = Header { meta: meta(Kind::Message), ..Header::default() };
            let header = Header { meta: Meta { seq: Some(seq), ..header.meta }, ..header };
            let overhead = overhead(&header, "room1", &sender).unwrap();
            let pieces = split_text(&text, overhead);
            prop_assert_eq!(pieces.concat(), text.clone());
            let mut out = String::new();
            for p in &pieces {
                prop_assert!(!p.is_empty());
                encode(&header, "room1", &sender, p, &mut out).unwrap();
                prop_assert!(out.len() <= tags::MAX_WRITTEN, "{} bytes", out.len());
                prop_assert_eq!(decode(out.as_bytes()).unwrap().text, *p);
            }
            // Every piece but the last is cut no shorter than half the budget.
            for p in &pieces[..pieces.len() - 1] {
                prop_assert!(2 * (p.len() + 1) >= tags::MAX_WRITTEN - overhead - 3, "{}", p.len());
            }
        }
    }
}
