//! The live inbox page: `GET /` (plain HTML) and `GET /client.js` (the reusable socket
//! client as an ES module). Both are compiled into the binary, so a fanout replica
//! serves them with no files beside it and no build step.
//!
//! The page sends its token to its own origin, and to the REST API origins the
//! operator lists (`FANOUT_PAGE_API_ORIGINS`), rendered into the page: never to an
//! origin a link names.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::state::AppState;

const INDEX_HTML: &str = include_str!("../static/index.html");
const CLIENT_JS: &str = include_str!("../static/client.js");

/// Where the page reads the origins it may call, besides its own.
const ORIGINS_PLACEHOLDER: &str = "{{API_ORIGINS}}";

pub fn router(api_origins: &[String]) -> Router<AppState> {
    let html: &'static str = Box::leak(render(api_origins).into_boxed_str());
    Router::new().route("/", get(move || index(html))).route("/client.js", get(client_js))
}

/// The page with the allowed origins in it: plain origins only (scheme, host, port),
/// so nothing an operator writes can break out of the attribute.
fn render(api_origins: &[String]) -> String {
    let origins: Vec<&str> = api_origins
        .iter()
        .map(|o| o.trim().trim_end_matches('/'))
        .filter(|o| {
            (o.starts_with("http://") || o.starts_with("https://"))
                && o.chars().all(|c| c.is_ascii_alphanumeric() || ".:/-[]".contains(c))
        })
        .collect();
    INDEX_HTML.replacen(ORIGINS_PLACEHOLDER, &origins.join(" "), 1)
}

async fn index(html: &'static str) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], html)
}

async fn client_js() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            // Other origins may import the module for their own frontend.
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
        ],
        CLIENT_JS,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_origins_are_rendered_into_the_page() {
        let html = render(&[
            "http://127.0.0.1:8000/".into(),
            "https://api.example.com".into(),
            "javascript:alert(1)".into(),
            "https://x.example\"><script>".into(),
        ]);
        assert!(html.contains(r#"content="http://127.0.0.1:8000 https://api.example.com""#), "{html}");
        assert!(!html.contains("javascript:") && !html.contains("x.example"));
    }
}
