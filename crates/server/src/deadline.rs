//! Per-request deadlines: the `x-ferry-timeout` header (seconds) sets one for a request to a
//! local model, counted from its arrival. The engine applies the earlier of it and the
//! model's `--request-timeout`, and ends a request still queued or generating at its
//! deadline (504 `deadline_exceeded`, or an error event in a stream already started).

use std::time::{Duration, Instant};

use axum::extract::Request;

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

/// The deadline a request asks for, counted from now; a bad header is a 400 naming it.
/// Read by the admission middleware on the `/v1` routes, which runs the rest of the request
/// [`within`] it (one layer fewer on every request than a middleware of its own).
pub fn requested(request: &Request) -> Result<Option<Instant>, ApiError> {
    let arrived = Instant::now();
    match request.headers().get(HEADER).map(|v| parse(v.to_str().unwrap_or(""))) {
        None => Ok(None),
        Some(Ok(timeout)) => Ok(arrived.checked_add(timeout)),
        Some(Err(e)) => Err(e),
    }
}

/// Runs `work` with `deadline` as the one [`current`] returns.
///
/// A plain function, not an `async fn`: an `async fn` would keep `work` twice in its state,
/// as its argument and inside the scope it awaits (admission's was 3.4 KB, copied on every
/// request).
pub fn within<F: Future>(deadline: Option<Instant>, work: F) -> impl Future<Output = F::Output> {
    DEADLINE.scope(deadline, work)
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
