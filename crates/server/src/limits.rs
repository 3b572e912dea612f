//! Rate limits and budgets, per key, project and tenant; a request must fit all three.
//!
//! Requests and tokens per minute are sliding windows (exact: never more than the limit in
//! any 60 seconds). Tokens are admitted on an estimate (the prompt's size plus the requested
//! maximum) and reconciled to the real count when the request ends. Day and month budgets
//! start from what the usage records say was spent, then count in memory. The windows live
//! in this process: replicas behind a load balancer each enforce the whole limit.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use ferry_store::usage::{Scope, day_and_month_start};
use ferry_store::{Limits, Store, now_ms};

use crate::error::ApiError;

const WINDOW: Duration = Duration::from_secs(60);

/// A scope a request counts against, with its limits.
#[derive(Debug, Clone)]
pub struct Subject {
    pub kind: ScopeKind,
    pub id: String,
    pub limits: Limits,
    /// Names the scope's window (`key:ID`), made once per subject, not per request.
    window: Arc<str>,
}

impl Subject {
    pub fn new(kind: ScopeKind, id: &str, limits: &Limits) -> Subject {
        let window = format!("{}:{id}", kind.name()).into();
        Subject { kind, id: id.to_string(), limits: limits.clone(), window }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeKind {
    Key,
    Project,
    Tenant,
}

impl ScopeKind {
    fn name(self) -> &'static str {
        match self {
            ScopeKind::Key => "key",
            ScopeKind::Project => "project",
            ScopeKind::Tenant => "tenant",
        }
    }
}

#[derive(Default)]
struct Spend {
    since_ms: i64,
    tokens: u64,
    cost: f64,
}

#[derive(Default)]
struct Window {
    requests: VecDeque<Instant>,
    /// (admitted at, reservation id, tokens)
    tokens: VecDeque<(Instant, u64, u64)>,
    token_sum: u64,
    /// How many entries have left `tokens` from the front, ever: an entry pushed when this
    /// plus the length was `n` sits at index `n - pruned` until it leaves.
    pruned: u64,
    day: Spend,
    month: Spend,
    seeded: bool,
}

impl Window {
    fn prune(&mut self, now: Instant) {
        while self.requests.front().is_some_and(|t| now.duration_since(*t) >= WINDOW) {
            self.requests.pop_front();
        }
        while let Some(&(t, _, amount)) = self.tokens.front() {
            if now.duration_since(t) < WINDOW {
                break;
            }
            self.token_sum -= amount;
            self.tokens.pop_front();
            self.pruned += 1;
        }
    }

    /// Starts new day and month totals when the calendar moved on.
    fn roll(&mut self, now_ms: i64) {
        let (day, month) = day_and_month_start(now_ms);
        if self.day.since_ms != day {
            self.day = Spend { since_ms: day, ..Default::default() };
        }
        if self.month.since_ms != month {
            self.month = Spend { since_ms: month, ..Default::default() };
        }
    }
}

/// What admission took, to give back or settle when the request ends.
#[derive(Debug, Default)]
pub struct Admission {
    id: u64,
    /// Each scope's window, with the position of this admission's tokens in it (see
    /// `Window::pruned`), so that settling finds them without a search.
    scopes: Vec<(Arc<str>, u64)>,
    /// `x-ratelimit-*` headers for the response, as names and values: a map of its own
    /// would be built only to be merged into the response's.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

pub struct Limiter {
    windows: Mutex<HashMap<Arc<str>, Window>>,
    next_id: std::sync::atomic::AtomicU64,
}

/// OpenAI's duration format for reset headers: `20ms`, `6s`, `1m30s`.
fn reset(d: Duration) -> String {
    let ms = d.as_millis();
    let secs = ms.div_ceil(1000);
    if ms < 1000 {
        format!("{ms}ms")
    } else if secs < 60 {
        format!("{secs}s")
    } else {
        format!("{}m{}s", secs / 60, secs % 60)
    }
}

impl Limiter {
    pub fn new() -> Limiter {
        Limiter { windows: Mutex::new(HashMap::new()), next_id: 1.into() }
    }

