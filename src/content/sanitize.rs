//! The one place that calls ammonia: any string in, an HTML text fragment with no elements
//! out.
//!
//! Sanitizing is idempotent even with quotes escaped after ammonia. Ammonia writes some
//! text `t` with `&`, `<`, `>` and U+00A0 escaped; escaping `"` and `'` too leaves a string
//! with no `<` in which every `&` starts `&amp;`, `&lt;`, `&gt;`, `&quot;` or `&#39;`.
//! Parsing that string gives back `t` exactly, so the next pass writes the same string. The
//! parser's own rewrites (NUL dropped, `\r` normalized, a leading U+FEFF dropped) happen in
//! the first pass, or, where a decoded reference brings the character back, are applied by
//! `finish_escaping`. The property tests check this.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use ammonia::{Builder, UrlRelative};

/// No tags, no attributes, no URL schemes, no comments; `script` and `style` go with their
/// content. Built once: a `Builder` is `Sync` but costs several hash sets to make.
static TEXT_ONLY: LazyLock<Builder<'static>> = LazyLock::new(|| {
    let mut builder = Builder::empty();
    builder
        .tags(HashSet::new())
        .tag_attributes(HashMap::new())
        .generic_attributes(HashSet::new())
        .url_schemes(HashSet::new())
        .url_relative(UrlRelative::Deny)
        .link_rel(None)
        .strip_comments(true)
        .clean_content_tags(HashSet::from(["script", "style"]));
    builder
});

/// Turns `raw` into HTML-safe text with no elements: tags are dropped (their text kept),
/// `script`/`style` are dropped with their content, and `& < > " '` are escaped.
///
/// Pure and idempotent: `sanitize_text(&sanitize_text(x)) == sanitize_text(x)`. It applies no
/// character policy; [`check_text`](super::check_text) does.
#[must_use]
pub fn sanitize_text(raw: &str) -> String {
    let html = TEXT_ONLY.clean(raw).to_string();
    finish_escaping(&html)
}

/// Escapes what html5ever leaves alone in text so the result is also safe in a quoted
/// attribute. `&#39;` rather than `&apos;`, which HTML 4 lacks.
///
/// The serializer's `&nbsp;` goes back to the character: it is not special in HTML, and
/// clients then have five references to decode, not six. The match is exact because every
/// `&` the serializer writes starts an escape, so `&nbsp;` cannot be the tail of `&amp;nbsp;`.
///
/// Two characters that only a decoded reference can put here are changed the way the next
/// parse would change them: `&#13;` gives `\r`, normalized like a raw one (`\r\n` and a
/// lone `\r` become `\n`), and `&#xFEFF;` gives U+FEFF, dropped because a parser drops it
/// at the very start of its input.
fn finish_escaping(html: &str) -> String {
    let html = html.replace("&nbsp;", "\u{a0}");
    let mut out = String::with_capacity(html.len());
    let mut chars = html.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\r' => {
                chars.next_if_eq(&'\n');
                out.push('\n');
            }
            '\u{feff}' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
pub(super) mod tests {
    use proptest::prelude::*;

    use super::*;

