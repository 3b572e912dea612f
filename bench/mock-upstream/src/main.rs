//! A fast mock of an OpenAI-compatible upstream for bench/gateway_bench.py: every
//! `POST /v1/chat/completions` gets the same small completion in OpenAI's wire format, so
//! what the benchmark measures is the gateway in front of it.
//! Usage: ferry-mock-upstream PORT (0 picks one; the address is printed).

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::post;

const ANSWER: &str = r#"{"id":"chatcmpl-mock","object":"chat.completion","created":1700000000,"model":"mock","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the mock upstream."},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}"#;

async fn completion() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], ANSWER)
}

fn main() -> std::io::Result<()> {
    let port: u16 = std::env::args().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        println!("mock listening on http://{}", listener.local_addr()?);
        let app = Router::new().route("/v1/chat/completions", post(completion));
        axum::serve(listener, app).await
    })
}