    /// Reads the day and month spending of scopes with budgets this process hasn't seen.
    async fn seed(&self, store: &Store, scoped: &[&Subject]) -> Result<(), ApiError> {
        for s in scoped {
            let key = &s.window;
            let l = &s.limits;
            let budgets = l.tokens_per_day.is_some()
                || l.tokens_per_month.is_some()
                || l.cost_per_day.is_some()
                || l.cost_per_month.is_some();
            if !budgets || self.windows.lock().map_err(poisoned)?.get(key).is_some_and(|w| w.seeded) {
                continue;
            }
            let (day, month) = day_and_month_start(now_ms());
            let scope = match s.kind {
                ScopeKind::Key => Scope::Key(&s.id),
                ScopeKind::Project => Scope::Project(&s.id),
                ScopeKind::Tenant => Scope::Tenant(&s.id),
            };
            let (day_tokens, day_cost) = store.spent(scope, day).await?;
            let (month_tokens, month_cost) = store.spent(scope, month).await?;
            let mut windows = self.windows.lock().map_err(poisoned)?;
            let w = windows.entry(key.clone()).or_default();
            if !w.seeded {
                w.day = Spend { since_ms: day, tokens: day_tokens, cost: day_cost };
                w.month = Spend { since_ms: month, tokens: month_tokens, cost: month_cost };
                w.seeded = true;
            }
        }
        Ok(())
    }

    /// Admits a request that may use `tokens` (estimated) against every subject, or refuses
    /// it without counting it anywhere.
    pub async fn admit(
        &self,
        store: &Store,
        subjects: &[Subject],
        tokens: u64,
    ) -> Result<Admission, ApiError> {
        let scoped: Vec<&Subject> = subjects.iter().filter(|s| !s.limits.is_empty()).collect();
        if scoped.is_empty() {
            return Ok(Admission::default());
        }
        self.seed(store, &scoped).await?;
        let now = Instant::now();
        let wall = now_ms();
        let mut windows = self.windows.lock().map_err(poisoned)?;
        for s in &scoped {
            if !windows.contains_key(&s.window) {
                windows.insert(s.window.clone(), Window::default());
            }
        }
        // Check every scope first, so a refusal counts nowhere.
        for s in &scoped {
            let Some(w) = windows.get_mut(&s.window) else { continue };
            w.prune(now);
            w.roll(wall);
            let l = &s.limits;
            let who = s.kind.name();
            if let Some(rpm) = l.rpm
                && w.requests.len() as u64 >= rpm
            {
                let wait =
                    w.requests.front().map_or(WINDOW, |t| WINDOW.saturating_sub(now.duration_since(*t)));
                return Err(ApiError::RateLimited {
                    message: format!(
                        "Rate limit reached for this {who}: {rpm} requests per minute. Retry in {}.",
                        reset(wait)
                    ),
                    tokens: false,
                    retry_after: wait.as_secs().max(1),
                    headers: Box::new(headers(false, rpm, 0, wait)),
                });
            }
            if let Some(tpm) = l.tpm
                && w.token_sum + tokens > tpm
            {
                if tokens > tpm {
                    return Err(ApiError::RateLimited {
                        message: format!(
                            "This request may use {tokens} tokens (prompt and max tokens), more than this {who}'s limit of {tpm} tokens per minute; lower max_tokens."
                        ),
                        tokens: true,
                        retry_after: 60,
                        headers: Box::new(headers(true, tpm, tpm.saturating_sub(w.token_sum), WINDOW)),
                    });
                }
                let wait =
                    w.tokens.front().map_or(WINDOW, |(t, ..)| WINDOW.saturating_sub(now.duration_since(*t)));
                return Err(ApiError::RateLimited {
                    message: format!(
                        "Rate limit reached for this {who}: {tpm} tokens per minute, {} in use, {tokens} requested. Retry in {}.",
                        w.token_sum,
                        reset(wait)
                    ),
                    tokens: true,
                    retry_after: wait.as_secs().max(1),
                    headers: Box::new(headers(true, tpm, tpm.saturating_sub(w.token_sum), wait)),
                });
            }
            // A token budget refuses a request that may take it past the budget.
            let budgets = [
                (l.tokens_per_day.is_some_and(|b| w.day.tokens + tokens > b), "daily token"),
                (l.tokens_per_month.is_some_and(|b| w.month.tokens + tokens > b), "monthly token"),
                (l.cost_per_day.is_some_and(|b| w.day.cost >= b), "daily cost"),
                (l.cost_per_month.is_some_and(|b| w.month.cost >= b), "monthly cost"),
            ];
            if let Some((_, what)) = budgets.iter().find(|(over, _)| *over) {
                return Err(ApiError::QuotaExceeded(format!(
                    "This {who} has used its {what} budget. It renews at the start of the next UTC {}.",
                    if what.starts_with("daily") { "day" } else { "month" }
                )));
            }
        }
        let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut admission =
            Admission { id, scopes: Vec::with_capacity(scoped.len()), headers: Vec::with_capacity(6) };
        // (limit, remaining, reset) of the tightest scope, for requests and for tokens.
        let mut requests: Option<(u64, u64, Duration)> = None;
        let mut token_headers: Option<(u64, u64, Duration)> = None;
        for s in scoped {
            let Some(w) = windows.get_mut(&s.window) else { continue };
            w.requests.push_back(now);
            let position = w.pruned + w.tokens.len() as u64;
            w.tokens.push_back((now, id, tokens));
            w.token_sum += tokens;
            if let Some(rpm) = s.limits.rpm {
                let remaining = rpm.saturating_sub(w.requests.len() as u64);
                let wait =
                    w.requests.front().map_or(WINDOW, |t| WINDOW.saturating_sub(now.duration_since(*t)));
                if requests.is_none_or(|(_, r, _)| remaining < r) {
                    requests = Some((rpm, remaining, wait));
                }
            }
            if let Some(tpm) = s.limits.tpm {
                let remaining = tpm.saturating_sub(w.token_sum);
                let wait =
                    w.tokens.front().map_or(WINDOW, |(t, ..)| WINDOW.saturating_sub(now.duration_since(*t)));
                if token_headers.is_none_or(|(_, r, _)| remaining < r) {
                    token_headers = Some((tpm, remaining, wait));
                }
            }
            admission.scopes.push((s.window.clone(), position));
        }
        for (tokens, values) in [(false, requests), (true, token_headers)] {
            if let Some((limit, remaining, wait)) = values {
                admission.headers.extend(header_values(tokens, limit, remaining, wait));
            }
        }
        Ok(admission)
    }

