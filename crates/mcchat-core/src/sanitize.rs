//! Making network text safe for a terminal.
//!
//! Everything from the network is shown, but never interpreted: control characters (C0, DEL,
//! C1, which include ESC and so every ANSI escape sequence) and the Unicode bidirectional
//! controls (which can reorder what is shown, CVE-2021-42574) are replaced by visible escapes.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Whether `c` must not reach a terminal as is.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200E}' | '\u{200F}' | '\u{061C}')
        || ('\u{202A}'..='\u{202E}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

/// `s` with every unsafe character written as a visible escape (`\n`, `\t`, `\x1b`,
/// `\u{202e}`); borrowed when there is nothing to replace.
pub fn for_terminal(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            // Writing to a String cannot fail.
            c if is_unsafe(c) && (c as u32) < 0x100 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if is_unsafe(c) => {
                let _ = write!(out, "\\u{{{:04x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn escapes_are_neutralised() {
        assert_eq!(
            for_terminal("\x1b[2J\x1b]0;pwn\x07hi"),
            "\\x1b[2J\\x1b]0;pwn\\x07hi"
        );
        assert_eq!(for_terminal("a\nb\tc\r"), "a\\nb\\tc\\r");
        assert_eq!(for_terminal("\u{9b}31m"), "\\x9b31m");
        assert_eq!(for_terminal("abc\u{202e}def"), "abc\\u{202e}def");
        assert!(matches!(for_terminal("plain | text é"), Cow::Borrowed(_)));
    }

    proptest! {
        #[test]
        fn output_has_no_unsafe_characters(s in "\\PC*|[\\x00-\\x{ff}\\x{202a}-\\x{202e}]*") {
            let out = for_terminal(&s);
            prop_assert!(!out.chars().any(is_unsafe));
        }
    }
}
