//! Text messages: the character policy, the sanitizer, then the caps. The rules are listed
//! in the [module docs](super).

use std::borrow::Cow;

use super::sanitize::sanitize_text;
use super::{ContentError, ContentErrorKind};

/// Raw input may be this many times the cap before it is refused unread. Only markup and
/// character references shrink when sanitized, so a message over twice the cap is mostly
/// markup. The bound matters because parsing deeply nested tags is quadratic: 16 KiB of
/// `<div>` takes about 55 ms in a release build, 8 KiB about 14 ms.
const RAW_FACTOR: usize = 2;

/// Checks and sanitizes text content, returning the form to store and broadcast.
///
/// # Errors
/// `content_too_large` (stored form over `max_text_bytes`, or raw input over twice that),
/// `invalid_content` (a control character) or `empty_content` (nothing visible).
pub fn check_text(raw: &str, max_text_bytes: usize) -> Result<String, ContentError> {
    let too_large = || {
        ContentError::new(
            ContentErrorKind::ContentTooLarge,
            format!(
                "text content must be at most {max_text_bytes} bytes of UTF-8 once escaped \
                 (& < > \" ' count as their HTML escapes)"
            ),
        )
    };
    if raw.len() > max_text_bytes.saturating_mul(RAW_FACTOR) {
        return Err(too_large());
    }
    let text = apply_char_policy(raw)?;
    let html = sanitize_text(&text);
    // Decoded references can produce what the raw text could not carry (`&#x202E;`, `&#1;`).
    let html = match apply_char_policy(&html)? {
        Cow::Borrowed(_) => html,
        Cow::Owned(changed) => changed,
    };
    if html.chars().all(is_blank) {
        return Err(ContentError::new(
            ContentErrorKind::EmptyContent,
            "text content must contain something visible",
        ));
    }
    if html.len() > max_text_bytes {
        return Err(too_large());
    }
    Ok(html)
}

/// Normalizes line breaks, strips bidi controls and U+FEFF, and refuses other controls.
/// Borrows when nothing changes, which is the common case.
fn apply_char_policy(text: &str) -> Result<Cow<'_, str>, ContentError> {
    let mut changes = false;
    for c in text.chars() {
        if c == '\r' || is_stripped(c) {
            changes = true;
        } else if c.is_control() && c != '\n' && c != '\t' {
            return Err(ContentError::new(
                ContentErrorKind::InvalidContent,
                format!(
                    "text content must not contain control characters (found U+{:04X})",
                    u32::from(c)
                ),
            ));
        }
    }
    if !changes {
        return Ok(Cow::Borrowed(text));
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                chars.next_if_eq(&'\n');
                out.push('\n');
            }
            c if is_stripped(c) => {}
            c => out.push(c),
        }
    }
    Ok(Cow::Owned(out))
}

