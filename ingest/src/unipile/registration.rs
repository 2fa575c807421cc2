//! Keeps the relay's two webhooks registered with Unipile.
//!
//! The relay wants exactly one `messaging` webhook calling
//! `{WEBHOOK_BASE_URL}/api/webhooks/unipile/messages` and one `account_status` webhook
//! calling `{WEBHOOK_BASE_URL}/api/webhooks/unipile/account-status`, each sending the
//! `Unipile-Auth: <WEBHOOK_SECRET>` header. [`ensure`] makes it so:
//!
//! - a webhook with the same `request_url` and `source` and the current secret, events
//!   and format is reused;
//! - one whose secret (or events, or enabled flag) is stale is replaced: the new one is
//!   created first, then the stale one deleted, so deliveries never stop;
//! - duplicates with the same `request_url` and `source` are deleted, keeping the
//!   up-to-date one with the smallest id.
//!
//! Replicas starting together serialize on a PostgreSQL advisory lock; without a
//! database (the `ingest webhooks ensure` command run without `DATABASE_URL`) the
//! smallest-id rule still makes racing runs converge on one webhook of each kind,
//! because every run re-lists after creating and nobody ever deletes the smallest.
//!
//! At start-up [`spawn_registration`] runs [`ensure`] in the background until it
//! succeeds, so ingest serves even while Unipile is unreachable. The gauge
//! `unipile_webhooks_registered` is 1 once both webhooks are in place.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use rand::Rng;
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::client::{ClientConfig, UnipileClient, UnipileError};
use super::types::{NewWebhook, Webhook, WebhookHeader};
use crate::config::UnipileArgs;
use crate::payload::MessagingEventKind;

/// Path of the messaging webhook endpoint of ingest.
pub const MESSAGES_PATH: &str = "/api/webhooks/unipile/messages";
/// Path of the account status webhook endpoint of ingest.
pub const ACCOUNT_STATUS_PATH: &str = "/api/webhooks/unipile/account-status";
/// The header Unipile sends back on every delivery, holding `WEBHOOK_SECRET`.
pub const SECRET_HEADER: &str = "Unipile-Auth";
/// Key of the PostgreSQL advisory lock that serializes `ensure` across replicas
/// (the bytes of "unipilewh").
pub const ENSURE_LOCK_KEY: i64 = 0x756e_6970_696c_6577;

/// Why ensuring the webhooks failed.
#[derive(Debug, thiserror::Error)]
pub enum EnsureError {
    #[error(transparent)]
    Unipile(#[from] UnipileError),
    #[error("taking the webhook registration lock in PostgreSQL: {0}")]
    Lock(#[from] sqlx::Error),
}

/// What the relay registers: the public base URL and the secret Unipile must send.
#[derive(Clone)]
pub struct WebhookSettings {
    base_url: Url,
    secret: SecretString,
}

impl fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("base_url", &self.base_url.as_str())
            .field("secret", &"[redacted]")
            .finish()
    }
}

impl WebhookSettings {
    /// `base_url` is the public URL of ingest (`WEBHOOK_BASE_URL`), http or https.
    pub fn new(base_url: &str, secret: SecretString) -> Result<Self, String> {
        let url = Url::parse(base_url.trim()).map_err(|e| format!("{base_url:?} is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("{base_url:?} must start with https:// (or http://)"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!("{base_url:?} must not carry a query or fragment"));
        }
        Ok(Self { base_url: url, secret })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url.as_str().trim_end_matches('/'))
    }

    /// The two webhooks the relay needs, as `POST /webhooks` bodies.
    pub fn desired(&self) -> Vec<NewWebhook> {
        let headers = vec![
            WebhookHeader { key: SECRET_HEADER.to_owned(), value: self.secret.expose_secret().to_owned() },
            WebhookHeader { key: "Content-Type".to_owned(), value: "application/json".to_owned() },
        ];
        vec![
            NewWebhook {
                source: "messaging".to_owned(),
                request_url: self.url(MESSAGES_PATH),
                name: "relay-messaging".to_owned(),
                format: "json".to_owned(),
                events: MessagingEventKind::SUBSCRIBED.iter().map(|e| (*e).to_owned()).collect(),
                headers: headers.clone(),
            },
            NewWebhook {
                source: "account_status".to_owned(),
                request_url: self.url(ACCOUNT_STATUS_PATH),
                name: "relay-account-status".to_owned(),
                format: "json".to_owned(),
                events: Vec::new(),
                headers,
            },
        ]
    }
}

