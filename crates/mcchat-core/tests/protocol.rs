//! Rules of docs/PROTOCOL.md that a second implementation could get wrong, pinned one by one
//! at the codec: what `decode` does with odd but legal tag values, and the names history
//! records use. (The engine-level rules are pinned in `peer/tests.rs`, section 11.)

#![allow(clippy::unwrap_used)]

use mcchat_core::wire::{DropReason, InstanceId, Kind, decode};

fn meta(bytes: &[u8]) -> mcchat_core::wire::Meta {
    decode(bytes).unwrap().meta
}

/// 2.2: `id` is exactly 16 hex digits, either case; the same instance either way, written
/// back lower-case (status, history, `for`).
#[test]
fn ids_are_16_hex_digits_of_either_case() {
    let lower = meta(b"@id=00000000000000ab r|s|t").instance;
    assert_eq!(lower, Some(InstanceId(0xab)));
    assert_eq!(meta(b"@id=00000000000000AB r|s|t").instance, lower);
    assert_eq!(meta(b"@id=00000000000000aB r|s|t").instance, lower);
    assert_eq!(InstanceId(0xab).to_string(), "00000000000000ab");
    assert_eq!(
        InstanceId::parse("ABCDEF0123456789").map(|i| i.to_string()),
        Some("abcdef0123456789".to_owned())
    );
    // The leading zeros are part of the 16 digits.
    for bad in [
        "ab",
        "0000000000000ab",
        "000000000000000ab",
        "0x000000000000ab",
        "+00000000000000a",
        "",
    ] {
        let d = format!("@id={bad} r|s|t");
        assert_eq!(
            decode(d.as_bytes()).unwrap_err(),
            DropReason::BadTags,
            "{bad:?}"
        );
    }
}

/// 2.2: `seq` and `ts` are 1-20 decimal digits no greater than 2^64-1; leading zeros are
/// allowed and mean nothing.
#[test]
fn seq_and_ts_are_decimal_and_leading_zeros_are_ignored() {
    let m = meta(b"@seq=007;ts=0001763900000123 r|s|t");
    assert_eq!((m.seq, m.ts_ms), (Some(7), Some(1_763_900_000_123)));
    assert_eq!(meta(b"@seq=00000000000000000001 r|s|t").seq, Some(1));
    assert_eq!(meta(b"@seq=0 r|s|t").seq, Some(0));
    assert_eq!(meta(b"@seq=18446744073709551615 r|s|t").seq, Some(u64::MAX));
    for bad in [
        "000000000000000000001", // 21 digits, though the value is small
        "18446744073709551616",
        "",
        "-1",
        "+1",
        "1.0",
        "1e3",
        "0x10",
        "1\\s",
        "١",
    ] {
        for key in ["seq", "ts"] {
            let d = format!("@{key}={bad} r|s|t");
            assert_eq!(
                decode(d.as_bytes()).unwrap_err(),
                DropReason::BadTags,
                "{key}={bad:?}"
            );
        }
    }
    // A known tag without `=` has the empty value: as malformed as `seq=`.
    assert_eq!(decode(b"@seq r|s|t").unwrap_err(), DropReason::BadTags);
}

/// 2.2: `id`, `seq` and `ts` are independent: each may be missing whatever the others do.
#[test]
fn id_seq_and_ts_are_each_optional() {
    let id = Some(InstanceId(1));
    let m = meta(b"@id=0000000000000001 r|s|t");
    assert_eq!((m.instance, m.seq, m.ts_ms), (id, None, None));
    let m = meta(b"@seq=5 r|s|t");
    assert_eq!((m.instance, m.seq, m.ts_ms), (None, Some(5), None));
    let m = meta(b"@id=0000000000000001;seq=5 r|s|t");
    assert_eq!((m.instance, m.seq, m.ts_ms), (id, Some(5), None));
    let m = meta(b"@ts=9 r|s|t");
    assert_eq!((m.instance, m.seq, m.ts_ms), (None, None, Some(9)));
}

/// 2.2: keys and `kind` values are case-sensitive: `ID` is an unknown tag (so the datagram
/// has no instance), `kind=MSG` an unknown kind (not shown).
#[test]
fn keys_and_kind_values_are_case_sensitive() {
    let f = decode(b"@ID=0000000000000001;SEQ=x r|s|t").unwrap();
    assert_eq!((f.meta.instance, f.meta.seq), (None, None));
    assert_eq!(f.tags.get("SEQ").as_deref(), Some("x"));
    for kind in ["MSG", "Me", "JOIN", "Hb", "nACK"] {
        let d = format!("@kind={kind} r|s|t");
        assert_eq!(meta(d.as_bytes()).kind, Kind::Unknown, "{kind}");
    }
}

/// 2.8: receivers ignore hop-by-hop tags, known or not: `relay`, `site` and `hops` change
/// nothing a datagram decodes to, wherever they sit.
#[test]
fn hop_by_hop_tags_do_not_change_what_decodes() {
    let plain = decode(b"@id=0000000000000001;seq=5;ts=9;kind=me r|s|waves").unwrap();
    for tagged in [
        &b"@relay=0123abcd;id=0000000000000001;seq=5;ts=9;kind=me r|s|waves"[..],
        b"@relay=0123abcd;repair=1;id=0000000000000001;seq=5;ts=9;kind=me r|s|waves",
        b"@id=0000000000000001;seq=5;ts=9;kind=me;hops=2;site=x r|s|waves",
    ] {
        let f = decode(tagged).unwrap();
        assert_eq!(
            (f.meta, f.room, f.sender, f.text),
            (plain.meta, plain.room, plain.sender, plain.text)
        );
    }
}

/// 6: history records name the kind `message` or `action` (not the wire's `msg` / `me`).
#[test]
fn history_kind_names_are_not_the_wire_values() {
    assert_eq!(Kind::Message.name(), "message");
    assert_eq!(Kind::Action.name(), "action");
    assert_eq!(Kind::Message.tag_value(), Some("msg"));
    assert_eq!(Kind::Action.tag_value(), Some("me"));
}

/// 2.2: the NACK tags are end-to-end, and `kind=nack` is a kind of its own.
#[test]
fn nack_is_a_known_kind() {
    let f =
        decode(b"@id=0000000000000001;seq=0;kind=nack;for=0000000000000002;seqs=5-7,9 r|listener|")
            .unwrap();
    assert_eq!(f.meta.kind, Kind::Nack);
    assert_eq!(f.meta.seq, Some(0));
    assert!(!mcchat_core::tags::is_hop_by_hop("for"));
    assert!(!mcchat_core::tags::is_hop_by_hop("seqs"));
}
