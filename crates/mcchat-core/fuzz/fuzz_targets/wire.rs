//! Fuzzes the datagram codec: `decode` must never panic on any bytes, and every datagram it
//! accepts must survive a re-encode and a second decode unchanged.
//!
//! Run: `cargo +nightly fuzz run wire` in crates/mcchat-core.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mcchat_core::wire::{Header, Kind, decode, encode};

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = decode(data) else {
        return;
    };
    // An unknown kind has no tag value and is never sent: re-encoding it would give a plain
    // message, so there is no round trip to check.
    if frame.meta.kind == Kind::Unknown {
        return;
    }
    let header = Header {
        meta: frame.meta,
        extra: &[],
    };
    let mut out = String::new();
    // Re-encoding an accepted datagram cannot fail: room, sender and text passed the same
    // checks in `decode`, and the canonical form is never longer than the input (the typed
    // tags come back no longer than they were, unknown tags and an omitted `kind=msg` are
    // dropped, and `encode` adds a newline only where `decode` removed one), so it cannot be
    // TooLong either.
    if let Err(e) = encode(&header, frame.room, frame.sender, frame.text, &mut out) {
        panic!("re-encoding {frame:?} from {:?} failed: {e}", String::from_utf8_lossy(data));
    }
    assert!(out.len() <= data.len(), "canonical form {out:?} is longer than the input");

    let again = decode(out.as_bytes())
        .unwrap_or_else(|r| panic!("re-encoded {out:?} does not decode: {r}"));
    assert_eq!(again.meta, frame.meta, "meta of {out:?}");
    assert_eq!(again.room, frame.room, "room of {out:?}");
    assert_eq!(again.sender, frame.sender, "sender of {out:?}");
    assert_eq!(again.text, frame.text, "text of {out:?}");

    // The canonical form is a fixed point.
    let mut twice = String::new();
    encode(&header, again.room, again.sender, again.text, &mut twice)
        .unwrap_or_else(|e| panic!("second encode of {out:?} failed: {e}"));
    assert_eq!(twice, out);
});
