//! How a bookmark becomes a JSONB value, and back.
//!
//! Most values are stored as themselves, so the table stays readable with
//! plain SQL. Two kinds of value cannot be, and are wrapped in an *envelope*,
//! a one-key object whose string member is the value's JSON text, in the
//! form the published 1.5.1 writes and reads:
//!
//! ```json
//! {"$faucet_nul_escaped_json": "{\"cursor\":\"a\\u0000b\"}"}
//! ```
//!
//! 1. Values holding U+0000 in any string or object key: JSONB rejects that
//!    code point, but its escaped form `\u0000` in the JSON text is ordinary
//!    characters.
//! 2. Objects that have a top-level member named like either envelope
//!    ([`ENVELOPE_KEY`], or [`EARLIER_ENVELOPE_KEY`] of this crate's releases
//!    before 1.6), so that a user value can never be mistaken for one.
//!
//! Decoding unwraps exactly the objects that have one member, named like
//! either envelope, holding a string. Because encoding wraps every object
//! with such a member (a superset), the mapping is one-to-one for rows this
//! crate writes. Rows are interchangeable with 1.5.1 both ways: 1.5.1 wraps
//! the values of rule 1 and the one-member objects of [`ENVELOPE_KEY`] with a
//! string, and unwraps the same shape this crate writes. The one row this
//! crate reads differently from 1.5.1: an object written by 1.5.1 whose only
//! member is [`EARLIER_ENVELOPE_KEY`] holding a string (1.5.1 stores it as
//! itself; this crate takes it for an envelope of its earlier releases).

use std::cell::RefCell;
use std::sync::Arc;

use serde_json::Value;
use serde_json::ser::{CharEscape, CompactFormatter, Formatter};

use crate::error::StoreError;

/// Name of the single member of an envelope object, as the published 1.5.1
/// writes it (since 1.6).
pub const ENVELOPE_KEY: &str = "$faucet_nul_escaped_json";

/// The envelope member this crate wrote before 1.6; still read, never
/// written.
pub const EARLIER_ENVELOPE_KEY: &str = "$faucet_state_encoded";

/// Whether `stored` (text made by [`encode`]) is an envelope.
pub(crate) fn is_envelope(stored: &str) -> bool {
    stored
        .strip_prefix("{\"")
        .and_then(|rest| rest.strip_prefix(ENVELOPE_KEY))
        .is_some_and(|rest| rest.starts_with("\":"))
}

/// Whether `key` names either envelope's member.
fn is_envelope_key(key: &str) -> bool {
    key == ENVELOPE_KEY || key == EARLIER_ENVELOPE_KEY
}

/// Deepest nesting of arrays and objects a value may have.
///
/// serde_json refuses to parse deeper documents (its recursion limit is 128),
/// so a deeper value could be written but never read back. Refusing it at
/// `put` also keeps every recursive walk of a stored value far from the end
/// of the stack.
pub const MAX_DEPTH: usize = 127;

/// Serializes `value` for storage, wrapping it in an envelope when needed.
///
/// Returns the JSON text to bind as the row's value; its length is what the
/// size limit measures.
pub(crate) fn encode(key: &str, value: &Value, max_bytes: usize) -> Result<String, StoreError> {
    let mut text = Vec::with_capacity(128);
    let has_nul = serialize_checked(key, value, &mut text)?;
    let text = String::from_utf8(text).map_err(|e| not_utf8(key, &e))?;
    Ok(enveloped_within_limit(key, value, &text, has_nul, max_bytes)?.unwrap_or(text))
}