/// Bidi overrides, embeddings and isolates (the Trojan Source characters), and U+FEFF.
fn is_stripped(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

/// Whitespace or a Unicode `Default_Ignorable_Code_Point`: characters that draw nothing.
fn is_blank(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '\u{ad}'
                | '\u{34f}'
                | '\u{61c}'
                | '\u{115f}'..='\u{1160}'
                | '\u{17b4}'..='\u{17b5}'
                | '\u{180b}'..='\u{180f}'
                | '\u{200b}'..='\u{200f}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2060}'..='\u{206f}'
                | '\u{3164}'
                | '\u{fe00}'..='\u{fe0f}'
                | '\u{feff}'
                | '\u{ffa0}'
                | '\u{fff0}'..='\u{fff8}'
                | '\u{1bca0}'..='\u{1bca3}'
                | '\u{1d173}'..='\u{1d17a}'
                | '\u{e0000}'..='\u{e0fff}'
        )
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::content::sanitize::tests::{assert_safe, html_ish};

    const MAX: usize = 4096;

    fn code(raw: &str, max: usize) -> &'static str {
        check_text(raw, max).unwrap_err().code()
    }

    #[test]
    fn ordinary_text_is_escaped_not_mangled() {
        let cases = [
            ("<3", "&lt;3"),
            ("a < b & c", "a &lt; b &amp; c"),
            ("Tom & Jerry", "Tom &amp; Jerry"),
            (
                "\"quoted\" and 'single'",
                "&quot;quoted&quot; and &#39;single&#39;",
            ),
            ("x<y>z", "xz"),
            ("<b>hi</b>", "hi"),
            ("one\ntwo\r\nthree\rfour", "one\ntwo\nthree\nfour"),
            ("tab\there", "tab\there"),
            ("👩‍💻 ok", "👩‍💻 ok"),
            ("שלום, مرحبا", "שלום, مرحبا"),
            (
                "mixed \u{200f}עברית\u{200e} marks",
                "mixed \u{200f}עברית\u{200e} marks",
            ),
            ("  padded  ", "  padded  "),
        ];
        for (raw, expected) in cases {
            assert_eq!(check_text(raw, MAX).unwrap(), expected, "for {raw:?}");
        }
    }

    #[test]
    fn bidi_controls_are_stripped_even_when_encoded() {
        assert_eq!(
            check_text("abc\u{202e}fed\u{202c} \u{2067}x\u{2069}\u{feff}", MAX).unwrap(),
            "abcfed x"
        );
        assert_eq!(check_text("&#x202E;evil&#8236;", MAX).unwrap(), "evil");
        assert_eq!(check_text("a&#13;b", MAX).unwrap(), "a\nb");
    }

    #[test]
    fn control_characters_are_refused() {
        for raw in [
            "nul\0",
            "bell\u{7}",
            "esc\u{1b}[31m",
            "vt\u{b}",
            "ff\u{c}",
            "del\u{7f}",
            "c1\u{85}",
            "c1\u{9b}",
            "encoded &#1;",
            "encoded &#x7F;",
        ] {
            assert_eq!(code(raw, MAX), "invalid_content", "for {raw:?}");
        }
        let error = check_text("x\u{1}", MAX).unwrap_err();
        assert!(error.detail().contains("U+0001"), "{}", error.detail());
    }

    #[test]
    fn nothing_visible_is_empty() {
        for raw in [
            "",
            " ",
            "\n\t \n",
            "\u{202e}",
            "\u{200b}\u{200d}",
            "\u{3164}",
            "<b></b>",
            "<script>alert(1)</script>",
            "<!-- just a comment -->",
            "&#32;&nbsp;",
            "\u{a0}",
        ] {
            assert_eq!(code(raw, MAX), "empty_content", "for {raw:?}");
        }
    }

    #[test]
    fn the_cap_counts_stored_bytes() {
        // 4 bytes a character: fits at the cap, not over it.
        assert!(check_text(&"😀".repeat(4), 16).is_ok());
        assert_eq!(code(&"😀".repeat(5), 16), "content_too_large");
        // Two characters, but each stores as five bytes.
        assert_eq!(check_text("''", 10).unwrap(), "&#39;&#39;");
        assert_eq!(code("'''", 10), "content_too_large");
        // Markup that goes away does not count, up to twice the cap.
        let nested = format!("{}hi", "<b>".repeat(1000));
        assert_eq!(check_text("<b>hi</b>", 5).unwrap(), "hi");
        assert_eq!(check_text(&nested, 1501).unwrap(), "hi");
        // Over twice the cap: refused before parsing, though it would shrink.
        let error = check_text(&nested, 1500).unwrap_err();
        assert_eq!(error.code(), "content_too_large");
        assert!(!error.is_too_large());
        assert!(error.detail().contains("1500"));
    }

    #[test]
    fn the_xss_corpus_is_refused_or_made_safe() {
        for payload in crate::content::xss_corpus() {
            match check_text(&payload, MAX) {
                Ok(out) => assert_safe(&payload, &out),
                Err(error) => assert!(
                    matches!(error.code(), "invalid_content" | "empty_content"),
                    "{payload:?}: {error:?}"
                ),
            }
        }
    }

    fn assert_checked_text_is_safe_and_stable(raw: &str) {
        if let Ok(out) = check_text(raw, MAX) {
            assert_safe(raw, &out);
            assert!(out.len() <= MAX);
            assert!(
                !out.chars()
                    .any(|c| c == '\r' || is_stripped(c) || c == '\0')
            );
            assert_eq!(check_text(&out, MAX), Ok(out.clone()), "for {raw:?}");
        }
    }

    proptest! {
        #![proptest_config(crate::content::proptest_config(256))]

        #[test]
        fn checked_text_is_safe_and_stable(raw in any::<String>()) {
            assert_checked_text_is_safe_and_stable(&raw);
        }

        #[test]
        fn checked_html_like_text_is_safe_and_stable(raw in html_ish()) {
            assert_checked_text_is_safe_and_stable(&raw);
        }
    }
}
