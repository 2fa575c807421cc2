//! Making a stranger's JSON safe to store: what PostgreSQL or serde_json would refuse.
//!
//! Anyone who can message a connected account chooses part of every delivery: the text,
//! their display name, attachment names, sometimes keys of raw provider fields. Two
//! things in such input fail later, far from the webhook that brought them:
//!
//! - U+0000. It is valid JSON (`\u0000`) and valid UTF-8, but PostgreSQL's `text` and
//!   `jsonb` refuse it (SQLSTATE 22P05 / 22021). [`scrub`] replaces it, in every string
//!   and every key, with U+FFFD REPLACEMENT CHARACTER, so the message is stored and
//!   delivered like any other and the reader sees that something was there.
//! - JSON that serde_json refuses although a lenient reader would not: invalid UTF-8,
//!   escaped lone surrogates (`"\ud800"`), raw control characters inside strings, and
//!   numbers too large for an `f64` (`1e400`). [`parse`] first tries the strict parser
//!   (the fast path: real deliveries take it) and only on failure repairs those four
//!   and tries again. Each repair keeps the content readable: U+FFFD for what cannot be
//!   decoded, the number's literal as a string.
//!
//! What still does not parse (truncated bodies, nesting deeper than 128) is not JSON;
//! the caller dead-letters it with its raw bytes.

use std::borrow::Cow;

use serde_json::Value;

/// What replaces U+0000 and undecodable input.
pub const REPLACEMENT: char = char::REPLACEMENT_CHARACTER;

/// Parses a JSON body, repairing what a strict parser refuses but a reader would not,
/// and scrubs U+0000 from the result. Returns the value and whether anything was
/// changed; on failure, the strict parser's error.
pub fn parse(body: &[u8]) -> Result<(Value, bool), serde_json::Error> {
    let (mut value, repaired) = match serde_json::from_slice::<Value>(body) {
        Ok(value) => (value, false),
        Err(strict) => match repair(body) {
            Some(fixed) => (serde_json::from_slice(&fixed).map_err(|_| strict)?, true),
            None => return Err(strict),
        },
    };
    let scrubbed = scrub(&mut value);
    Ok((value, repaired || scrubbed))
}

/// Replaces U+0000 in every string and key of `value`; `true` if there was any.
pub fn scrub(value: &mut Value) -> bool {
    match value {
        Value::String(s) => scrub_str(s),
        Value::Array(items) => items.iter_mut().fold(false, |any, v| scrub(v) | any),
        Value::Object(map) => {
            let mut any = false;
            if map.keys().any(|k| k.contains('\0')) {
                let entries = std::mem::take(map);
                for (mut key, v) in entries {
                    scrub_str(&mut key);
                    map.insert(key, v);
                }
                any = true;
            }
            map.values_mut().fold(any, |any, v| scrub(v) | any)
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

/// Replaces U+0000 in `s`; `true` if there was any.
pub fn scrub_str(s: &mut String) -> bool {
    if s.contains('\0') {
        *s = s.replace('\0', REPLACEMENT.encode_utf8(&mut [0; 4]));
        true
    } else {
        false
    }
}

/// A copy of `s` without U+0000, borrowed when there is none.
pub fn scrubbed(s: &str) -> Cow<'_, str> {
    if s.contains('\0') { Cow::Owned(s.replace('\0', "\u{fffd}")) } else { Cow::Borrowed(s) }
}

/// Rewrites `body` so that serde_json accepts what it refused for one of the four
/// repairable reasons; `None` when nothing needed repair (the failure is elsewhere).
fn repair(body: &[u8]) -> Option<Vec<u8>> {
    let text = String::from_utf8_lossy(body);
    let mut changed = matches!(text, Cow::Owned(_));
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len() + 16);
    let mut i = 0;
    let mut in_string = false;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            match b {
                b'"' => {
                    in_string = false;
                    out.push(b);
                    i += 1;
                }
                b'\\' if bytes.get(i + 1) == Some(&b'u') => {
                    let (consumed, fixed) = unicode_escape(&bytes[i..]);
                    changed |= fixed.is_some();
                    match fixed {
                        Some(replacement) => out.extend_from_slice(replacement.as_bytes()),
                        None => out.extend_from_slice(&bytes[i..i + consumed]),
                    }
                    i += consumed;
                }
                b'\\' => {
                    // Any other escape: copy it and the escaped byte as they are.
                    let end = (i + 2).min(bytes.len());
                    out.extend_from_slice(&bytes[i..end]);
                    i = end;
                }
                0x00..=0x1f => {
                    // A raw control character: the escaped form of the same character
                    // (U+0000 becomes U+FFFD, as everywhere else).
                    let escaped = if b == 0 { "\\ufffd".to_owned() } else { format!("\\u{b:04x}") };
                    out.extend_from_slice(escaped.as_bytes());
                    changed = true;
                    i += 1;
                }
                _ => {
                    out.push(b);
                    i += 1;
                }
            }
        } else {
            match b {
                b'"' => {
                    in_string = true;
                    out.push(b);
                    i += 1;
                }
                b'-' | b'0'..=b'9' => {
                    let end = i + number_len(&bytes[i..]);
                    let literal = &bytes[i..end];
                    let overflows = std::str::from_utf8(literal)
                        .ok()
                        .and_then(|s| s.parse::<f64>().ok())
                        .is_some_and(|f| f.is_infinite());
                    if overflows {
                        out.push(b'"');
                        out.extend_from_slice(literal);
                        out.push(b'"');
                        changed = true;
                    } else {
                        out.extend_from_slice(literal);
                    }
                    i = end;
                }
                _ => {
                    out.push(b);
                    i += 1;
                }
            }
        }
    }
    changed.then_some(out)
}