/// [`encode`] into shared text, the form the cached store keeps. The usual
/// small value is serialized into a reused per-thread buffer and copied once
/// into its `Arc<str>`, instead of into a growing `String` that is then
/// copied and freed.
pub(crate) fn encode_shared(
    key: &str,
    value: &Value,
    max_bytes: usize,
) -> Result<Arc<str>, StoreError> {
    /// Larger buffers are not kept between calls.
    const KEEP_CAPACITY: usize = 64 * 1024;
    thread_local! {
        static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    BUFFER.with_borrow_mut(|buffer| {
        buffer.clear();
        let stored = serialize_checked(key, value, buffer).and_then(|has_nul| {
            let text = std::str::from_utf8(buffer).map_err(|e| not_utf8(key, &e))?;
            Ok(
                match enveloped_within_limit(key, value, text, has_nul, max_bytes)? {
                    Some(envelope) => Arc::from(envelope),
                    None => Arc::from(text),
                },
            )
        });
        if buffer.capacity() > KEEP_CAPACITY {
            *buffer = Vec::new();
        }
        stored
    })
}

/// Writes `value`'s compact JSON text (what `serde_json::to_writer` writes)
/// to `out` and says whether a string or an object key in it holds U+0000.
///
/// One pass: the formatter sees every escaped character and every level of
/// nesting, so the value is not walked a second time to check it. A value
/// nested deeper than [`MAX_DEPTH`] is refused as soon as serialization
/// reaches that depth, so the recursion never goes further.
fn serialize_checked(key: &str, value: &Value, out: &mut Vec<u8>) -> Result<bool, StoreError> {
    let mut seen = Seen::default();
    let mut serializer = serde_json::Serializer::with_formatter(out, Checking(&mut seen));
    match serde::Serialize::serialize(value, &mut serializer) {
        Ok(()) => Ok(seen.has_nul),
        Err(_) if seen.too_deep => Err(StoreError::ValueTooDeep {
            key: key.to_owned(),
            depth: depth_of(value),
            limit: MAX_DEPTH,
        }),
        Err(source) => Err(serialize_error(key, source)),
    }
}

/// What [`Checking`] noticed while the value was written.
#[derive(Default)]
struct Seen {
    depth: usize,
    too_deep: bool,
    has_nul: bool,
}

/// serde_json's compact output, watched: a NUL reaches the text only as the
/// escape `\u0000`, which serde_json writes through `write_char_escape`, and
/// every array and object opens with `begin_array` / `begin_object`.
struct Checking<'a>(&'a mut Seen);

impl Checking<'_> {
    fn enter(&mut self) -> std::io::Result<()> {
        self.0.depth += 1;
        if self.0.depth > MAX_DEPTH {
            self.0.too_deep = true;
            return Err(std::io::Error::other("the value nests too deeply"));
        }
        Ok(())
    }
}

impl Formatter for Checking<'_> {
    fn write_char_escape<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        escape: CharEscape,
    ) -> std::io::Result<()> {
        self.0.has_nul |= matches!(escape, CharEscape::AsciiControl(0));
        CompactFormatter.write_char_escape(writer, escape)
    }

    fn begin_array<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.enter()?;
        CompactFormatter.begin_array(writer)
    }

    fn end_array<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.0.depth -= 1;
        CompactFormatter.end_array(writer)
    }

    fn begin_object<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.enter()?;
        CompactFormatter.begin_object(writer)
    }

    fn end_object<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.0.depth -= 1;
        CompactFormatter.end_object(writer)
    }
}

/// What is stored for `value`, serialized as `text`: `Some` envelope when
/// the value needs one (see the module docs), `None` when `text` itself is
/// stored. Either way the stored text is within `max_bytes`.
fn enveloped_within_limit(
    key: &str,
    value: &Value,
    text: &str,
    has_nul: bool,
    max_bytes: usize,
) -> Result<Option<String>, StoreError> {
    let needs_envelope = has_nul
        || value
            .as_object()
            .is_some_and(|map| map.keys().any(|member| is_envelope_key(member)));
    if !needs_envelope {
        within_limit(key, text.len(), max_bytes)?;
        return Ok(None);
    }
    let mut envelope = serde_json::Map::with_capacity(1);
    envelope.insert(ENVELOPE_KEY.to_owned(), Value::String(text.to_owned()));
    let stored = serde_json::to_string(&Value::Object(envelope))
        .map_err(|source| serialize_error(key, source))?;
    within_limit(key, stored.len(), max_bytes)?;
    Ok(Some(stored))
}

fn within_limit(key: &str, size: usize, max_bytes: usize) -> Result<(), StoreError> {
    if size > max_bytes {
        return Err(StoreError::ValueTooLarge {
            key: key.to_owned(),
            size,
            limit: max_bytes,
        });
    }
    Ok(())
}

