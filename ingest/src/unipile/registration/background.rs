//! Start-up registration: whether `ingest serve` registers its webhooks, decided from
//! the configuration alone ([`Registration::decide`]), and the background task that runs
//! [`super::ensure`] with growing, jittered pauses ([`BackgroundBackoff`]) until it
//! succeeds, setting the `unipile_webhooks_registered` gauge once both are in place.

use std::fmt;
use std::time::Duration;

use rand::Rng;
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::{WebhookSettings, ensure};
use crate::config::UnipileArgs;
use crate::unipile::client::{ClientConfig, UnipileClient};

/// Whether start-up registration can run, decided from the configuration alone.
#[derive(Debug)]
pub enum Registration {
    Enabled { client: UnipileClient, settings: WebhookSettings },
    Skipped { reason: SkipReason },
}

/// Why start-up registration does not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// Settings that are not set, by environment variable name.
    Missing(Vec<&'static str>),
    /// A setting that is set but unusable.
    Invalid { setting: &'static str, reason: String },
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing(names) => {
                let verb = if names.len() == 1 { "is" } else { "are" };
                write!(f, "{} {verb} not set", names.join(" and "))
            }
            Self::Invalid { setting, reason } => write!(f, "{setting} is unusable: {reason}"),
        }
    }
}

impl Registration {
    /// Decides from `WEBHOOK_BASE_URL`, `WEBHOOK_SECRET`, `UNIPILE_DSN` and
    /// `UNIPILE_API_KEY` whether the relay registers its webhooks.
    pub fn decide(
        webhook_base_url: Option<&str>,
        webhook_secret: &SecretString,
        unipile: &UnipileArgs,
    ) -> Self {
        let base_url = webhook_base_url.map(str::trim).filter(|s| !s.is_empty());
        let dsn = unipile.unipile_dsn.as_deref().map(str::trim).filter(|s| !s.is_empty());
        let key = unipile.unipile_api_key.as_ref().filter(|k| !k.expose_secret().trim().is_empty());
        let mut missing = Vec::new();
        if base_url.is_none() {
            missing.push("WEBHOOK_BASE_URL");
        }
        if dsn.is_none() {
            missing.push("UNIPILE_DSN");
        }
        if key.is_none() {
            missing.push("UNIPILE_API_KEY");
        }
        let (Some(base_url), Some(dsn), Some(key)) = (base_url, dsn, key) else {
            return Self::Skipped { reason: SkipReason::Missing(missing) };
        };
        let settings = match WebhookSettings::new(base_url, webhook_secret.clone()) {
            Ok(settings) => settings,
            Err(reason) => {
                return Self::Skipped { reason: SkipReason::Invalid { setting: "WEBHOOK_BASE_URL", reason } };
            }
        };
        let client = ClientConfig::new(dsn, key.clone()).and_then(UnipileClient::new);
        match client {
            Ok(client) => Self::Enabled { client, settings },
            Err(e) => Self::Skipped {
                reason: SkipReason::Invalid { setting: "UNIPILE_DSN", reason: e.to_string() },
            },
        }
    }
}

/// Pauses between start-up registration attempts while Unipile is unreachable.
#[derive(Debug, Clone)]
pub struct BackgroundBackoff {
    pub first: Duration,
    pub max: Duration,
}

impl Default for BackgroundBackoff {
    fn default() -> Self {
        Self { first: Duration::from_secs(2), max: Duration::from_secs(300) }
    }
}

/// Registers the webhooks in the background: logs and returns at once when
/// registration is skipped, otherwise retries [`ensure`] with growing pauses until it
/// succeeds, then ends. Ingest serves meanwhile.
pub fn spawn_registration(
    registration: Registration,
    pool: PgPool,
    backoff: BackgroundBackoff,
) -> JoinHandle<()> {
    tokio::spawn(
        run_registration(registration, pool, backoff)
            .instrument(tracing::info_span!("unipile_webhook_registration")),
    )
}

/// The body of [`spawn_registration`], for callers that supervise their own tasks.
pub async fn run_registration(registration: Registration, pool: PgPool, backoff: BackgroundBackoff) {
    crate::metrics::webhooks_registered(false);
    let (client, settings) = match registration {
        Registration::Enabled { client, settings } => (client, settings),
        Registration::Skipped { reason } => {
            tracing::warn!(%reason, "unipile webhook registration skipped: {reason}; register the webhooks by hand or with `ingest webhooks ensure`");
            return;
        }
    };
    let mut pause = backoff.first;
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        match ensure(&client, &settings, Some(&pool)).await {
            Ok(done) => {
                crate::metrics::webhooks_registered(true);
                for webhook in &done {
                    tracing::info!(
                        source = %webhook.source,
                        request_url = %webhook.request_url,
                        webhook_id = %webhook.id,
                        action = ?webhook.action,
                        deleted = ?webhook.deleted,
                        "unipile webhook in place"
                    );
                }
                return;
            }
            Err(error) => {
                let jittered = pause.mul_f64(rand::thread_rng().gen_range(0.8..1.2));
                tracing::warn!(
                    %error,
                    attempt,
                    retry_in_s = jittered.as_secs(),
                    "unipile webhook registration failed; ingest keeps serving and retries in the background"
                );
                tokio::time::sleep(jittered).await;
                pause = (pause * 2).min(backoff.max);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unipile(dsn: Option<&str>, key: Option<&str>) -> UnipileArgs {
        UnipileArgs {
            unipile_dsn: dsn.map(str::to_owned),
            unipile_api_key: key.map(|k| SecretString::from(k.to_owned())),
        }
    }

    fn skipped(reg: Registration) -> String {
        match reg {
            Registration::Skipped { reason } => reason.to_string(),
            Registration::Enabled { .. } => panic!("registration should be skipped"),
        }
    }

    #[test]
    fn registration_without_base_url_is_skipped_naming_it() {
        let secret = SecretString::from("s".to_owned());
        let reg = Registration::decide(None, &secret, &unipile(Some("api1.unipile.com:1"), Some("k")));
        assert_eq!(skipped(reg), "WEBHOOK_BASE_URL is not set");
    }

    #[test]
    fn registration_without_credentials_names_each_missing_one() {
        let secret = SecretString::from("s".to_owned());
        let reg = Registration::decide(Some("https://r.example.com"), &secret, &unipile(None, None));
        assert_eq!(skipped(reg), "UNIPILE_DSN and UNIPILE_API_KEY are not set");
        let reg =
            Registration::decide(Some("https://r.example.com"), &secret, &unipile(Some("h:1"), Some(" ")));
        assert_eq!(skipped(reg), "UNIPILE_API_KEY is not set");
    }

    #[test]
    fn registration_with_an_unusable_base_url_says_why() {
        let secret = SecretString::from("s".to_owned());
        let reg = Registration::decide(Some("relay.example.com"), &secret, &unipile(Some("h:1"), Some("k")));
        assert!(skipped(reg).starts_with("WEBHOOK_BASE_URL is unusable"));
    }

    #[test]
    fn registration_with_everything_set_is_enabled() {
        let secret = SecretString::from("s".to_owned());
        let reg = Registration::decide(
            Some("https://r.example.com"),
            &secret,
            &unipile(Some("api1.unipile.com:1"), Some("k")),
        );
        assert!(matches!(reg, Registration::Enabled { .. }));
    }
}
