//! The live inbox page: `GET /` (plain HTML) and `GET /client.js` (the reusable socket
//! client as an ES module). Both are compiled into the binary, so a fanout replica
//! serves them with no files beside it and no build step.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::state::AppState;

const INDEX_HTML: &str = include_str!("../static/index.html");
const CLIENT_JS: &str = include_str!("../static/client.js");

pub fn router() -> Router<AppState> {
    Router::new().route("/", get(index)).route("/client.js", get(client_js))
}

async fn index() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], INDEX_HTML)
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