/// The length of the number literal at the start of `bytes` (at least 1).
fn number_len(bytes: &[u8]) -> usize {
    let len = bytes
        .iter()
        .enumerate()
        .take_while(|&(i, &b)| {
            b.is_ascii_digit()
                || matches!(b, b'.' | b'e' | b'E')
                || (matches!(b, b'-' | b'+') && (i == 0 || matches!(bytes[i - 1], b'e' | b'E')))
        })
        .count();
    len.max(1)
}

/// Reads the `\uXXXX` escape (and a following low surrogate) at the start of `bytes`:
/// how many bytes it spans, and its replacement when it is a lone surrogate.
fn unicode_escape(bytes: &[u8]) -> (usize, Option<&'static str>) {
    let Some(unit) = hex4(bytes.get(2..6)) else {
        // Malformed: leave it to the parser to refuse.
        return (2.min(bytes.len()), None);
    };
    match unit {
        0xD800..=0xDBFF => match bytes.get(6..8) {
            Some(b"\\u") if hex4(bytes.get(8..12)).is_some_and(|low| (0xDC00..=0xDFFF).contains(&low)) => {
                (12, None)
            }
            _ => (6, Some("\\ufffd")),
        },
        0xDC00..=0xDFFF => (6, Some("\\ufffd")),
        _ => (6, None),
    }
}

