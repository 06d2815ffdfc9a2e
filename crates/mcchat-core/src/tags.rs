//! End-to-end and hop-by-hop tags (docs/PROTOCOL.md 2.8).
//!
//! A datagram's tags are of two sorts. End-to-end tags are what the sender wrote (`id`,
//! `seq`, `ts`, `kind`, `for`, `seqs`, `lease`, and any tag this version does not know):
//! relays and caches pass them on unchanged. Hop-by-hop tags ([`HOP_BY_HOP`]) describe one
//! leg of the trip (this copy is a repair, this copy was forwarded by that daemon, this
//! request carries a cookie or padding): a relay or cache may add or strip them. Hop-by-hop
//! tags always precede end-to-end ones, so adding one is a prefix edit and the end-to-end part
//! ([`end_to_end`]) is what a future room key will authenticate.
//!
//! Everything here works on the raw bytes, without decoding: a relay tags and strips what it
//! forwards without building a [`crate::wire::Frame`].

use std::borrow::Cow;

use crate::wire::MAX_DATAGRAM;

/// Tags a relay or cache may add or strip; everything else is end-to-end (what the sender
/// wrote: id, seq, ts, kind, for, seqs, lease, ...).
pub const HOP_BY_HOP: &[&str] = &["repair", "pad", COOKIE, NONCE, "relay", "site", "hops"];

/// The return-routability cookie of mcchatd's relay protocol (PROTOCOL.md 4.2): in a
/// challenge, `subok`, a request, and a subscriber's NACK to the daemon.
pub const COOKIE: &str = "cookie";

/// The client's random nonce in relay requests, echoed in the daemon's answers (`cookie`,
/// `subok`, `closed`), so that a forged answer (which cannot know it) is ignored.
pub const NONCE: &str = "nonce";

/// Whether `s` is a well-formed nonce: 8 to 32 ASCII letters and digits.
pub fn is_nonce(s: &str) -> bool {
    (8..=32).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Whether `key` names a hop-by-hop tag (one of [`HOP_BY_HOP`]; `+repair` and
/// `vendor/repair` are other keys, end-to-end).
pub fn is_hop_by_hop(key: &str) -> bool {
    HOP_BY_HOP.contains(&key)
}

/// Bytes a writer leaves free for hop-by-hop tags a relay may add (the reason long text is
/// split below 1200): a writer's datagram is at most `MAX_DATAGRAM - HOP_RESERVE` = 1164
/// bytes. What mcchat adds on the way is at most 25 bytes (`@repair=1;relay=0123abcd ` in
/// front of a bare datagram: a cache's repair forwarded by a relay); the other 11 are for one
/// more short hop-by-hop tag (`hops=N`) without a change of the split. A datagram longer than
/// this is still accepted up to [`MAX_DATAGRAM`], but a relay or cache may be unable to tag
/// it ([`add_hop_tag`] refuses).
pub const HOP_RESERVE: usize = 36;

/// The most bytes a writer puts in one datagram: [`MAX_DATAGRAM`] less [`HOP_RESERVE`].
pub const MAX_WRITTEN: usize = MAX_DATAGRAM - HOP_RESERVE;

/// Why a hop-by-hop tag could not be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TagError {
    /// The key is not one of [`HOP_BY_HOP`]: end-to-end tags are the sender's alone.
    #[error("tag {0:?} is not hop-by-hop")]
    NotHopByHop(String),
    /// The value is empty or has a character that would need escaping.
    #[error("bad value for tag {0:?}: use printable ASCII other than ';' and '\\'")]
    BadValue(String),
    /// The datagram already carries this tag (once per hop-by-hop key).
    #[error("the datagram already carries a {0:?} tag")]
    Present(String),
    /// The datagram starts with `@` but has no space ending its tags, or no tags there.
    #[error("the datagram's tag prefix is malformed")]
    Malformed,
    /// With the tag the datagram would be longer than [`MAX_DATAGRAM`].
    #[error("with the tag the datagram is {len} bytes, more than the {max}-byte limit")]
    TooLong {
        /// The length it would have.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// A datagram cut in two: the raw tags (without `@` and the space) and the rest.
type Sections<'a> = (&'a [u8], &'a [u8]);

/// The tag section and the rest, if `data` has tags.
fn tag_section(data: &[u8]) -> Result<Option<Sections<'_>>, TagError> {
    let Some(rest) = data.strip_prefix(b"@") else {
        return Ok(None);
    };
    let space = rest
        .iter()
        .position(|b| *b == b' ')
        .ok_or(TagError::Malformed)?;
    if space == 0 {
        return Err(TagError::Malformed);
    }
    Ok(Some((&rest[..space], &rest[space + 1..])))
}

/// The key of one raw tag (`key` or `key=value`).
fn key_of(tag: &[u8]) -> &[u8] {
    tag.split(|b| *b == b'=').next().unwrap_or(tag)
}

fn is_hop_tag(tag: &[u8]) -> bool {
    let key = key_of(tag);
    HOP_BY_HOP.iter().any(|k| k.as_bytes() == key)
}

/// A value that needs no escaping: printable ASCII, no `;` or `\` (nor space).
fn is_plain_value(value: &str) -> bool {
    !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b';' && b != b'\\')
}

/// `data` with the hop-by-hop tag `key=value` added in FRONT of its tags (hop-by-hop tags
/// always precede end-to-end ones), written into `out` (cleared first); error if the result
/// would pass [`MAX_DATAGRAM`], if `key` is not hop-by-hop, if value has bad characters, or
/// if `data` already carries that key. A prefix edit: the rest of `data` is copied as is.
pub fn add_hop_tag(data: &[u8], key: &str, value: &str, out: &mut Vec<u8>) -> Result<(), TagError> {
    out.clear();
    if !is_hop_by_hop(key) {
        return Err(TagError::NotHopByHop(key.to_owned()));
    }
    if !is_plain_value(value) {
        return Err(TagError::BadValue(key.to_owned()));
    }
    let section = tag_section(data)?;
    if let Some((raw, _)) = section
        && raw
            .split(|b| *b == b';')
            .any(|t| key_of(t) == key.as_bytes())
    {
        return Err(TagError::Present(key.to_owned()));
    }
    // `@key=value` plus `;` before the existing tags, or ` ` before a bare datagram.
    let len = data.len() + 1 + key.len() + 1 + value.len() + usize::from(section.is_none());
    if len > MAX_DATAGRAM {
        return Err(TagError::TooLong {
            len,
            max: MAX_DATAGRAM,
        });
    }
    out.reserve(len);
    out.push(b'@');
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value.as_bytes());
    match data.strip_prefix(b"@").filter(|_| section.is_some()) {
        Some(rest) => {
            out.push(b';');
            out.extend_from_slice(rest);
        }
        None => {
            out.push(b' ');
            out.extend_from_slice(data);
        }
    }
    Ok(())
}