/// What [`ensure`] did about one wanted webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// An up-to-date webhook was there already.
    Reused,
    /// None was there; one was created.
    Created,
    /// Only stale ones (old secret, events or disabled) were there; a new one was
    /// created and they were deleted.
    Replaced,
}

/// The result of [`ensure`] for one wanted webhook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ensured {
    pub source: String,
    pub request_url: String,
    /// The id of the webhook now in place.
    pub id: String,
    pub action: Action,
    /// Ids of stale or duplicate webhooks deleted on the way.
    pub deleted: Vec<String>,
}

/// Which existing webhooks to keep and which to delete, for one wanted webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The up-to-date webhook to keep; `None` means one must be created.
    pub keep: Option<String>,
    /// Stale webhooks and duplicates of the kept one.
    pub delete: Vec<String>,
}

/// Decides, from what Unipile lists, what to do about one wanted webhook. Webhooks of
/// other `request_url`s or sources (someone else's) are never touched.
pub fn plan(existing: &[Webhook], wanted: &NewWebhook) -> Plan {
    let same_target: Vec<&Webhook> = existing
        .iter()
        .filter(|w| w.source == wanted.source && same_url(&w.request_url, &wanted.request_url))
        .collect();
    let keep = same_target
        .iter()
        .filter(|w| is_up_to_date(w, wanted))
        .map(|w| w.id.as_str())
        .min()
        .map(str::to_owned);
    let delete = same_target.iter().filter(|w| Some(&w.id) != keep.as_ref()).map(|w| w.id.clone()).collect();
    Plan { keep, delete }
}

