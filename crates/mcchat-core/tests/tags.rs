//! Properties of the end-to-end / hop-by-hop split (docs/PROTOCOL.md 2.8), on datagrams as
//! mcchat writes them: adding a hop-by-hop tag never changes the end-to-end part, is refused
//! past the datagram limit, and stripping does not depend on where or in what order the
//! hop-by-hop tags were put.

#![allow(clippy::unwrap_used)]

use mcchat_core::tags::{self, HOP_BY_HOP, TagError, add_hop_tag, end_to_end};
use mcchat_core::wire::{self, Header, InstanceId, Kind, MAX_DATAGRAM, Meta};
use proptest::prelude::*;

fn arb_kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Message),
        Just(Kind::Action),
        Just(Kind::Join),
        Just(Kind::Leave),
        Just(Kind::Heartbeat),
        Just(Kind::Nack),
    ]
}

/// A valid datagram: typed tags, maybe an end-to-end extension tag, room, sender, text of
/// any length up to the limit.
fn arb_datagram() -> impl Strategy<Value = Vec<u8>> {
    (
        proptest::option::of(any::<u64>()),
        proptest::option::of(any::<u64>()),
        proptest::option::of(any::<u64>()),
        arb_kind(),
        proptest::option::of("[ -~]{0,12}"),
        "[A-Za-z0-9._-]{1,16}",
        "[^|\\p{Cc}]{1,32}",
        prop_oneof!["(?s).{1,40}", "x{1,1190}"],
    )
        .prop_filter_map("fits", |(id, seq, ts, kind, note, room, sender, text)| {
            let extra: Vec<(&str, &str)> = note
                .iter()
                .map(|n| ("+example.org/note", n.as_str()))
                .collect();
            let header = Header {
                meta: Meta {
                    instance: id.map(InstanceId),
                    seq,
                    ts_ms: ts,
                    kind,
                },
                extra: &extra,
            };
            let mut out = String::new();
            wire::encode(&header, &room, &sender, &text, &mut out).ok()?;
            Some(out.into_bytes())
        })
}

fn arb_hop_tag() -> impl Strategy<Value = (&'static str, String)> {
    (
        proptest::sample::select(HOP_BY_HOP.to_vec()),
        "[!-:<-\\[\\]-~]{1,12}",
    )
}

fn add(data: &[u8], key: &str, value: &str) -> Result<Vec<u8>, TagError> {
    let mut out = Vec::new();
    add_hop_tag(data, key, value, &mut out).map(|()| out)
}

proptest! {
    /// end_to_end(add_hop_tag(x)) == end_to_end(x), and the tagged datagram decodes to the
    /// same message with the tag first.
    #[test]
    fn adding_a_hop_tag_keeps_the_end_to_end_part(x in arb_datagram(), (key, value) in arb_hop_tag()) {
        // `@key=value;` in front of tags, `@key=value ` in front of a bare datagram.
        let grown = x.len() + key.len() + value.len() + 2 + usize::from(!x.starts_with(b"@"));
        match add(&x, key, &value) {
            Ok(tagged) => {
                prop_assert_eq!(tagged.len(), grown);
                prop_assert_eq!(end_to_end(&tagged), end_to_end(&x));
                let prefix = format!("@{key}={value}");
                prop_assert!(tagged.starts_with(prefix.as_bytes()));
                let (a, b) = (wire::decode(&x).unwrap(), wire::decode(&tagged).unwrap());
                prop_assert_eq!((a.meta, a.room, a.sender, a.text), (b.meta, b.room, b.sender, b.text));
                let got = b.tags.get(key).unwrap_or_default();
                prop_assert_eq!(got.as_ref(), value.as_str());
            }
            Err(TagError::TooLong { len, max }) => {
                prop_assert_eq!(max, MAX_DATAGRAM);
                prop_assert!(len > MAX_DATAGRAM);
                prop_assert_eq!(len, grown);
            }
            Err(e) => prop_assert!(false, "{e}"),
        }
    }

    /// Whatever a writer sends within the reserve takes a repair tag and a relay tag.
    #[test]
    fn the_reserve_is_enough_for_repair_and_relay(x in arb_datagram(), relay in "[0-9a-f]{8}") {
        prop_assume!(x.len() <= tags::MAX_WRITTEN);
        let repaired = add(&x, "repair", "1").unwrap();
        let relayed = add(&repaired, "relay", &relay).unwrap();
        prop_assert_eq!(end_to_end(&relayed), end_to_end(&x));
    }

    /// Adding is refused past MAX_DATAGRAM, and refused again (already there) on a second try.
    #[test]
    fn adding_is_refused_past_the_limit(pad in 0usize..40, (key, value) in arb_hop_tag()) {
        let text = "x".repeat(MAX_DATAGRAM - "@seq=1 r|s|".len() - pad);
        let x = format!("@seq=1 r|s|{text}");
        let got = add(x.as_bytes(), key, &value);
        let len = MAX_DATAGRAM - pad + key.len() + value.len() + 2;
        if len > MAX_DATAGRAM {
            prop_assert_eq!(got, Err(TagError::TooLong { len, max: MAX_DATAGRAM }));
        } else {
            let tagged = got.unwrap();
            prop_assert_eq!(add(&tagged, key, &value), Err(TagError::Present(key.to_owned())));
        }
    }

    /// Stripping does not depend on the order hop-by-hop tags were added in, nor on where
    /// in the tag list they sit (a writer that broke the hop-first rule).
    #[test]
    fn stripping_is_order_independent(
        x in arb_datagram(),
        hops in proptest::sample::subsequence(HOP_BY_HOP.to_vec(), 0..=HOP_BY_HOP.len())
            .prop_shuffle(),
        positions in proptest::collection::vec(any::<proptest::sample::Index>(), HOP_BY_HOP.len()),
    ) {
        prop_assume!(x.len() + 100 <= MAX_DATAGRAM);
        let want = end_to_end(&x).into_owned();
        // Added in front, in the order given and reversed.
        let mut forward = x.clone();
        for key in &hops {
            forward = add(&forward, key, "v").unwrap();
        }
        let mut backward = x.clone();
        for key in hops.iter().rev() {
            backward = add(&backward, key, "v").unwrap();
        }
        prop_assert_eq!(&*end_to_end(&forward), &want[..]);
        prop_assert_eq!(&*end_to_end(&backward), &want[..]);
        // Put anywhere among the end-to-end tags.
        let text = std::str::from_utf8(&x).unwrap();
        let (mut list, body) = match text.strip_prefix('@') {
            Some(rest) => {
                let (raw, body) = rest.split_once(' ').unwrap();
                (raw.split(';').map(str::to_owned).collect::<Vec<_>>(), body)
            }
            None => (Vec::new(), text),
        };
        for (i, key) in hops.iter().enumerate() {
            let at = positions[i].index(list.len() + 1);
            list.insert(at, format!("{key}=w"));
        }
        let mixed = if list.is_empty() {
            body.to_owned()
        } else {
            format!("@{} {body}", list.join(";"))
        };
        prop_assert_eq!(&*end_to_end(mixed.as_bytes()), &want[..]);
        // Stripping twice is stripping once.
        prop_assert_eq!(&*end_to_end(&want), &want[..]);
    }
}
