//! NATS subjects of rooms (docs/PROTOCOL.md 8.1): `mcchat.v1.room.<token>`, where the token
//! is an injective escape of the room name into characters that are plain in every NATS
//! subject token and key-value key: `A-Z a-z 0-9 -` stand for themselves, every other byte
//! is `_` and two upper-case hex digits. `.` (the subject separator) is `_2E`, `_` itself is
//! `_5F`; `*`, `>` and space can never appear in a token, so no room name (valid or not) is
//! a wildcard or spans two tokens, and two names never share a subject.

use mcchat_core::room::RoomName;

/// Every room's subject starts with this.
pub(crate) const PREFIX: &str = "mcchat.v1.room.";
/// The subjects of all rooms (the JetStream stream's filter).
pub(crate) const ALL: &str = "mcchat.v1.room.>";

/// `name`'s escape (see the module documentation).
pub(crate) fn token(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 8);
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push('_');
            out.push_str(&format!("{b:02X}"));
        }
    }
    out
}

/// The name a token escapes, if it is a well-formed token (the only escape of some name).
pub(crate) fn untoken(token: &str) -> Option<String> {
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(b);
            i += 1;
        } else if b == b'_' {
            let hex = token.get(i + 1..i + 3)?;
            if !hex
                .bytes()
                .all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(&h))
            {
                return None;
            }
            let v = u8::from_str_radix(hex, 16).ok()?;
            // A byte that stands for itself is never escaped: one spelling per name.
            if v.is_ascii_alphanumeric() || v == b'-' {
                return None;
            }
            out.push(v);
            i += 3;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

/// `room`'s subject.
pub(crate) fn subject(room: &RoomName) -> String {
    format!("{PREFIX}{}", token(room.as_str()))
}

/// The room a subject is of, if it is one of ours and names a valid room.
pub(crate) fn room_of(subject: &str) -> Option<RoomName> {
    let token = subject.strip_prefix(PREFIX)?;
    RoomName::new(&untoken(token)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn dots_and_wildcards_are_escaped() {
        assert_eq!(token("room1"), "room1");
        assert_eq!(token("a.b"), "a_2Eb");
        assert_eq!(token("a_b"), "a_5Fb");
        assert_eq!(token("a*b> c"), "a_2Ab_3E_20c");
        assert_eq!(
            subject(&RoomName::new("lab.3-west").unwrap()),
            "mcchat.v1.room.lab_2E3-west"
        );
        // A name written as another's escape does not collide with it.
        assert_ne!(token("a_2Eb"), token("a.b"));
        assert_eq!(room_of("mcchat.v1.room.a_2Eb").unwrap().as_str(), "a.b");
        for bad in [
            "mcchat.v1.room.a.b",
            "mcchat.v1.room.a_2eb",
            "mcchat.v1.room.a_41",
            "mcchat.v1.room.a_",
            "mcchat.v1.room.*",
            "mcchat.v1.room.>",
            "mcchat.v1.room.",
            "mcchat.v2.room.a",
        ] {
            assert_eq!(room_of(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn injective_and_subject_safe(a in "\\PC{0,40}", b in "\\PC{0,40}") {
            let (ta, tb) = (token(&a), token(&b));
            prop_assert!(ta.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
            prop_assert_eq!(untoken(&ta), Some(a.clone()));
            prop_assert_eq!(ta == tb, a == b);
        }
    }
}