fn same_url(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

fn is_up_to_date(existing: &Webhook, wanted: &NewWebhook) -> bool {
    let wanted_secret =
        wanted.headers.iter().find(|h| h.key.eq_ignore_ascii_case(SECRET_HEADER)).map(|h| h.value.as_str());
    fn events(list: &[String]) -> BTreeSet<&str> {
        list.iter().map(String::as_str).collect()
    }
    existing.enabled
        && existing.header(SECRET_HEADER) == wanted_secret
        && events(&existing.events) == events(&wanted.events)
        && existing.format.as_deref().is_none_or(|f| f.eq_ignore_ascii_case(&wanted.format))
}

/// Makes Unipile hold exactly one up-to-date webhook of each kind the relay needs.
///
/// With a `lock` pool, runs under a transaction-scoped PostgreSQL advisory lock so
/// that replicas starting together take turns; the lock is released when the
/// transaction ends, also if this future is dropped half-way.
#[tracing::instrument(skip_all, fields(base_url = %settings.base_url), err)]
pub async fn ensure(
    client: &UnipileClient,
    settings: &WebhookSettings,
    lock: Option<&PgPool>,
) -> Result<Vec<Ensured>, EnsureError> {
    let mut guard = match lock {
        Some(pool) => {
            let mut tx = pool.begin().await?;
            sqlx::query("select pg_advisory_xact_lock($1)").bind(ENSURE_LOCK_KEY).execute(&mut *tx).await?;
            Some(tx)
        }
        None => None,
    };
    let result = ensure_unlocked(client, settings).await;
    if let Some(tx) = guard.take() {
        tx.commit().await?;
    }
    result
}

async fn ensure_unlocked(
    client: &UnipileClient,
    settings: &WebhookSettings,
) -> Result<Vec<Ensured>, EnsureError> {
    let existing = client.list_webhooks().await?;
    let mut results = Vec::new();
    let mut created_any = false;
    for wanted in settings.desired() {
        let plan = plan(&existing, &wanted);
        let (id, action) = match plan.keep {
            Some(id) => (id, Action::Reused),
            None => {
                let id = client.create_webhook(&wanted).await?;
                created_any = true;
                let action = if plan.delete.is_empty() { Action::Created } else { Action::Replaced };
                tracing::info!(source = %wanted.source, request_url = %wanted.request_url, webhook_id = %id, ?action, "unipile webhook registered");
                (id, action)
            }
        };
        let mut deleted = Vec::new();
        for stale in plan.delete {
            delete_if_present(client, &stale).await?;
            deleted.push(stale);
        }
        results.push(Ensured { source: wanted.source, request_url: wanted.request_url, id, action, deleted });
    }
    if created_any {
        settle_duplicates(client, settings, &mut results).await?;
    }
    Ok(results)
}

/// After creating, lists again and removes duplicates a concurrent run may have made,
/// keeping the smallest id, which every run agrees on.
async fn settle_duplicates(
    client: &UnipileClient,
    settings: &WebhookSettings,
    results: &mut [Ensured],
) -> Result<(), EnsureError> {
    let existing = client.list_webhooks().await?;
    for (wanted, result) in settings.desired().iter().zip(results.iter_mut()) {
        let plan = plan(&existing, wanted);
        for duplicate in plan.delete {
            tracing::info!(webhook_id = %duplicate, source = %wanted.source, "deleting duplicate unipile webhook");
            delete_if_present(client, &duplicate).await?;
            result.deleted.push(duplicate);
        }
        if let Some(keep) = plan.keep {
            result.id = keep;
        }
    }
    Ok(())
}

/// Deletes a webhook; one that is already gone (another replica was faster) is fine.
async fn delete_if_present(client: &UnipileClient, id: &str) -> Result<(), UnipileError> {
    match client.delete_webhook(id).await {
        Err(e) if e.status() == Some(404) => Ok(()),
        other => other,
    }
}

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

    fn settings(secret: &str) -> WebhookSettings {
        WebhookSettings::new("https://relay.example.com", SecretString::from(secret.to_owned())).unwrap()
    }

    fn listed(id: &str, wanted: &NewWebhook) -> Webhook {
        Webhook {
            id: id.to_owned(),
            name: Some(wanted.name.clone()),
            source: wanted.source.clone(),
            request_url: wanted.request_url.clone(),
            enabled: true,
            format: Some("json".into()),
            headers: wanted.headers.clone(),
            events: wanted.events.clone(),
        }
    }

    #[test]
    fn desired_webhooks_point_at_the_two_endpoints_with_the_secret() {
        let desired = settings("s3cr3t").desired();
        assert_eq!(desired[0].request_url, "https://relay.example.com/api/webhooks/unipile/messages");
        assert_eq!(desired[0].events.len(), 5);
        assert_eq!(desired[1].request_url, "https://relay.example.com/api/webhooks/unipile/account-status");
        assert!(desired[1].events.is_empty());
        for d in &desired {
            assert!(
                d.headers.contains(&WebhookHeader { key: "Unipile-Auth".into(), value: "s3cr3t".into() })
            );
        }
    }

    #[test]
    fn a_base_url_with_a_path_keeps_it() {
        let s =
            WebhookSettings::new("https://example.com/relay/", SecretString::from("x".to_owned())).unwrap();
        assert_eq!(s.desired()[0].request_url, "https://example.com/relay/api/webhooks/unipile/messages");
    }

    #[test]
    fn nothing_there_means_create() {
        let wanted = &settings("s").desired()[0];
        assert_eq!(plan(&[], wanted), Plan { keep: None, delete: vec![] });
    }

    #[test]
    fn an_up_to_date_webhook_is_kept_and_duplicates_go() {
        let wanted = &settings("s").desired()[0];
        let plan = plan(&[listed("b", wanted), listed("a", wanted), listed("c", wanted)], wanted);
        assert_eq!(plan.keep.as_deref(), Some("a"));
        assert_eq!(plan.delete, vec!["b".to_owned(), "c".to_owned()]);
    }

    #[test]
    fn a_stale_secret_disabled_or_wrong_events_is_replaced() {
        let wanted = &settings("new").desired()[0];
        let old = &settings("old").desired()[0];
        let mut disabled = listed("d", wanted);
        disabled.enabled = false;
        let mut fewer_events = listed("e", wanted);
        fewer_events.events.pop();
        let plan = plan(&[listed("a", old), disabled, fewer_events], wanted);
        assert_eq!(plan.keep, None);
        assert_eq!(plan.delete.len(), 3);
    }

    #[test]
    fn other_peoples_webhooks_are_left_alone() {
        let wanted = &settings("s").desired()[0];
        let mut other_url = listed("a", wanted);
        other_url.request_url = "https://other.example.org/hooks".into();
        let mut other_source = listed("b", wanted);
        other_source.source = "email".into();
        assert_eq!(plan(&[other_url, other_source], wanted), Plan { keep: None, delete: vec![] });
    }

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
