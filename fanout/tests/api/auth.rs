//! Who may open a socket.

use crate::helpers::{expired_token, spawn_app, token};
use shared::claims::JwtKeys;
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[tokio::test]
async fn a_missing_token_is_refused_with_401() {
    let app = spawn_app().await;
    assert_eq!(app.try_connect(&app.ws_url(None, None)).await.err(), Some(401));
}

#[tokio::test]
async fn an_expired_token_is_refused_with_401() {
    let app = spawn_app().await;
    assert_eq!(app.try_connect(&app.ws_url(Some(&expired_token()), None)).await.err(), Some(401));
}

#[tokio::test]
async fn a_token_signed_with_another_secret_is_refused_with_401() {
    let app = spawn_app().await;
    let forged = JwtKeys::new(&"another-secret".to_string().into()).issue(
        "u",
        vec!["*".into()],
        Duration::from_secs(60),
    );
    assert_eq!(app.try_connect(&app.ws_url(Some(&forged), None)).await.err(), Some(401));
    assert_eq!(app.try_connect(&app.ws_url(Some("not-a-jwt"), None)).await.err(), Some(401));
}

#[tokio::test]
async fn a_bearer_header_is_accepted_like_the_query_parameter() {
    let app = spawn_app().await;
    let mut request = app.ws_url(None, None).into_client_request().unwrap();
    request.headers_mut().insert("Authorization", format!("Bearer {}", token(&["*"])).parse().unwrap());
    let mut client = crate::helpers::try_connect_request(request).await.expect("upgrade accepted");
    client.hello().await;
}

/// What the page does: no token in the URL, `relay.v1` and `bearer.<token>` offered as
/// subprotocols, `relay.v1` selected in the answer (a browser fails the handshake
/// otherwise).
#[tokio::test]
async fn a_bearer_subprotocol_is_accepted_and_relay_v1_is_selected() {
    let app = spawn_app().await;
    let mut request = app.ws_url(None, None).into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", format!("relay.v1, bearer.{}", token(&["*"])).parse().unwrap());
    let (mut socket, response) = tokio_tungstenite::connect_async(request).await.expect("upgrade accepted");
    assert_eq!(response.headers()["sec-websocket-protocol"], "relay.v1");
    let hello = futures::StreamExt::next(&mut socket).await.unwrap().unwrap();
    assert!(hello.to_text().unwrap().contains("\"hello\""), "{hello:?}");

    let mut forged = app.ws_url(None, None).into_client_request().unwrap();
    forged.headers_mut().insert("Sec-WebSocket-Protocol", "relay.v1, bearer.not-a-jwt".parse().unwrap());
    assert_eq!(crate::helpers::try_connect_request(forged).await.err(), Some(401));
}

#[tokio::test]
async fn a_connection_is_closed_with_4002_when_its_token_expires() {
    let app = spawn_app().await;
    let short = crate::helpers::keys().issue("u", vec!["*".into()], Duration::from_secs(2));
    let (mut client, _) = app.connect_hello(&short, None).await;
    let (code, reason, _) = client.until_close().await;
    assert_eq!(code, 4002, "{reason}");
}

#[tokio::test]
async fn a_refused_upgrade_answers_the_error_body_both_services_share() {
    let app = spawn_app().await;
    let response = reqwest::Client::new()
        .get(format!("http://{}/ws/messages", app.addr))
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("Authorization", "bearer not-a-jwt")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body: shared::errors::ErrorBody = response.json().await.expect("the shared error body");
    assert_eq!(body.error.code, "unauthorized");
    assert_eq!(body.error.message, "invalid token", "the lower-case scheme was read, the token refused");
}

#[test]
fn a_documented_secret_signs_nothing_outside_development() {
    let token = |dev: bool| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_fanout"));
        command.env_clear().args(["token", "--jwt-secret", "dev-jwt-secret", "--accounts", "*"]);
        if dev {
            command.env("RELAY_DEV", "1");
        }
        command.output().expect("fanout runs")
    };
    let refused = token(false);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("documented example") && stderr.contains("RELAY_DEV=1"), "{stderr}");
    let accepted = token(true);
    assert!(accepted.status.success(), "{}", String::from_utf8_lossy(&accepted.stderr));
    assert_eq!(String::from_utf8_lossy(&accepted.stdout).trim().split('.').count(), 3, "a JWT");
}