/// The canonical end-to-end part: the datagram with every hop-by-hop tag removed (and the
/// `@` prefix dropped if no tag remains). This is what a future room key will authenticate;
/// relays and caches never change it. End-to-end tags keep their order and bytes; a datagram
/// without hop-by-hop tags, or whose tag prefix is malformed (which `decode` refuses
/// anyway), is returned as it is, borrowed.
pub fn end_to_end(data: &[u8]) -> Cow<'_, [u8]> {
    strip(data, is_hop_tag)
}

/// `data` without its hop-by-hop tag `key` (every copy of it), the other tags as they are:
/// for a relay that forwards to a group what already carries another daemon's `relay` tag
/// (a cached copy heard there), before it adds its own. Borrowed when there is nothing to
/// remove, or `key` is not hop-by-hop (end-to-end tags are never removed).
pub fn without_hop_tag<'a>(data: &'a [u8], key: &str) -> Cow<'a, [u8]> {
    if !is_hop_by_hop(key) {
        return Cow::Borrowed(data);
    }
    strip(data, |tag| key_of(tag) == key.as_bytes())
}

/// `data` with every hop-by-hop tag removed but those named in `keep`, in one pass: the
/// end-to-end part and what a hop wants to carry on (another site's origin, say). Borrowed
/// when there is nothing to remove.
pub fn keeping_hop_tags<'a>(data: &'a [u8], keep: &[&str]) -> Cow<'a, [u8]> {
    strip(data, |tag| {
        is_hop_tag(tag) && !keep.iter().any(|k| k.as_bytes() == key_of(tag))
    })
}

