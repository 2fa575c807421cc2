//! Client tokens: HS256 JWTs with `sub`, `exp` and `accounts` (and `iss`, `aud` when the
//! operator configures them: then they are required and checked), and optionally `name`,
//! the agent's display name that presence events carry.
//!
//! The same token opens a WebSocket on fanout and calls ingest's REST API. `accounts`
//! lists the Unipile account ids the holder may see; `["*"]` means all of them.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// The wildcard account entry.
pub const ALL_ACCOUNTS: &str = "*";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: i64,
    pub accounts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// Display name of the agent (optional): shown to the other agents of the same
    /// accounts in presence events ("Ana is typing…").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Claims {
    /// Whether the holder may see events of this account.
    pub fn allows(&self, account_id: &str) -> bool {
        self.accounts.iter().any(|a| a == ALL_ACCOUNTS || a == account_id)
    }

    /// Whether the token covers every account.
    pub fn sees_all(&self) -> bool {
        self.accounts.iter().any(|a| a == ALL_ACCOUNTS)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("token expired")]
    Expired,
    #[error("token invalid: {0}")]
    Invalid(String),
}

/// Signs and checks tokens with the shared `JWT_SECRET`.
#[derive(Clone)]
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: Option<String>,
    audience: Option<String>,
}

impl JwtKeys {
    pub fn new(secret: &SecretString) -> Self {
        let bytes = secret.expose_secret().as_bytes();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        // A token not valid yet is refused too (jsonwebtoken checks `nbf` only if asked).
        validation.validate_nbf = true;
        // `aud` is checked only when configured ([`JwtKeys::with_issuer_and_audience`]).
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            encoding: EncodingKey::from_secret(bytes),
            decoding: DecodingKey::from_secret(bytes),
            validation,
            issuer: None,
            audience: None,
        }
    }

    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid(e.to_string()),
            })
    }

    pub fn sign(&self, claims: &Claims) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .expect("HS256 signing cannot fail")
    }

    /// A token for `sub` valid for `ttl` from now.
    pub fn issue(&self, sub: &str, accounts: Vec<String>, ttl: std::time::Duration) -> String {
        let exp = chrono::Utc::now().timestamp() + ttl.as_secs() as i64;
        let (iss, aud) = (self.issuer.clone(), self.audience.clone());
        self.sign(&Claims { sub: sub.to_owned(), exp, accounts, iss, aud, name: None })
    }

    /// Like [`JwtKeys::issue`], with a display name (`name` claim).
    pub fn issue_named(
        &self,
        sub: &str,
        name: Option<&str>,
        accounts: Vec<String>,
        ttl: std::time::Duration,
    ) -> String {
        let exp = chrono::Utc::now().timestamp() + ttl.as_secs() as i64;
        let (iss, aud) = (self.issuer.clone(), self.audience.clone());
        self.sign(&Claims { sub: sub.to_owned(), exp, accounts, iss, aud, name: name.map(str::to_owned) })
    }

    /// Requires and checks `iss` and `aud` when given (`JWT_ISSUER`, `JWT_AUDIENCE`);
    /// tokens this side issues carry them.
    pub fn with_issuer_and_audience(mut self, issuer: Option<String>, audience: Option<String>) -> Self {
        let mut required = vec!["exp", "sub"];
        if let Some(issuer) = &issuer {
            self.validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        if let Some(audience) = &audience {
            self.validation.validate_aud = true;
            self.validation.set_audience(&[audience]);
            required.push("aud");
        }
        self.validation.set_required_spec_claims(&required);
        self.issuer = issuer;
        self.audience = audience;
        self
    }
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtKeys(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn keys(secret: &str) -> JwtKeys {
        JwtKeys::new(&SecretString::from(secret))
    }

    #[test]
    fn a_configured_issuer_and_audience_are_required_and_checked() {
        let secret = "a-secret-of-at-least-thirty-two-bytes!!";
        let strict = || keys(secret).with_issuer_and_audience(Some("relay".into()), Some("inbox".into()));
        let good = strict().issue("u", vec!["*".into()], Duration::from_secs(60));
        assert!(strict().verify(&good).is_ok());
        let plain = keys(secret).issue("u", vec!["*".into()], Duration::from_secs(60));
        assert!(matches!(strict().verify(&plain), Err(TokenError::Invalid(_))), "no iss/aud");
        let other = keys(secret)
            .with_issuer_and_audience(Some("elsewhere".into()), Some("inbox".into()))
            .issue("u", vec!["*".into()], Duration::from_secs(60));
        assert!(matches!(strict().verify(&other), Err(TokenError::Invalid(_))), "wrong iss");
        assert!(keys(secret).verify(&good).is_ok(), "unconfigured, iss and aud are not required");
    }

    #[test]
    fn a_token_not_valid_before_a_future_time_is_refused() {
        let k = keys("a-secret-of-at-least-thirty-two-bytes!!");
        let now = chrono::Utc::now().timestamp();
        let sign = |nbf: i64| {
            let claims = serde_json::json!({"sub": "u", "exp": now + 600, "nbf": nbf, "accounts": ["*"]});
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &k.encoding).unwrap()
        };
        assert!(matches!(k.verify(&sign(now + 60)), Err(TokenError::Invalid(_))), "nbf in the future");
        assert!(k.verify(&sign(now - 60)).is_ok(), "nbf in the past");
    }

    #[test]
    fn a_signed_token_verifies_with_the_same_secret() {
        let k = keys("s3cret");
        let token = k.issue("user-1", vec!["acc_a".into()], Duration::from_secs(60));
        let claims = k.verify(&token).unwrap();
        assert_eq!(claims.sub, "user-1");
        assert!(claims.allows("acc_a"));
        assert!(!claims.allows("acc_b"));
    }

    #[test]
    fn a_display_name_travels_in_the_token_and_is_optional() {
        let k = keys("s3cret");
        let named = k.issue_named("u", Some("Ana"), vec!["a".into()], Duration::from_secs(60));
        assert_eq!(k.verify(&named).unwrap().name.as_deref(), Some("Ana"));
        let plain = k.issue("u", vec!["a".into()], Duration::from_secs(60));
        assert_eq!(k.verify(&plain).unwrap().name, None);
    }

    #[test]
    fn a_token_signed_with_another_secret_is_invalid() {
        let token = keys("one").issue("u", vec!["*".into()], Duration::from_secs(60));
        assert!(matches!(keys("two").verify(&token), Err(TokenError::Invalid(_))));
    }

    #[test]
    fn an_expired_token_is_refused() {
        let k = keys("s");
        let token = k.sign(&Claims {
            sub: "u".into(),
            exp: chrono::Utc::now().timestamp() - 5,
            accounts: vec![],
            iss: None,
            aud: None,
            name: None,
        });
        assert_eq!(k.verify(&token), Err(TokenError::Expired));
    }

    #[test]
    fn a_token_without_accounts_is_invalid() {
        let k = keys("s");
        #[derive(Serialize)]
        struct NoAccounts {
            sub: &'static str,
            exp: i64,
        }
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &NoAccounts { sub: "u", exp: chrono::Utc::now().timestamp() + 60 },
            &EncodingKey::from_secret(b"s"),
        )
        .unwrap();
        assert!(matches!(k.verify(&token), Err(TokenError::Invalid(_))));
    }

    #[test]
    fn the_wildcard_sees_every_account() {
        let c =
            Claims { sub: "u".into(), exp: 0, accounts: vec!["*".into()], iss: None, aud: None, name: None };
        assert!(c.allows("anything") && c.sees_all());
    }
}
