//! The OpenAPI description of ingest's HTTP interface, generated from the handlers and
//! types (utoipa) and served at `GET /api/openapi.json` so client teams can generate
//! types. The webhook endpoints are described by the stubs below: their handlers answer
//! Unipile, not browsers, and take the body as raw bytes.

use axum::Json;
use serde::Serialize;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use super::ErrorBody;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Unipile realtime relay: ingest",
        description = "Unipile webhooks in; the REST read API of the inbox. Live events are on fanout's \
                       WebSocket (`GET /ws/messages`), with the same token."
    ),
    paths(
        super::chats::list,
        super::messages::list,
        super::chats::mark_read,
        super::replies::send,
        super::replies::start_chat,
        // media: attachments and accounts
        super::attachments::download,
        super::attachments::signed_url,
        super::accounts::list,
        messaging_webhook,
        account_status_webhook,
    ),
    components(schemas(WebhookAck, WebhookStatus, super::attachments::AttachmentUrl)),
    modifiers(&SecuritySchemes),
    tags(
        (name = "inbox", description = "Chats and messages of the token's accounts"),
        (name = "attachments", description = "Files of messages, streamed from Unipile; signed URLs for <img> and <audio>"),
        (name = "accounts", description = "The token's Unipile accounts and their status"),
        (name = "webhooks", description = "Called by Unipile; authenticated with the Unipile-Auth header"),
    )
)]
pub struct ApiDoc;

/// `GET /api/openapi.json`.
pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build(),
            ),
        );
        components.add_security_scheme(
            "unipile_auth",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new(crate::inbound::AUTH_HEADER))),
        );
    }
}

/// The answer to an accepted webhook.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookAck {
    pub status: WebhookStatus,
}

/// What became of a delivery.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WebhookStatus {
    /// Stored; its event is on its way.
    Accepted,
    /// Seen before, or changes nothing (a repeated update).
    Duplicate,
    /// Understood, nothing to store (e.g. an edit older than the stored one).
    Ignored,
    /// Unusable (not JSON, ids missing, unknown event): kept with the reason.
    DeadLettered,
}

/// Messaging events from Unipile: `message_received`, `message_read`,
/// `message_reaction`, `message_edited`, `message_deleted` (and `message_delivered`).
///
/// The body is read as JSON whatever the `Content-Type`. Answered only after the change
/// and its event are committed; duplicates are normal and answered `duplicate`.
#[utoipa::path(
    post,
    path = "/api/webhooks/unipile/messages",
    tag = "webhooks",
    request_body(content = Object, description = "A Unipile messaging event (see fixtures/unipile/)"),
    security(("unipile_auth" = [])),
    responses(
        (status = 200, description = "Committed, a duplicate, ignored or dead-lettered", body = WebhookAck),
        (status = 401, description = "Missing or wrong Unipile-Auth; nothing stored", body = ErrorBody),
        (status = 413, description = "Body over the size limit", body = ErrorBody),
        (status = 503, description = "The relay cannot save; Unipile retries", body = ErrorBody),
    )
)]
#[allow(dead_code)]
fn messaging_webhook() {}

/// Account status changes from Unipile: `{"AccountStatus": {"account_id", "account_type",
/// "message"}}`. The account is upserted and `account:status` emitted.
#[utoipa::path(
    post,
    path = "/api/webhooks/unipile/account-status",
    tag = "webhooks",
    request_body(content = Object, description = "A Unipile account status delivery"),
    security(("unipile_auth" = [])),
    responses(
        (status = 200, description = "Committed, a duplicate or dead-lettered", body = WebhookAck),
        (status = 401, description = "Missing or wrong Unipile-Auth; nothing stored", body = ErrorBody),
        (status = 413, description = "Body over the size limit", body = ErrorBody),
        (status = 503, description = "The relay cannot save; Unipile retries", body = ErrorBody),
    )
)]
#[allow(dead_code)]
fn account_status_webhook() {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbound::{ACCOUNT_STATUS_PATH, AckStatus, MESSAGES_PATH};

    #[test]
    fn the_document_describes_every_route() {
        let doc = ApiDoc::openapi();
        for path in [
            "/api/chats",
            "/api/chats/{chat_id}/messages",
            "/api/chats/{chat_id}/read",
            MESSAGES_PATH,
            ACCOUNT_STATUS_PATH,
        ] {
            assert!(doc.paths.paths.contains_key(path), "{path} is missing");
        }
    }

    #[test]
    fn the_sending_calls_are_documented_with_their_failures() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let reply = &doc["paths"]["/api/chats/{chat_id}/messages"]["post"];
        for status in ["201", "404", "409", "413", "422", "429", "502", "503", "504"] {
            assert!(reply["responses"][status].is_object(), "reply: {status} is not documented");
        }
        let content = &reply["requestBody"]["content"];
        assert!(content["application/json"].is_object() && content["multipart/form-data"].is_object());
        let start = &doc["paths"]["/api/chats"]["post"];
        for status in ["201", "404", "422", "429", "502", "504"] {
            assert!(start["responses"][status].is_object(), "new chat: {status} is not documented");
        }
        assert!(doc["components"]["schemas"]["ReplyState"].is_object());
    }

    #[test]
    fn the_documented_webhook_statuses_are_the_ones_answered() {
        // Exhaustive: a new answer fails to compile here until it is documented.
        let documented = |answered: AckStatus| match answered {
            AckStatus::Accepted => WebhookStatus::Accepted,
            AckStatus::Duplicate => WebhookStatus::Duplicate,
            AckStatus::Ignored => WebhookStatus::Ignored,
            AckStatus::DeadLettered => WebhookStatus::DeadLettered,
        };
        for answered in
            [AckStatus::Accepted, AckStatus::Duplicate, AckStatus::Ignored, AckStatus::DeadLettered]
        {
            assert_eq!(
                serde_json::to_value(documented(answered)).unwrap(),
                serde_json::to_value(answered).unwrap()
            );
        }
    }
}
