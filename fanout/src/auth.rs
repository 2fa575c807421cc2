//! Who is connecting: the client token from `?token=` or `Authorization: Bearer`.

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use shared::claims::{Claims, JwtKeys, TokenError};

use crate::error::ApiError;

/// The token of a request: the query parameter wins over the header.
pub fn token<'a>(headers: &'a HeaderMap, query_token: Option<&'a str>) -> Option<&'a str> {
    query_token
        .filter(|t| !t.is_empty())
        .or_else(|| headers.get(AUTHORIZATION)?.to_str().ok().and_then(shared::errors::bearer_token))
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
    fn other_authorization_schemes_are_not_tokens() {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(token(&headers, None), None);
    }
}
