//! Making network text safe for a terminal.
//!
//! Everything from the network is shown, but never interpreted: control characters (C0, DEL,
//! C1, which include ESC and so every ANSI escape sequence), the Unicode bidirectional
//! controls (which can reorder what is shown, CVE-2021-42574), and every other invisible or
//! format character (General Category Cf: zero-width space and joiners, word joiner, BOM,
//! tag characters; the line and paragraph separators U+2028/U+2029; the Hangul fillers) are
//! replaced by visible escapes, so `al\u{200b}ice` can never pass for `alice`.
//!
//! One exception keeps emoji whole: a zero-width joiner between two emoji (👩‍💻).

use std::borrow::Cow;
use std::fmt::Write as _;

use unicode_properties::{GeneralCategory, UnicodeEmoji as _, UnicodeGeneralCategory as _};

/// Whether `c` must not reach a terminal as is.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c.general_category(),
            GeneralCategory::Format
                | GeneralCategory::LineSeparator
                | GeneralCategory::ParagraphSeparator
        )
        // Letters by category, but blank: used to make names that look empty or alike.
        || matches!(c, '\u{115F}' | '\u{1160}' | '\u{3164}' | '\u{FFA0}')
}

fn is_emoji(c: Option<char>) -> bool {
    c.is_some_and(|c| c.is_emoji_char() && !c.is_ascii())
}

/// `s` with every unsafe character written as a visible escape (`\n`, `\t`, `\x1b`,
/// `\u{202e}`); borrowed when there is nothing to replace.
pub fn for_terminal(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    let chars: Vec<char> = s.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        let joins_emoji = c == '\u{200D}'
            && is_emoji(i.checked_sub(1).map(|p| chars[p]))
            && is_emoji(chars.get(i + 1).copied());
        match c {
            c if joins_emoji => out.push(c),
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

    #[test]
    fn invisible_and_format_characters_are_shown() {
        assert_eq!(for_terminal("al\u{200b}ice"), "al\\u{200b}ice");
        assert_eq!(for_terminal("a\u{2028}b\u{2029}c"), "a\\u{2028}b\\u{2029}c");
        assert_eq!(for_terminal("\u{feff}x\u{2060}"), "\\u{feff}x\\u{2060}");
        assert_eq!(for_terminal("\u{e0041}\u{e007f}"), "\\u{e0041}\\u{e007f}");
        assert_eq!(for_terminal("\u{3164}"), "\\u{3164}");
        assert_eq!(for_terminal("\u{ad}"), "\\xad", "soft hyphen");
        // Emoji sequences stay whole; a joiner elsewhere does not.
        assert_eq!(
            for_terminal("👩\u{200d}💻 ok 日本語"),
            "👩\u{200d}💻 ok 日本語"
        );
        assert_eq!(for_terminal("a\u{200d}b"), "a\\u{200d}b");
    }

    proptest! {
        #[test]
        fn output_has_no_unsafe_characters(
            s in "\\PC*|[\\x00-\\x{ff}\\x{200b}-\\x{206f}\\x{e0000}-\\x{e007f}]*"
        ) {
            let out = for_terminal(&s);
            let zwj = '\u{200D}';
            let clean = !out.chars().any(|c| is_unsafe(c) && c != zwj);
            prop_assert!(clean);
        }
    }
}
