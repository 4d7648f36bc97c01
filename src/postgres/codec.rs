//! How a bookmark becomes a JSONB value, and back.
//!
//! Most values are stored as themselves, so the table stays readable with
//! plain SQL. Two kinds of value cannot be, and are wrapped in an *envelope*,
//! a one-key object whose string member is the value's JSON text:
//!
//! ```json
//! {"$faucet_state_encoded": "{\"cursor\":\"a\\u0000b\"}"}
//! ```
//!
//! 1. Values holding U+0000 in any string or object key: JSONB rejects that
//!    code point, but its escaped form `\u0000` in the JSON text is ordinary
//!    characters.
//! 2. Objects that already have a top-level `$faucet_state_encoded` member, so
//!    that a user value can never be mistaken for an envelope.
//!
//! Decoding unwraps exactly the objects that have one member, named
//! `$faucet_state_encoded`, holding a string. Because encoding wraps every
//! object with that member (a superset), the mapping is one-to-one.

use std::cell::RefCell;
use std::sync::Arc;

use serde_json::Value;

use crate::error::StoreError;

/// Name of the single member of an envelope object.
pub const ENVELOPE_KEY: &str = "$faucet_state_encoded";

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
    let shape = checked_shape(key, value)?;
    encode_shaped(key, value, &shape, max_bytes)
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
    let shape = checked_shape(key, value)?;
    if needs_envelope(value, &shape) {
        return encode_shaped(key, value, &shape, max_bytes).map(Arc::from);
    }
    BUFFER.with_borrow_mut(|buffer| {
        buffer.clear();
        let written = serde_json::to_writer(&mut *buffer, value)
            .map_err(|source| serialize_error(key, source))
            .and_then(|()| within_limit(key, buffer.len(), max_bytes))
            .and_then(|()| {
                std::str::from_utf8(buffer)
                    .map(Arc::from)
                    .map_err(|e| StoreError::Corrupt {
                        key: key.to_owned(),
                        table: String::new(),
                        reason: format!("serde_json wrote text that is not UTF-8: {e}"),
                    })
            });
        if buffer.capacity() > KEEP_CAPACITY {
            *buffer = Vec::new();
        }
        written
    })
}

/// The value's shape, once it is known not to be nested too deeply.
fn checked_shape(key: &str, value: &Value) -> Result<Shape, StoreError> {
    let shape = inspect(value);
    if shape.depth > MAX_DEPTH {
        return Err(StoreError::ValueTooDeep {
            key: key.to_owned(),
            depth: shape.depth,
            limit: MAX_DEPTH,
        });
    }
    Ok(shape)
}

fn needs_envelope(value: &Value, shape: &Shape) -> bool {
    shape.has_nul
        || value
            .as_object()
            .is_some_and(|map| map.contains_key(ENVELOPE_KEY))
}

fn encode_shaped(
    key: &str,
    value: &Value,
    shape: &Shape,
    max_bytes: usize,
) -> Result<String, StoreError> {
    let text = serde_json::to_string(value).map_err(|source| serialize_error(key, source))?;
    let stored = if needs_envelope(value, shape) {
        let mut envelope = serde_json::Map::with_capacity(1);
        envelope.insert(ENVELOPE_KEY.to_owned(), Value::String(text));
        serde_json::to_string(&Value::Object(envelope))
            .map_err(|source| serialize_error(key, source))?
    } else {
        text
    };
    within_limit(key, stored.len(), max_bytes)?;
    Ok(stored)
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
    let text = match map.get(ENVELOPE_KEY) {
        Some(Value::String(text)) if map.len() == 1 => text,
        _ => return Ok(stored),
    };
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        table: table.to_owned(),
        reason: format!("the envelope's JSON text does not parse: {e}"),
    })
}

struct Shape {
    depth: usize,
    has_nul: bool,
}

/// Measures nesting depth and looks for U+0000, without recursion, so that a
/// pathologically deep value cannot overflow the stack here.
fn inspect(value: &Value) -> Shape {
    let mut shape = Shape {
        depth: 0,
        has_nul: false,
    };
    if inspect_shallow(value, 0, &mut shape) {
        return shape;
    }
    inspect_deep(value)
}

/// The usual case, without allocating: recursion that stops, returning
/// `false`, below [`MAX_DEPTH`] levels, so it cannot run out of stack.
fn inspect_shallow(value: &Value, depth: usize, shape: &mut Shape) -> bool {
    match value {
        Value::String(s) => shape.has_nul |= s.contains('\0'),
        Value::Array(items) => {
            if depth >= MAX_DEPTH {
                return false;
            }
            shape.depth = shape.depth.max(depth + 1);
            return items
                .iter()
                .all(|item| inspect_shallow(item, depth + 1, shape));
        }
        Value::Object(map) => {
            if depth >= MAX_DEPTH {
                return false;
            }
            shape.depth = shape.depth.max(depth + 1);
            return map.iter().all(|(k, v)| {
                shape.has_nul |= k.contains('\0');
                inspect_shallow(v, depth + 1, shape)
            });
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
    true
}

/// Any depth, iteratively, for a value too deep for [`inspect_shallow`]:
/// its exact depth goes into the error.
fn inspect_deep(value: &Value) -> Shape {
    let mut shape = Shape {
        depth: 0,
        has_nul: false,
    };
    let mut pending: Vec<(&Value, usize)> = vec![(value, 0)];
    while let Some((value, depth)) = pending.pop() {
        match value {
            Value::String(s) => shape.has_nul |= s.contains('\0'),
            Value::Array(items) => {
                shape.depth = shape.depth.max(depth + 1);
                pending.extend(items.iter().map(|v| (v, depth + 1)));
            }
            Value::Object(map) => {
                shape.depth = shape.depth.max(depth + 1);
                for (k, v) in map {
                    shape.has_nul |= k.contains('\0');
                    pending.push((v, depth + 1));
                }
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
    shape
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
            assert!(text.starts_with("{\"$faucet_state_encoded\""), "{text}");
            assert_eq!(round_trip(value.clone()), value);
        }
    }

    #[test]
    fn user_objects_shaped_like_an_envelope_survive() {
        for value in [
            json!({ENVELOPE_KEY: "[1,2]"}),
            json!({ENVELOPE_KEY: 5}),
            json!({ENVELOPE_KEY: "x", "other": 1}),
        ] {
            assert_eq!(round_trip(value.clone()), value);
        }
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