/// `data` without the tags `remove` picks.
fn strip(data: &[u8], remove: impl Fn(&[u8]) -> bool) -> Cow<'_, [u8]> {
    let Ok(Some((raw, body))) = tag_section(data) else {
        return Cow::Borrowed(data);
    };
    if !raw.split(|b| *b == b';').any(&remove) {
        return Cow::Borrowed(data);
    }
    let mut out = Vec::with_capacity(data.len());
    let mut first = true;
    for tag in raw.split(|b| *b == b';').filter(|t| !remove(t)) {
        out.push(if first { b'@' } else { b';' });
        first = false;
        out.extend_from_slice(tag);
    }
    if !first {
        out.push(b' ');
    }
    out.extend_from_slice(body);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(data: &[u8], key: &str, value: &str) -> Result<Vec<u8>, TagError> {
        let mut out = Vec::new();
        add_hop_tag(data, key, value, &mut out).map(|()| out)
    }

    #[test]
    fn hop_tags_go_in_front() {
        assert_eq!(add(b"a|b|c", "repair", "1").unwrap(), b"@repair=1 a|b|c");
        assert_eq!(
            add(b"@id=0123456789abcdef;seq=1 a|b|c", "relay", "0123abcd").unwrap(),
            b"@relay=0123abcd;id=0123456789abcdef;seq=1 a|b|c"
        );
        let twice = add(&add(b"@seq=1 a|b|c", "repair", "1").unwrap(), "relay", "ff").unwrap();
        assert_eq!(twice, b"@relay=ff;repair=1;seq=1 a|b|c");
    }

    #[test]
    fn adding_refuses_what_breaks_a_rule() {
        assert_eq!(
            add(b"a|b|c", "seq", "1"),
            Err(TagError::NotHopByHop("seq".into()))
        );
        assert_eq!(
            add(b"a|b|c", "+repair", "1"),
            Err(TagError::NotHopByHop("+repair".into()))
        );
        for bad in ["", "a b", "a;b", "a\\b", "é", "a\nb"] {
            assert_eq!(
                add(b"a|b|c", "relay", bad),
                Err(TagError::BadValue("relay".into())),
                "{bad:?}"
            );
        }
        assert_eq!(
            add(b"@kind=hb;repair=1 a|b|", "repair", "1"),
            Err(TagError::Present("repair".into()))
        );
        assert_eq!(
            add(b"@repair a|b|", "repair", "1"),
            Err(TagError::Present("repair".into()))
        );
        assert_eq!(add(b"@a|b|c", "repair", "1"), Err(TagError::Malformed));
        assert_eq!(add(b"@ a|b|c", "repair", "1"), Err(TagError::Malformed));
    }

    #[test]
    fn stripping_keeps_the_end_to_end_tags_in_order() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"a|b|c", b"a|b|c"),
            (b"@repair=1 a|b|c", b"a|b|c"),
            (b"@relay=1;repair=1 a|b|c", b"a|b|c"),
            (
                b"@relay=1;id=2;repair=1;seq=3;pad=xx a|b|c",
                b"@id=2;seq=3 a|b|c",
            ),
            (b"@+repair=1;x/relay=2 a|b|c", b"@+repair=1;x/relay=2 a|b|c"),
            (b"@repair=1 a|b|c d\n", b"a|b|c d\n"),
            (b"@repair a|b|c", b"a|b|c"),
        ];
        for (data, want) in cases {
            assert_eq!(
                &*end_to_end(data),
                *want,
                "{}",
                String::from_utf8_lossy(data)
            );
        }
        assert!(matches!(end_to_end(b"@id=1 a|b|c"), Cow::Borrowed(_)));
    }

    #[test]
    fn one_hop_tag_can_be_taken_out() {
        let heard = b"@relay=0123abcd;repair=1;id=2 a|b|c";
        assert_eq!(&*without_hop_tag(heard, "relay"), b"@repair=1;id=2 a|b|c");
        assert_eq!(&*without_hop_tag(b"@relay=1 a|b|c", "relay"), b"a|b|c");
        assert!(matches!(without_hop_tag(heard, "id"), Cow::Borrowed(_)));
        assert!(matches!(without_hop_tag(heard, "pad"), Cow::Borrowed(_)));
        let mine = add(&without_hop_tag(heard, "relay"), "relay", "ffffffff").unwrap();
        assert_eq!(mine, b"@relay=ffffffff;repair=1;id=2 a|b|c");
    }

    #[test]
    fn the_reserve_holds_what_mcchat_adds() {
        // The longest a writer sends, bare and tagged, still takes a cache's repair tag and
        // a relay's tag.
        for data in [
            format!("r|s|{}", "x".repeat(MAX_WRITTEN - 4)),
            format!("@seq=1 r|s|{}", "x".repeat(MAX_WRITTEN - 11)),
        ] {
            assert_eq!(data.len(), MAX_WRITTEN);
            let repaired = add(data.as_bytes(), "repair", "1").unwrap();
            let relayed = add(&repaired, "relay", "0123abcd").unwrap();
            assert!(relayed.len() + 11 <= MAX_DATAGRAM, "{}", relayed.len());
        }
    }
}
