//! Deserializers for the field types Unipile sends loosely.
//!
//! Real deliveries carry booleans as `true`, `"true"`, `1` or `"1"`, numbers as strings,
//! `attachments` as one object or a list, and `null` where a value was expected. These
//! helpers accept all of that and never fail on a shape they can make sense of, so that
//! one odd field does not send a whole message to the dead-letter table.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// A boolean that may arrive as a JSON bool, a number (`0`/`1`) or a string
/// (`"true"`, `"false"`, `"1"`, `"0"`, `"yes"`, `"no"`). `null`, a missing field and
/// anything unrecognised read as `false`.
pub fn bool<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    Ok(value_as_bool(&Value::deserialize(deserializer)?).unwrap_or(false))
}

/// Like [`bool()`] but keeps "absent or unrecognised" apart from `false`.
pub fn opt_bool<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<bool>, D::Error> {
    Ok(value_as_bool(&Value::deserialize(deserializer)?))
}

fn value_as_bool(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => n.as_f64().map(|f| f != 0.0),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Some(true),
            "false" | "0" | "no" | "" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// A string that may arrive as a number, or as an empty string meaning "none".
pub fn opt_string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(deserializer)? {
        Value::String(s) if s.is_empty() => None,
        Value::String(s) => Some(s),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    })
}

/// An integer that may arrive as a number or a numeric string.
pub fn opt_i64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    Ok(match Value::deserialize(deserializer)? {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    })
}

/// The longest id the relay stores, in bytes. Ids are primary keys: PostgreSQL's btree
/// refuses index rows past about 2.7 KB, and real ids are well under 100 bytes.
pub const MAX_ID_BYTES: usize = 255;

/// The word that names an over-long id in errors and dead-letter reasons.
pub const ID_TOO_LONG: &str = "id_too_long";

/// An identifier: a non-empty string (numbers are accepted and turned into strings) of
/// at most [`MAX_ID_BYTES`].
pub fn id<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    match opt_string(deserializer)? {
        Some(id) if id.len() > MAX_ID_BYTES => Err(serde::de::Error::custom(format!(
            "{ID_TOO_LONG}: an id may be at most {MAX_ID_BYTES} bytes, this one has {}",
            id.len()
        ))),
        Some(id) if !id.trim().is_empty() => Ok(id),
        _ => Err(serde::de::Error::custom("an id must be a non-empty string")),
    }
}

/// A timestamp as RFC 3339 text or as epoch milliseconds (number or numeric string);
/// anything else, and any time outside the years 1970 to 9999, reads as absent (the
/// caller substitutes the time it received the delivery).
pub fn opt_timestamp<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    let time = match Value::deserialize(deserializer)? {
        Value::String(s) => DateTime::parse_from_rfc3339(s.trim())
            .map(|t| t.with_timezone(&Utc))
            .ok()
            .or_else(|| s.trim().parse::<i64>().ok().and_then(DateTime::from_timestamp_millis)),
        Value::Number(n) => n.as_i64().and_then(DateTime::from_timestamp_millis),
        _ => None,
    };
    Ok(time.filter(is_storable))
}

/// Whether a time lies in the years the relay stores (1970 to 9999).
pub fn is_storable(time: &DateTime<Utc>) -> bool {
    use chrono::Datelike;
    (1970..=9999).contains(&time.year())
}

/// A list that may arrive as one bare object, a list, or `null`.
pub fn one_or_many<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Value>, D::Error> {
    Ok(match Value::deserialize(deserializer)? {
        Value::Null => Vec::new(),
        Value::Array(items) => items.into_iter().filter(|v| !v.is_null()).collect(),
        other => vec![other],
    })
}

/// A list of typed items that may arrive as one bare item, a list, or `null`; items
/// that do not fit the type are dropped rather than failing the whole payload.
pub fn lenient_list<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    Ok(one_or_many(deserializer)?.into_iter().filter_map(|v| serde_json::from_value(v).ok()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Deserialize)]
    struct Probe {
        #[serde(default, deserialize_with = "bool")]
        flag: bool,
        #[serde(default, deserialize_with = "opt_string")]
        text: Option<String>,
        #[serde(default, deserialize_with = "opt_i64")]
        number: Option<i64>,
        #[serde(default, deserialize_with = "one_or_many")]
        list: Vec<Value>,
    }

    fn probe(v: Value) -> Probe {
        serde_json::from_value(v).expect("lenient fields never fail")
    }

    #[test]
    fn booleans_are_read_from_strings_numbers_and_bools() {
        for truthy in [json!(true), json!("true"), json!("1"), json!(1), json!("TRUE")] {
            assert!(probe(json!({ "flag": truthy })).flag, "{truthy} should be true");
        }
        for falsy in [json!(false), json!("false"), json!("0"), json!(0), json!(null), json!("")] {
            assert!(!probe(json!({ "flag": falsy })).flag, "{falsy} should be false");
        }
        assert!(!probe(json!({})).flag, "a missing flag reads as false");
    }

    #[test]
    fn numbers_may_be_strings() {
        assert_eq!(probe(json!({"number": "720"})).number, Some(720));
        assert_eq!(probe(json!({"number": 720})).number, Some(720));
        assert_eq!(probe(json!({"number": "wide"})).number, None);
    }

    #[test]
    fn strings_may_be_numbers_and_empty_means_none() {
        assert_eq!(probe(json!({"text": 42})).text.as_deref(), Some("42"));
        assert_eq!(probe(json!({"text": ""})).text, None);
        assert_eq!(probe(json!({"text": null})).text, None);
    }

    #[derive(Deserialize)]
    struct Ids {
        #[serde(deserialize_with = "id")]
        id: String,
        #[serde(default, deserialize_with = "opt_timestamp")]
        at: Option<DateTime<Utc>>,
    }

    #[test]
    fn ids_longer_than_the_limit_are_refused_by_name() {
        let ok: Ids = serde_json::from_value(json!({"id": "a".repeat(MAX_ID_BYTES)})).unwrap();
        assert_eq!(ok.id.len(), MAX_ID_BYTES);
        let err = serde_json::from_value::<Ids>(json!({"id": "é".repeat(128)})).err().unwrap();
        assert!(err.to_string().starts_with(ID_TOO_LONG), "{err}");
    }

    #[test]
    fn timestamps_outside_1970_to_9999_read_as_absent() {
        let at = |v: Value| serde_json::from_value::<Ids>(json!({"id": "x", "at": v})).unwrap().at;
        assert!(at(json!("2026-12-02T10:00:00Z")).is_some());
        assert!(at(json!(1_764_669_600_000i64)).is_some());
        assert_eq!(at(json!("+300000-01-01T00:00:00Z")), None);
        assert_eq!(at(json!(8_000_000_000_000_000i64)), None, "year 255,000 in epoch milliseconds");
        assert_eq!(at(json!(-1)), None, "before 1970");
        assert_eq!(at(json!("10000-01-01T00:00:00Z")), None);
        assert_eq!(at(json!(1e300)), None);
    }

    #[test]
    fn a_single_object_becomes_a_list_of_one() {
        assert_eq!(probe(json!({"list": {"id": "a"}})).list, vec![json!({"id": "a"})]);
        assert_eq!(probe(json!({"list": [{"id": "a"}, {"id": "b"}]})).list.len(), 2);
        assert!(probe(json!({"list": null})).list.is_empty());
    }
}
