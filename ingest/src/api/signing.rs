//! Short-lived signed URLs for attachments.
//!
//! A browser's `<img>` and `<audio>` cannot send an `Authorization` header, so the API
//! hands out URLs that carry their own proof instead:
//! `/api/messages/{message_id}/attachments/{attachment_id}?expires={unix seconds}&sig={..}`.
//!
//! `sig` is HMAC-SHA256 (base64url, no padding) over the method, both ids (each
//! length-prefixed, so no two pairs of ids sign the same bytes) and the expiry. Its key
//! is derived from `JWT_SECRET` with a label of its own (HMAC of the label under the
//! secret), so a signature can never be confused with a token's and no other secret has
//! to be configured; rotating `JWT_SECRET` ends every URL handed out. Verification is
//! in constant time. A URL is handed out only to a token that may see the message; it
//! then works for anyone who holds it until it expires (`ATTACHMENT_URL_TTL_SECS`).

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// What separates this key from every other use of `JWT_SECRET`.
const LABEL: &[u8] = b"unipile-relay/attachment-url/v1";

/// Signs and checks attachment URLs.
#[derive(Clone)]
pub struct UrlSigner {
    key: [u8; 32],
    ttl: Duration,
}

impl std::fmt::Debug for UrlSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UrlSigner").field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

/// Why a signed URL is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the signature does not match this URL")]
    Invalid,
    #[error("the signed URL has expired; ask for a new one")]
    Expired,
}

/// A signed URL's parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedUrl {
    /// Path and query, e.g. `/api/messages/m/attachments/a?expires=..&sig=..`; the page
    /// puts the API's origin in front.
    pub url: String,
    pub expires_at: DateTime<Utc>,
}

impl UrlSigner {
    pub fn new(jwt_secret: &SecretString, ttl: Duration) -> Self {
        let mut derive = HmacSha256::new_from_slice(jwt_secret.expose_secret().as_bytes())
            .expect("HMAC takes any key length");
        derive.update(LABEL);
        Self { key: derive.finalize().into_bytes().into(), ttl }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A URL for this attachment, valid for the configured time from `now`.
    pub fn sign(&self, message_id: &str, attachment_id: &str, now: DateTime<Utc>) -> SignedUrl {
        let expires = now.timestamp() + self.ttl.as_secs().min(i64::MAX as u64 / 2) as i64;
        let sig =
            URL_SAFE_NO_PAD.encode(self.mac(message_id, attachment_id, expires).finalize().into_bytes());
        let url = format!("{}?expires={expires}&sig={sig}", attachment_path(message_id, attachment_id));
        let expires_at = DateTime::from_timestamp(expires, 0).unwrap_or(now);
        SignedUrl { url, expires_at }
    }

    /// Checks `sig` and `expires` for these ids at `now`.
    pub fn verify(
        &self,
        message_id: &str,
        attachment_id: &str,
        expires: i64,
        sig: &str,
        now: DateTime<Utc>,
    ) -> Result<(), SignatureError> {
        let sig = URL_SAFE_NO_PAD.decode(sig.trim_end_matches('=')).map_err(|_| SignatureError::Invalid)?;
        self.mac(message_id, attachment_id, expires)
            .verify_slice(&sig)
            .map_err(|_| SignatureError::Invalid)?;
        if expires <= now.timestamp() {
            return Err(SignatureError::Expired);
        }
        Ok(())
    }

    fn mac(&self, message_id: &str, attachment_id: &str, expires: i64) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        for part in ["GET", message_id, attachment_id] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part.as_bytes());
        }
        mac.update(&expires.to_be_bytes());
        mac
    }
}

/// `/api/messages/{message_id}/attachments/{attachment_id}` with both ids percent-encoded.
pub fn attachment_path(message_id: &str, attachment_id: &str) -> String {
    let mut url = reqwest::Url::parse("http://relay.invalid/").expect("a valid URL");
    url.path_segments_mut().expect("an http URL has path segments").clear().extend([
        "api",
        "messages",
        message_id,
        "attachments",
        attachment_id,
    ]);
    url.path().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> UrlSigner {
        UrlSigner::new(
            &SecretString::from("a-test-jwt-secret-of-32-bytes-or-more!!"),
            Duration::from_secs(300),
        )
    }

    fn query(url: &str) -> (i64, String) {
        let parsed = reqwest::Url::parse(&format!("http://x{url}")).unwrap();
        let pairs: std::collections::HashMap<_, _> = parsed.query_pairs().into_owned().collect();
        (pairs["expires"].parse().unwrap(), pairs["sig"].clone())
    }

    #[test]
    fn a_signed_url_verifies_until_it_expires() {
        let now = Utc::now();
        let signed = signer().sign("m1", "a1", now);
        assert!(signed.url.starts_with("/api/messages/m1/attachments/a1?expires="), "{}", signed.url);
        let (expires, sig) = query(&signed.url);
        assert_eq!(signer().verify("m1", "a1", expires, &sig, now), Ok(()));
        let later = now + chrono::Duration::seconds(301);
        assert_eq!(signer().verify("m1", "a1", expires, &sig, later), Err(SignatureError::Expired));
    }

    #[test]
    fn another_attachment_a_later_expiry_or_another_secret_does_not_verify() {
        let now = Utc::now();
        let (expires, sig) = query(&signer().sign("m1", "a1", now).url);
        assert_eq!(signer().verify("m1", "a2", expires, &sig, now), Err(SignatureError::Invalid));
        assert_eq!(signer().verify("m2", "a1", expires, &sig, now), Err(SignatureError::Invalid));
        assert_eq!(signer().verify("m1", "a1", expires + 3600, &sig, now), Err(SignatureError::Invalid));
        assert_eq!(signer().verify("m1", "a1", expires, "not base64 !", now), Err(SignatureError::Invalid));
        let other =
            UrlSigner::new(&SecretString::from("another-jwt-secret-of-32-bytes-or-more"), signer().ttl());
        assert_eq!(other.verify("m1", "a1", expires, &sig, now), Err(SignatureError::Invalid));
    }

    #[test]
    fn ids_cannot_be_shifted_between_the_two_parts() {
        let now = Utc::now();
        let (expires, sig) = query(&signer().sign("ab", "c", now).url);
        assert_eq!(signer().verify("a", "bc", expires, &sig, now), Err(SignatureError::Invalid));
    }

    #[test]
    fn ids_are_percent_encoded_in_the_path() {
        assert_eq!(attachment_path("m/1", "../a b"), "/api/messages/m%2F1/attachments/..%2Fa%20b");
    }
}
