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
//! `unipile_webhooks_registered` is 1 once both webhooks are in place. That start-up
//! part (deciding from the configuration whether to register, and the retry loop) lives
//! in the private `background` submodule; its items are re-exported here.

mod background;

pub use background::{BackgroundBackoff, Registration, SkipReason, run_registration, spawn_registration};

use std::collections::BTreeSet;
use std::fmt;

use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use sqlx::PgPool;

use super::client::{UnipileClient, UnipileError};
use super::types::{NewWebhook, Webhook, WebhookHeader};
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
    /// `base_url` is the public URL of ingest (`WEBHOOK_BASE_URL`): https, or http for
    /// a loopback host or in development (`RELAY_DEV=1`), since Unipile sends the
    /// webhook secret to it on every delivery.
    pub fn new(base_url: &str, secret: SecretString) -> Result<Self, String> {
        let url = Url::parse(base_url.trim()).map_err(|e| format!("{base_url:?} is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("{base_url:?} must start with https:// (or http://)"));
        }
        let host = url.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
        let loopback =
            host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if url.scheme() == "http" && !loopback && !runtime::config::dev_mode() {
            return Err(format!(
                "{base_url:?} would carry the webhook secret in clear: use https:// (http:// only for a \
                 loopback host, or with RELAY_DEV=1)"
            ));
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
    fn plain_http_is_refused_unless_the_host_is_loopback() {
        let new = |url: &str| WebhookSettings::new(url, SecretString::from("x".to_owned()));
        assert!(new("http://relay.example.com").unwrap_err().contains("in clear"));
        assert!(new("http://127.0.0.1:8000").is_ok());
        assert!(new("http://localhost:8000").is_ok());
        assert!(new("http://[::1]:8000").is_ok());
        assert!(new("https://relay.example.com").is_ok());
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
}