fn hex4(digits: Option<&[u8]>) -> Option<u16> {
    let digits = std::str::from_utf8(digits?).ok()?;
    u16::from_str_radix(digits, 16)
        .ok()
        .filter(|_| digits.len() == 4 && digits.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn parsed(body: &[u8]) -> Value {
        parse(body).expect("repairable").0
    }

    #[test]
    fn clean_json_takes_the_fast_path_unchanged() {
        let body = br#"{"message":"hello","n":[1,2.5,-3e2],"o":{"k":"\u00e9\ud83d\ude00"}}"#;
        let (value, changed) = parse(body).unwrap();
        assert!(!changed);
        assert_eq!(value, serde_json::from_slice::<Value>(body).unwrap());
    }

    #[test]
    fn nul_is_replaced_in_strings_and_keys_at_any_depth() {
        let (value, changed) = parse(br#"{"a\u0000b":["x\u0000",{"k":"\u0000"}]}"#).unwrap();
        assert!(changed);
        assert_eq!(value, json!({"a\u{fffd}b": ["x\u{fffd}", {"k": "\u{fffd}"}]}));
    }

    #[test]
    fn lone_surrogates_become_replacement_characters_and_pairs_stay() {
        assert_eq!(parsed(br#"{"t":"a\ud800b"}"#), json!({"t": "a\u{fffd}b"}));
        assert_eq!(parsed(br#"{"t":"\udc00"}"#), json!({"t": "\u{fffd}"}));
        assert_eq!(
            parsed(br#"{"t":"\ud800\u0041","p":"\ud83d\ude00"}"#),
            json!({"t": "\u{fffd}A", "p": "😀"})
        );
        assert_eq!(
            parsed(br#"{"t":"\\ud800"}"#),
            json!({"t": "\\ud800"}),
            "an escaped backslash is not an escape"
        );
    }

    #[test]
    fn invalid_utf8_and_raw_control_characters_are_repaired() {
        assert_eq!(parsed(b"{\"t\":\"a\xffb\"}"), json!({"t": "a\u{fffd}b"}));
        assert_eq!(parsed(b"{\"t\":\"a\x01\x00b\"}"), json!({"t": "a\u{1}\u{fffd}b"}));
    }

    #[test]
    fn numbers_too_large_for_f64_are_kept_as_their_literal() {
        assert_eq!(
            parsed(br#"{"n":1e400,"m":-2E+999,"ok":1.5}"#),
            json!({"n": "1e400", "m": "-2E+999", "ok": 1.5})
        );
        assert_eq!(
            parsed(br#"{"s":"1e400 stays", "n":[1e400]}"#),
            json!({"s": "1e400 stays", "n": ["1e400"]})
        );
    }

    #[test]
    fn what_is_not_json_stays_an_error() {
        for body in [&b"{\"t\":"[..], b"not json", b"{\"t\":\"\\uZZZZ\"}", b""] {
            assert!(parse(body).is_err(), "{:?}", String::from_utf8_lossy(body));
        }
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(parse(deep.as_bytes()).is_err(), "nesting deeper than serde_json allows");
    }

    /// Strings with anything a stranger could type or a broken client could send.
    fn hostile_string() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![
                any::<char>().prop_map(String::from),
                Just("\0".to_owned()),
                (0u8..0x20).prop_map(|b| char::from(b).to_string()),
                Just("\u{fffd}".to_owned()),
            ],
            0..12,
        )
        .prop_map(|parts| parts.concat())
    }

    proptest! {
        /// Whatever a serialized value holds, parsing gives it back with U+0000 replaced
        /// and nothing PostgreSQL would refuse.
        #[test]
        fn any_serialized_value_parses_back_scrubbed(key in hostile_string(), text in hostile_string()) {
            let original = json!({ key.clone(): text.clone(), "list": [text.clone(), 1, null] });
            let (value, _) = parse(original.to_string().as_bytes()).unwrap();
            let serialized = value.to_string();
            prop_assert!(!serialized.contains("\\u0000"));
            let expected_text = text.replace('\0', "\u{fffd}");
            prop_assert_eq!(&value[key.replace('\0', "\u{fffd}")], &json!(expected_text));
        }

        /// Escaped surrogates in any arrangement never make a body unparseable.
        #[test]
        fn escaped_surrogates_always_parse(units in prop::collection::vec(0xD7F0u16..0xE010, 0..8)) {
            let escapes: String = units.iter().map(|u| format!("\\u{u:04x}")).collect();
            let body = format!("{{\"t\":\"{escapes}\"}}");
            prop_assert!(parse(body.as_bytes()).is_ok(), "{}", body);
        }

        /// Arbitrary bytes inside a string literal never make a body unparseable, unless
        /// they end it early or start an escape the parser cannot read.
        #[test]
        fn arbitrary_bytes_in_a_string_parse(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let inner: Vec<u8> = bytes.into_iter().filter(|b| *b != b'"' && *b != b'\\').collect();
            let mut body = b"{\"t\":\"".to_vec();
            body.extend_from_slice(&inner);
            body.extend_from_slice(b"\"}");
            let (value, _) = parse(&body).unwrap();
            prop_assert!(!value.to_string().contains("\\u0000"));
        }
    }
}