    /// Replaces the admitted estimate with the tokens really used, and adds them and their
    /// cost to the budgets.
    pub fn settle(&self, admission: &Admission, tokens: u64, cost: f64) {
        if admission.scopes.is_empty() {
            return;
        }
        let Ok(mut windows) = self.windows.lock() else { return };
        let wall = now_ms();
        for (key, position) in &admission.scopes {
            let Some(w) = windows.get_mut(key) else { continue };
            // Gone from the window once older than a minute; the id guards the arithmetic.
            let index = position.checked_sub(w.pruned).and_then(|i| usize::try_from(i).ok());
            if let Some(entry) = index.and_then(|i| w.tokens.get_mut(i))
                && entry.1 == admission.id
            {
                w.token_sum = w.token_sum - entry.2 + tokens;
                entry.2 = tokens;
            }
            w.roll(wall);
            w.day.tokens += tokens;
            w.day.cost += cost;
            w.month.tokens += tokens;
            w.month.cost += cost;
        }
    }
}

/// OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` headers.
fn header_values(tokens: bool, limit: u64, remaining: u64, wait: Duration) -> [(HeaderName, HeaderValue); 3] {
    let [limit_name, remaining_name, reset_name] = if tokens {
        ["x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"]
    } else {
        ["x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"]
    };
    // `reset` writes digits and letters only, always a valid header value.
    let reset_value = HeaderValue::from_str(&reset(wait)).unwrap_or_else(|_| HeaderValue::from_static("0ms"));
    [
        (HeaderName::from_static(limit_name), HeaderValue::from(limit)),
        (HeaderName::from_static(remaining_name), HeaderValue::from(remaining)),
        (HeaderName::from_static(reset_name), reset_value),
    ]
}

/// The same, as a map (for a refusal's response).
fn headers(tokens: bool, limit: u64, remaining: u64, wait: Duration) -> HeaderMap {
    header_values(tokens, limit, remaining, wait).into_iter().collect()
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter::new()
    }
}

fn poisoned<T>(_: T) -> ApiError {
    ApiError::Internal("the rate limiter's lock is poisoned".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_durations_read_like_openai() {
        assert_eq!(reset(Duration::from_millis(20)), "20ms");
        assert_eq!(reset(Duration::from_millis(5_200)), "6s");
        assert_eq!(reset(Duration::from_secs(90)), "1m30s");
    }
}
