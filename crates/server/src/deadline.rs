//! Per-request deadlines: the `x-ferry-timeout` header (seconds) sets one for a request to a
//! local model, counted from its arrival. The engine applies the earlier of it and the
//! model's `--request-timeout`, and ends a request still queued or generating at its
//! deadline (504 `deadline_exceeded`, or an error event in a stream already started).

use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

pub const HEADER: &str = "x-ferry-timeout";

/// The longest deadline a request may ask for: a day.
const MAX_SECONDS: f64 = 86_400.0;

tokio::task_local! {
    static DEADLINE: Option<Instant>;
}

/// The deadline of the request being handled, if it asked for one.
pub fn current() -> Option<Instant> {
    DEADLINE.try_with(|d| *d).ok().flatten()
}

/// Middleware on the `/v1` routes: reads the header and keeps the deadline for the handler.
pub async fn scope(request: Request, next: Next) -> Response {
    let arrived = Instant::now();
    let deadline = match request.headers().get(HEADER).map(|v| parse(v.to_str().unwrap_or(""))) {
        None => None,
        Some(Ok(timeout)) => arrived.checked_add(timeout),
        Some(Err(e)) => {
            return if request.uri().path().starts_with("/v1/messages") {
                crate::messages::error_response(e)
            } else {
                e.into_response()
            };
        }
    };
    DEADLINE.scope(deadline, next.run(request)).await
}

fn parse(value: &str) -> Result<Duration, ApiError> {
    match value.trim().parse::<f64>() {
        Ok(s) if s.is_finite() && (0.0..=MAX_SECONDS).contains(&s) => Ok(Duration::from_secs_f64(s)),
        _ => Err(ApiError::invalid(
            HEADER,
            format!("The {HEADER} header must be a number of seconds from 0 to {MAX_SECONDS}, not '{value}'"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_seconds_and_refuses_the_rest() {
        assert_eq!(parse("2.5").ok(), Some(Duration::from_millis(2500)));
        assert_eq!(parse(" 0 ").ok(), Some(Duration::ZERO));
        for bad in ["", "-1", "soon", "NaN", "inf", "100000"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
