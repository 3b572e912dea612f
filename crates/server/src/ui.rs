//! The admin web UI at `/ui`: static HTML, CSS and JavaScript modules compiled into the
//! binary (no build step, nothing fetched from elsewhere, so it works offline). The pages
//! hold no data of their own: they call the admin and `/v1` APIs with the key the user
//! signed in with, so the UI can do nothing that key could not.
//!
//! Assets are not fingerprinted, so every response says `no-cache` with an `ETag`: the
//! browser revalidates and gets a 304 until the binary changes.

use std::sync::OnceLock;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

use crate::app::AppState;

/// (path under `/ui/`, content type, bytes).
const ASSETS: &[(&str, &str, &[u8])] = &[
    ("index.html", HTML, include_bytes!("../ui/index.html")),
    ("app.css", CSS, include_bytes!("../ui/app.css")),
    ("app.js", JS, include_bytes!("../ui/app.js")),
    ("api.js", JS, include_bytes!("../ui/api.js")),
    ("dom.js", JS, include_bytes!("../ui/dom.js")),
    ("charts.js", JS, include_bytes!("../ui/charts.js")),
    ("pages/overview.js", JS, include_bytes!("../ui/pages/overview.js")),
    ("pages/access.js", JS, include_bytes!("../ui/pages/access.js")),
    ("pages/usage.js", JS, include_bytes!("../ui/pages/usage.js")),
    ("pages/models.js", JS, include_bytes!("../ui/pages/models.js")),
    ("pages/playground.js", JS, include_bytes!("../ui/pages/playground.js")),
    ("pages/traces.js", JS, include_bytes!("../ui/pages/traces.js")),
    ("favicon.svg", SVG, include_bytes!("../ui/favicon.svg")),
];

const HTML: &str = "text/html; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const SVG: &str = "image/svg+xml";

/// Scripts, styles and connections from this origin only; no framing.
const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
                   connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

pub fn routes() -> Router<AppState> {
    Router::new().route("/ui", get(index)).route("/ui/", get(index)).route("/ui/{*path}", get(asset))
}

async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

async fn asset(Path(path): Path<String>, headers: HeaderMap) -> Response {
    serve(&path, &headers)
}

/// Each asset's `ETag`, computed once.
fn etags() -> &'static [String] {
    static ETAGS: OnceLock<Vec<String>> = OnceLock::new();
    ETAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|(_, _, bytes)| format!("\"{}\"", &hex::encode(Sha256::digest(bytes))[..32]))
            .collect()
    })
}

fn serve(path: &str, request: &HeaderMap) -> Response {
    let Some(index) = ASSETS.iter().position(|(name, _, _)| *name == path) else {
        return (StatusCode::NOT_FOUND, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], "Not found\n")
            .into_response();
    };
    let (_, content_type, bytes) = ASSETS[index];
    let etag = &etags()[index];
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|tag| tag.trim() == etag));
    let mut response = if fresh { StatusCode::NOT_MODIFIED.into_response() } else { bytes.into_response() };
    let out = response.headers_mut();
    out.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    out.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(value) = HeaderValue::from_str(etag) {
        out.insert(header::ETAG, value);
    }
    out.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    out.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    out.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_an_asset_imports_is_embedded() {
        // A page importing a file missing from ASSETS would fail only in the browser.
        for (name, _, bytes) in ASSETS {
            let text = String::from_utf8_lossy(bytes);
            for (i, _) in text.match_indices(" from '") {
                let rest = &text[i + 7..];
                let Some(end) = rest.find('\'') else { continue };
                let target = &rest[..end];
                let base = name.rsplit_once('/').map_or("", |(dir, _)| dir);
                let resolved = resolve(base, target);
                assert!(
                    ASSETS.iter().any(|(n, _, _)| *n == resolved),
                    "{name} imports {target} ({resolved}), which is not embedded"
                );
            }
        }
    }

    fn resolve(base: &str, target: &str) -> String {
        let mut parts: Vec<&str> = base.split('/').filter(|p| !p.is_empty()).collect();
        for piece in target.split('/') {
            match piece {
                "." => {}
                ".." => {
                    parts.pop();
                }
                other => parts.push(other),
            }
        }
        parts.join("/")
    }

    #[test]
    fn the_routes_register_without_conflict() {
        let _router: Router<AppState> = routes();
    }

    #[test]
    fn assets_revalidate_with_etags() {
        let first = serve("app.css", &HeaderMap::new());
        assert_eq!(first.status(), StatusCode::OK);
        assert_eq!(first.headers()[header::CONTENT_TYPE], CSS);
        assert_eq!(first.headers()[header::CACHE_CONTROL], "no-cache");
        let etag = first.headers()[header::ETAG].clone();
        let mut again = HeaderMap::new();
        again.insert(header::IF_NONE_MATCH, etag);
        assert_eq!(serve("app.css", &again).status(), StatusCode::NOT_MODIFIED);
        assert_eq!(serve("pages/overview.js", &HeaderMap::new()).headers()[header::CONTENT_TYPE], JS);
        assert_eq!(serve("../Cargo.toml", &HeaderMap::new()).status(), StatusCode::NOT_FOUND);
    }
}