fn serialize_error(key: &str, source: serde_json::Error) -> StoreError {
    StoreError::Serialize {
        key: key.to_owned(),
        source,
    }
}

fn not_utf8(key: &str, error: &dyn std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key: key.to_owned(),
        table: String::new(),
        reason: format!("serde_json wrote text that is not UTF-8: {error}"),
    }
}

/// Turns the stored JSON text of a value back into the value that was put.
pub(crate) fn decode_text(key: &str, table: &str, stored: &str) -> Result<Value, StoreError> {
    let value = serde_json::from_str(stored).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        table: table.to_owned(),
        reason: format!("the stored JSON text does not parse: {e}"),
    })?;
    decode(key, table, value)
}

/// Turns a stored JSONB value back into the value that was put.
pub(crate) fn decode(key: &str, table: &str, stored: Value) -> Result<Value, StoreError> {
    let Value::Object(map) = &stored else {
        return Ok(stored);
    };
    let text = match map.iter().next() {
        Some((member, Value::String(text))) if map.len() == 1 && is_envelope_key(member) => text,
        _ => return Ok(stored),
    };
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        table: table.to_owned(),
        reason: format!("the envelope's JSON text does not parse: {e}"),
    })
}

/// How deeply `value` nests, counted without recursion: only a value
/// [`serialize_checked`] refused is measured, for the error to name.
fn depth_of(value: &Value) -> usize {
    let mut deepest = 0;
    let mut pending: Vec<(&Value, usize)> = vec![(value, 0)];
    while let Some((value, depth)) = pending.pop() {
        match value {
            Value::Array(items) => {
                deepest = deepest.max(depth + 1);
                pending.extend(items.iter().map(|v| (v, depth + 1)));
            }
            Value::Object(map) => {
                deepest = deepest.max(depth + 1);
                pending.extend(map.values().map(|v| (v, depth + 1)));
            }
            Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn round_trip(value: Value) -> Value {
        let text = encode("k", &value, usize::MAX).unwrap();
        assert!(!text.contains('\0'), "stored text holds a raw NUL");
        decode("k", "t", serde_json::from_str(&text).unwrap()).unwrap()
    }

    #[test]
    fn plain_values_are_stored_as_themselves() {
        let value = json!({"cursor": "abc", "n": [1, 2.5, null, true]});
        assert_eq!(encode("k", &value, usize::MAX).unwrap(), value.to_string());
        assert_eq!(round_trip(value.clone()), value);
    }

    #[test]
    fn nul_in_strings_and_keys_round_trips_through_an_envelope() {
        for value in [
            json!("a\u{0}b"),
            json!({"k\u{0}": 1}),
            json!([{"deep": ["x\u{0}"]}]),
        ] {
            let text = encode("k", &value, usize::MAX).unwrap();
            assert!(text.starts_with("{\"$faucet_nul_escaped_json\""), "{text}");
            assert_eq!(round_trip(value.clone()), value);
        }
    }

    #[test]
    fn user_objects_shaped_like_an_envelope_survive() {
        for key in [ENVELOPE_KEY, EARLIER_ENVELOPE_KEY] {
            for value in [
                json!({key: "[1,2]"}),
                json!({key: 5}),
                json!({key: "x", "other": 1}),
                json!({ENVELOPE_KEY: "[1]", EARLIER_ENVELOPE_KEY: "[2]"}),
            ] {
                assert_eq!(round_trip(value.clone()), value);
            }
        }
    }

    /// Issue 22, item 2: what this crate's releases before 1.6 wrote is
    /// still read; what 1.5.1 writes (its envelope) is read as 1.5.1 reads it.
    #[test]
    fn envelopes_of_earlier_releases_and_of_1_5_1_are_read() {
        let earlier = json!({EARLIER_ENVELOPE_KEY: "\"a\\u0000b\""});
        assert_eq!(decode("k", "t", earlier).unwrap(), json!("a\u{0}b"));
        let published = json!({"$faucet_nul_escaped_json": "\"a\\u0000b\""});
        assert_eq!(decode("k", "t", published).unwrap(), json!("a\u{0}b"));
    }

    #[test]
    fn size_limit_counts_the_stored_text() {
        let value = json!("x".repeat(100));
        let size = value.to_string().len();
        assert!(encode("k", &value, size).is_ok());
        let err = encode("big", &value, size - 1).unwrap_err().to_string();
        assert!(
            err.contains("'big'") && err.contains(&size.to_string()),
            "{err}"
        );
    }

    #[test]
    fn depth_limit_matches_what_serde_json_can_read_back() {
        let nest =
            |levels: usize| -> Value { (0..levels).fold(json!(1), |inner, _| json!([inner])) };
        let deepest = nest(MAX_DEPTH);
        let text = encode("k", &deepest, usize::MAX).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), deepest);
        let err = encode("k", &nest(MAX_DEPTH + 1), usize::MAX).unwrap_err();
        assert!(err.to_string().contains("nests 128 levels"), "{err}");
        assert!(serde_json::from_str::<Value>(&nest(MAX_DEPTH + 1).to_string()).is_err());
    }

    /// The refusal comes from the formatter at depth 128, before the
    /// serializer recurses further: encoding runs here on a 256 KiB stack,
    /// which 100,000 levels of recursion would overflow. (Building and
    /// dropping the value recurse, so they get a large stack of their own.)
    #[test]
    fn a_value_too_deep_is_refused_without_recursing_through_it() {
        let errors = std::thread::Builder::new()
            .stack_size(256 << 20)
            .spawn(|| {
                let deep = (0..100_000).fold(json!(0), |inner, _| Value::Array(vec![inner]));
                let errors = std::thread::scope(|scope| {
                    std::thread::Builder::new()
                        .stack_size(256 << 10)
                        .spawn_scoped(scope, || {
                            [
                                encode("k", &deep, usize::MAX).unwrap_err().to_string(),
                                encode_shared("k", &deep, usize::MAX)
                                    .unwrap_err()
                                    .to_string(),
                            ]
                        })
                        .unwrap()
                        .join()
                        .expect("encoding a deep value overflowed a 256 KiB stack")
                });
                drop(deep);
                errors
            })
            .unwrap()
            .join()
            .unwrap();
        for error in errors {
            assert!(error.contains("nests 100000 levels"), "{error}");
        }
    }

    #[test]
    fn stored_text_decodes_to_the_value_that_was_put() {
        let cases = [
            json!({"a": "b"}),
            json!("nul\u{0}".repeat(3)),
            json!({ENVELOPE_KEY: "y"}),
            json!([1, 2.5, null, true]),
        ];
        for value in cases {
            let text = encode("k", &value, usize::MAX).unwrap();
            assert_eq!(decode_text("k", "tab", &text).unwrap(), value);
        }
        let err = decode_text("key1", "tab", "{not json").unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("key1") && message.contains("tab"),
            "{message}"
        );
    }

    #[test]
    fn shared_encoding_is_the_same_text_with_the_same_errors() {
        let deep = (0..MAX_DEPTH + 1).fold(json!(1), |inner, _| json!([inner]));
        let limit_deep = (0..MAX_DEPTH).fold(json!(1), |inner, _| json!([inner]));
        let cases = [
            json!({"lsn": "0/16B3748", "ts": 1}),
            json!("x".repeat(100_000)),
            json!("nul\u{0}"),
            json!({ENVELOPE_KEY: "y"}),
            limit_deep,
            deep,
        ];
        for value in cases {
            for limit in [10, 60, usize::MAX] {
                let plain = encode("k", &value, limit).map_err(|e| e.to_string());
                let shared = encode_shared("k", &value, limit)
                    .map(|text| text.to_string())
                    .map_err(|e| e.to_string());
                assert_eq!(shared, plain, "at limit {limit}");
            }
        }
    }

    #[test]
    fn corrupt_envelope_is_reported_with_key_and_table() {
        let err = decode("key1", "tab", json!({ENVELOPE_KEY: "{not json"})).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("key1") && msg.contains("tab"), "{msg}");
    }
}
