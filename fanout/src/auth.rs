//! Who is connecting: the client token from `?token=`, `Authorization: Bearer`, or the
//! WebSocket subprotocol `bearer.<token>`.
//!
//! Browsers cannot set headers on a WebSocket, but they can offer subprotocols: the page
//! offers `relay.v1` (which the server selects) and `bearer.<token>`, so its token never
//! appears in a URL, where proxies write it to their logs (nginx's error log prints the
//! request line whatever the access log's format).

use axum::http::HeaderMap;
use axum::http::header::{AUTHORIZATION, SEC_WEBSOCKET_PROTOCOL};
use shared::claims::{Claims, JwtKeys, TokenError};

use crate::error::ApiError;

/// The subprotocol the server selects; a client that offers `bearer.<token>` must offer
/// this one too, since a browser fails a handshake whose answer names no protocol.
pub const PROTOCOL: &str = "relay.v1";
/// The prefix of the subprotocol that carries the token.
pub const BEARER_PROTOCOL: &str = "bearer.";

/// The token of a request: the query parameter, else the `Authorization` header, else
/// a `bearer.` subprotocol.
pub fn token<'a>(headers: &'a HeaderMap, query_token: Option<&'a str>) -> Option<&'a str> {
    query_token
        .filter(|t| !t.is_empty())
        .or_else(|| headers.get(AUTHORIZATION)?.to_str().ok().and_then(shared::errors::bearer_token))
        .or_else(|| {
            headers
                .get_all(SEC_WEBSOCKET_PROTOCOL)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .find_map(|p| p.trim().strip_prefix(BEARER_PROTOCOL).filter(|t| !t.is_empty()))
        })
}

/// Checks the token and returns its claims, or the 401 to answer.
pub fn authenticate(
    keys: &JwtKeys,
    headers: &HeaderMap,
    query_token: Option<&str>,
) -> Result<Claims, ApiError> {
    let token = token(headers, query_token).ok_or(ApiError::Unauthorized("missing token"))?;
    keys.verify(token).map_err(|e| match e {
        TokenError::Expired => ApiError::Unauthorized("token expired"),
        TokenError::Invalid(_) => ApiError::Unauthorized("invalid token"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn the_query_token_wins_and_the_bearer_header_is_the_fallback() {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer abc"));
        assert_eq!(token(&headers, Some("q")), Some("q"));
        assert_eq!(token(&headers, None), Some("abc"));
        assert_eq!(token(&HeaderMap::new(), Some("")), None);
    }

    #[test]
    fn a_bearer_subprotocol_carries_the_token_when_the_url_and_header_do_not() {
        let mut headers = HeaderMap::new();
        headers.insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static("relay.v1, bearer.eyJ.x.y"));
        assert_eq!(token(&headers, None), Some("eyJ.x.y"));
        headers.insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static("relay.v1, bearer."));
        assert_eq!(token(&headers, None), None, "an empty one is no token");
    }

    #[test]
    fn other_authorization_schemes_are_not_tokens() {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(token(&headers, None), None);
    }
}
