//! How the client is set up: where Unipile is (a DSN turned into the API's base URL by
//! [`base_url`]), the key and timeouts ([`ClientConfig`]), and how often and how
//! patiently a failed call is retried ([`RetryPolicy`]).

use std::fmt;
use std::time::Duration;

use rand::Rng;
use reqwest::Url;
use secrecy::SecretString;

use super::UnipileError;

/// How often and how patiently a call is retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Delay before the first retry; doubles with each further one.
    pub base_delay: Duration,
    /// Ceiling of the computed delay.
    pub max_delay: Duration,
    /// Ceiling of a `Retry-After` that Unipile asks for.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(10),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (1-based): half of the exponential step
    /// plus a random share of the other half, so replicas do not retry in lockstep.
    pub fn backoff(&self, retry: u32) -> Duration {
        let step =
            self.base_delay.saturating_mul(2u32.saturating_pow(retry.saturating_sub(1))).min(self.max_delay);
        let half = step / 2;
        half + half.mul_f64(rand::thread_rng().r#gen::<f64>())
    }
}

/// Where Unipile is, how to authenticate, and how long to wait.
#[derive(Clone)]
pub struct ClientConfig {
    /// `{scheme}://{host}[:port]/api/v1`, see [`base_url`].
    pub base_url: Url,
    pub api_key: SecretString,
    /// Whole-request timeout, connection included.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub retry: RetryPolicy,
    /// Items asked for per page of a list endpoint.
    pub page_size: u32,
}

impl ClientConfig {
    /// Defaults for a DSN as Unipile shows it, or a full base URL.
    pub fn new(dsn: &str, api_key: SecretString) -> Result<Self, UnipileError> {
        Ok(Self {
            base_url: base_url(dsn)?,
            api_key,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
            page_size: 100,
        })
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("base_url", &self.base_url.as_str())
            .field("api_key", &"[redacted]")
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .field("page_size", &self.page_size)
            .finish()
    }
}

/// The API base for a DSN: `apiN.unipile.com:PORT` becomes
/// `https://apiN.unipile.com:PORT/api/v1`; a URL with a scheme (`http://127.0.0.1:9000`)
/// gets `/api/v1` appended unless it already ends with it.
pub fn base_url(dsn: &str) -> Result<Url, UnipileError> {
    let invalid = |reason: &str| UnipileError::InvalidDsn { dsn: dsn.to_owned(), reason: reason.to_owned() };
    let has_scheme = dsn.contains("://");
    let trimmed = dsn.trim().trim_end_matches('/');
    if trimmed.is_empty() {
        return Err(invalid("it is empty"));
    }
    let with_scheme = if has_scheme { trimmed.to_owned() } else { format!("https://{trimmed}") };
    let mut url = Url::parse(&with_scheme).map_err(|e| invalid(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("the scheme must be http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("it has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("it must not carry a query or fragment"));
    }
    if !url.path().trim_end_matches('/').ends_with("/api/v1") {
        let path = format!("{}/api/v1", url.path().trim_end_matches('/'));
        url.set_path(&path);
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dsn_without_scheme_means_https() {
        assert_eq!(
            base_url("api8.unipile.com:13851").unwrap().as_str(),
            "https://api8.unipile.com:13851/api/v1"
        );
    }

    #[test]
    fn dsn_with_scheme_is_kept_and_gets_the_api_path() {
        assert_eq!(base_url("http://127.0.0.1:9000").unwrap().as_str(), "http://127.0.0.1:9000/api/v1");
        assert_eq!(base_url("http://127.0.0.1:9000/").unwrap().as_str(), "http://127.0.0.1:9000/api/v1");
        assert_eq!(
            base_url("https://proxy.example.com/unipile/api/v1/").unwrap().as_str(),
            "https://proxy.example.com/unipile/api/v1"
        );
    }

    #[test]
    fn unusable_dsns_are_rejected_with_a_reason() {
        for dsn in ["", "  ", "ftp://x.example.com", "http://", "https://h.example.com/?a=1"] {
            let error = base_url(dsn).unwrap_err();
            assert!(error.to_string().contains("UNIPILE_DSN"), "{dsn}: {error}");
        }
    }

    #[test]
    fn backoff_grows_and_stays_under_the_ceiling() {
        let policy = RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            max_retry_after: Duration::from_secs(5),
        };
        for _ in 0..50 {
            let first = policy.backoff(1);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let late = policy.backoff(9);
            assert!(late >= Duration::from_millis(500) && late <= Duration::from_secs(1));
        }
    }
}
