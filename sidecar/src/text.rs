//! Strings that a peer chose, made safe to write into a log line or a message.
//!
//! A trainer, a peer agent or a pod spec controls client versions, job and pod names, fault kinds
//! and reasons. Written as they are, a newline forges a second log line, an ANSI escape rewrites
//! the operator's terminal, and a megabyte of text floods the log. [`peer`] caps the length and
//! escapes every character that could do any of that, so what is logged reads back unambiguously.

use std::fmt;

/// Characters of a peer string written into one log field.
pub const MAX_PEER_CHARS: usize = 256;

/// `s` as it may appear in a log line: at most [`MAX_PEER_CHARS`] characters (then `… (N bytes)`
/// with the full length), control and bidirectional-formatting characters and backslashes escaped
/// (`\n`, `\u{1b}`, `\\`).
pub fn peer(s: &str) -> Peer<'_> {
    Peer { s, max: MAX_PEER_CHARS }
}

/// `s` capped at `max` characters, otherwise as [`peer`].
pub fn capped(s: &str, max: usize) -> Peer<'_> {
    Peer { s, max }
}

/// A peer string that escapes itself when displayed; see [`peer`].
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    s: &'a str,
    max: usize,
}

/// Whether `c` changes how the rest of a line reads: C0/C1 controls, DEL, line and paragraph
/// separators, and the Unicode bidirectional overrides and isolates.
fn unsafe_char(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

impl fmt::Display for Peer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, c) in self.s.chars().enumerate() {
            if n == self.max {
                return write!(f, "… ({} bytes)", self.s.len());
            }
            if c == '\\' || unsafe_char(c) {
                write!(f, "{}", c.escape_default())?;
            } else {
                fmt::Write::write_char(f, c)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newlines_and_escapes_cannot_forge_or_colour_a_line() {
        let forged = "0.1.0\n2025-01-01T00:00:00Z  INFO step durable and committed step=9\r\u{1b}[31mred\u{7f}\u{9b}";
        let shown = peer(forged).to_string();
        assert!(!shown.chars().any(unsafe_char), "{shown:?}");
        assert_eq!(shown.lines().count(), 1, "{shown}");
        assert!(shown.starts_with("0.1.0\\n2025-01-01"), "{shown}");
        assert!(shown.contains("\\r\\u{1b}[31mred\\u{7f}\\u{9b}"), "{shown}");
        assert_eq!(peer("a\u{202e}b\u{2028}c").to_string(), "a\\u{202e}b\\u{2028}c");
    }

    #[test]
    fn backslashes_are_escaped_so_an_escape_cannot_be_faked() {
        assert_eq!(peer("a\\nb").to_string(), "a\\\\nb");
        assert_ne!(peer("a\\nb").to_string(), peer("a\nb").to_string());
    }

    #[test]
    fn plain_text_is_untouched_and_long_text_is_cut_on_a_character() {
        assert_eq!(peer("ckptd-py/0.1.0 (torch 2.5; ünïcode)").to_string(), "ckptd-py/0.1.0 (torch 2.5; ünïcode)");
        let long = "é".repeat(MAX_PEER_CHARS + 10);
        let shown = peer(&long).to_string();
        assert_eq!(shown, format!("{}… ({} bytes)", "é".repeat(MAX_PEER_CHARS), long.len()));
        assert_eq!(capped("abcdef", 3).to_string(), "abc… (6 bytes)");
        assert_eq!(peer(&"x".repeat(MAX_PEER_CHARS)).to_string(), "x".repeat(MAX_PEER_CHARS));
    }
}