    /// What must hold for any output, whatever the input.
    pub(in crate::content) fn assert_safe(input: &str, out: &str) {
        for forbidden in ['<', '>', '"', '\'', '\0', '\u{feff}'] {
            assert!(
                !out.contains(forbidden),
                "{forbidden:?} in {out:?} (from {input:?})"
            );
        }
        let mut rest = out;
        while let Some(i) = rest.find('&') {
            rest = &rest[i..];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;"]
                    .iter()
                    .any(|entity| rest.starts_with(entity)),
                "bare & in {out:?} (from {input:?})"
            );
            rest = &rest[1..];
        }
        // The tokenizer finds no tag, comment or doctype in it.
        assert!(!ammonia::is_html(out), "markup in {out:?} (from {input:?})");
        assert_eq!(sanitize_text(out), out, "not idempotent for {input:?}");
    }

    #[test]
    fn the_xss_corpus_leaves_no_markup() {
        let corpus = crate::content::xss_corpus();
        assert!(corpus.len() >= 60, "only {} payloads", corpus.len());
        for payload in &corpus {
            assert_safe(payload, &sanitize_text(payload));
        }
    }

    #[test]
    fn ordinary_text_reads_as_expected() {
        let cases = [
            ("hello", "hello"),
            ("<3", "&lt;3"),
            ("a < b", "a &lt; b"),
            ("a < b & c", "a &lt; b &amp; c"),
            ("a > b", "a &gt; b"),
            ("Tom & Jerry", "Tom &amp; Jerry"),
            ("\"quoted\"", "&quot;quoted&quot;"),
            ("it's", "it&#39;s"),
            ("x<y>z", "xz"),
            ("<b>hi</b>", "hi"),
            ("<script>alert(1)</script>after", "after"),
            ("<style>p{}</style>text", "text"),
            ("a<!-- hidden -->b", "ab"),
            (
                "line one\nline two\n\tindented",
                "line one\nline two\n\tindented",
            ),
            ("&amp; &lt;", "&amp; &lt;"),
            ("&quot;&#39;&#x27;", "&quot;&#39;&#39;"),
            ("no\u{a0}break", "no\u{a0}break"),
            ("&nbsp;", "\u{a0}"),
            ("&amp;nbsp;", "&amp;nbsp;"),
            ("1 <= 2", "1 &lt;= 2"),
        ];
        for (input, expected) in cases {
            assert_eq!(sanitize_text(input), expected, "for {input:?}");
        }
    }

    #[test]
    fn scripts_of_the_world_pass_unchanged() {
        for text in [
            "👨‍👩‍👧‍👦 family, 👍🏽 thumbs, 🏳️‍🌈 flag",
            "🏴\u{e0067}\u{e0062}\u{e0065}\u{e006e}\u{e0067}\u{e007f} England",
            "日本語のテキスト、中文文本、한국어",
            "مرحبا بالعالم",
            "שלום עולם",
            "नमस्ते दुनिया",
            "می\u{200c}خواهم",
            "Ελληνικά, кириллица, ไทย",
        ] {
            assert_eq!(sanitize_text(text), text);
        }
    }

    #[test]
    fn parser_rewrites_are_already_applied_once() {
        assert_eq!(sanitize_text("a\r\nb\rc"), "a\nb\nc");
        assert_eq!(sanitize_text("a\0b"), "ab");
        assert_eq!(sanitize_text("\u{feff}a\u{feff}b"), "ab");
        assert_eq!(sanitize_text("&#xFEFF;a"), "a");
        assert_eq!(sanitize_text("&#x202E;"), "\u{202e}");
        assert_eq!(sanitize_text("a&#13;b&#13;\nc&#xD;&#xA;d"), "a\nb\nc\nd");
    }

    /// Fragments that exercise tags, references and the parser's rewrites.
    pub(in crate::content) fn html_ish() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("<"),
            Just(">"),
            Just("</"),
            Just("&"),
            Just(";"),
            Just("#"),
            Just("x"),
            Just("&amp;"),
            Just("&lt;"),
            Just("&gt;"),
            Just("&quot;"),
            Just("&#39;"),
            Just("&nbsp;"),
            Just("&#xFEFF;"),
            Just("&#13;"),
            Just("&#0;"),
            Just("&#128;"),
            Just("&#x81;"),
            Just("&#x0c;"),
            Just("&#65279;"),
            Just("&#xD800;"),
            Just("&#x110000;"),
            Just("\u{c}"),
            Just("pre"),
            Just("&amp"),
            Just("\""),
            Just("'"),
            Just("="),
            Just(" "),
            Just("\n"),
            Just("\r"),
            Just("\0"),
            Just("\u{feff}"),
            Just("\u{a0}"),
            Just("\u{202e}"),
            Just("b"),
            Just("script"),
            Just("style"),
            Just("svg"),
            Just("math"),
            Just("textarea"),
            Just("plaintext"),
            Just("!--"),
            Just("--"),
            Just("<![CDATA["),
            Just("]]>"),
            Just("?"),
            Just("a"),
            Just("é"),
            Just("👍"),
        ];
        prop::collection::vec(piece, 0..24).prop_map(|pieces| pieces.concat())
    }

    proptest! {
        #![proptest_config(crate::content::proptest_config(256))]

        #[test]
        fn any_string_sanitizes_safely(input in any::<String>()) {
            let out = sanitize_text(&input);
            assert_safe(&input, &out);
        }

        #[test]
        fn html_like_strings_sanitize_safely(input in html_ish()) {
            let out = sanitize_text(&input);
            assert_safe(&input, &out);
        }
    }
}
