//! Opaque page cursors: the keyset position of the last item of a page.
//!
//! A cursor is URL-safe base64 of a small JSON object. Clients must treat it as opaque;
//! anything that does not decode to a position this API gave out is a 400.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// Where the next page starts: strictly after this `(time, id)` in the list's order.
/// The time keeps PostgreSQL's microseconds, so equal times are never confused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    #[serde(rename = "t")]
    pub at: Option<DateTime<Utc>>,
    pub id: String,
}

impl Cursor {
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(self).expect("a cursor always serializes"))
    }

    /// Reads a cursor given back by a client.
    pub fn decode(text: &str) -> Result<Self, ApiError> {
        let invalid =
            || ApiError::BadRequest("invalid cursor: pass back a next_cursor this API returned".into());
        let bytes = URL_SAFE_NO_PAD.decode(text.trim()).map_err(|_| invalid())?;
        serde_json::from_slice(&bytes).map_err(|_| invalid())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_round_trips_with_microseconds() {
        let at = DateTime::parse_from_rfc3339("2026-11-28T16:02:11.123456Z").unwrap().with_timezone(&Utc);
        let cursor = Cursor { at: Some(at), id: "m1".into() };
        assert_eq!(Cursor::decode(&cursor.encode()).unwrap(), cursor);
        let no_time = Cursor { at: None, id: "c9".into() };
        assert_eq!(Cursor::decode(&no_time.encode()).unwrap(), no_time);
    }

    #[test]
    fn garbage_is_a_bad_request() {
        for text in ["", "!!!", "bm90IGpzb24", "eyJ4IjoxfQ"] {
            assert!(matches!(Cursor::decode(text), Err(ApiError::BadRequest(_))), "{text:?}");
        }
    }
}
