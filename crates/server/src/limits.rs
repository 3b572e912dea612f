//! Rate limits and budgets, per key, project and tenant; a request must fit all three.
//!
//! Requests and tokens per minute are sliding windows (exact: never more than the limit in
//! any 60 seconds). Tokens are admitted on an estimate (the prompt's size plus the requested
//! maximum) and reconciled to the real count when the request ends. Day and month budgets
//! start from what the usage records say was spent, count in memory, and are read again from
//! the records every [`BUDGET_REFRESH`], so that replicas sharing a database see each other's
//! spending within that time. The per-minute windows live in this process: replicas behind
//! a load balancer each enforce the whole limit, unless they share Redis (`--redis-url`,
//! `shared.rs`), which then holds the per-minute windows of every replica.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use ferry_store::usage::{Scope, day_and_month_start};
use ferry_store::{Limits, Store, now_ms};

use crate::shared::Shared;

use crate::error::ApiError;

pub(crate) const WINDOW: Duration = Duration::from_secs(60);
/// How often a budget's spending is read again from the usage records.
pub const BUDGET_REFRESH: Duration = Duration::from_secs(5);

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

    /// `key:ID`, `project:ID` or `tenant:ID`.
    pub(crate) fn window_name(&self) -> &str {
        &self.window
    }
}

/// What a scope's per-minute window holds, and when its oldest admission leaves it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InWindow {
    pub requests: u64,
    pub request_wait: Duration,
    pub tokens: u64,
    pub token_wait: Duration,
}

/// Marks a scope of a shared admission whose window is not shared (it has budgets only).
const NO_BUCKET: u64 = u64::MAX;

/// Whole seconds to wait, rounded up: `Retry-After` never says less than the message.
fn retry_after(wait: Duration) -> u64 {
    (wait.as_millis().div_ceil(1000) as u64).max(1)
}

/// Refuses a request that the scope's requests or tokens per minute cannot take now.
fn check_rate(s: &Subject, used: &InWindow, tokens: u64) -> Result<(), ApiError> {
    let l = &s.limits;
    let who = s.kind.name();
    if let Some(rpm) = l.rpm
        && used.requests >= rpm
    {
        let wait = used.request_wait;
        return Err(ApiError::RateLimited {
            message: format!(
                "Rate limit reached for this {who}: {rpm} requests per minute. Retry in {}.",
                reset(wait)
            ),
            tokens: false,
            retry_after: Some(retry_after(wait)),
            headers: Box::new(headers(false, rpm, 0, wait)),
        });
    }
    if let Some(tpm) = l.tpm
        && used.tokens + tokens > tpm
    {
        let remaining = tpm.saturating_sub(used.tokens);
        if tokens > tpm {
            return Err(ApiError::RateLimited {
                message: format!(
                    "This request may use {tokens} tokens (prompt and max tokens), more than this {who}'s limit of {tpm} tokens per minute; lower max_tokens."
                ),
                tokens: true,
                // Waiting cannot help: the client is told not to retry.
                retry_after: None,
                headers: Box::new(headers(true, tpm, remaining, WINDOW)),
            });
        }
        let wait = used.token_wait;
        return Err(ApiError::RateLimited {
            message: format!(
                "Rate limit reached for this {who}: {tpm} tokens per minute, {} in use, {tokens} requested. Retry in {}.",
                used.tokens,
                reset(wait)
            ),
            tokens: true,
            retry_after: Some(retry_after(wait)),
            headers: Box::new(headers(true, tpm, remaining, wait)),
        });
    }
    Ok(())
}

/// Refuses a request that may take the scope past a token budget, or whose cost budget is
/// spent.
fn check_budget(s: &Subject, w: &Window, tokens: u64) -> Result<(), ApiError> {
    let l = &s.limits;
    let budgets = [
        (l.tokens_per_day.is_some_and(|b| w.day.tokens + tokens > b), "daily token"),
        (l.tokens_per_month.is_some_and(|b| w.month.tokens + tokens > b), "monthly token"),
        (l.cost_per_day.is_some_and(|b| w.day.cost >= b), "daily cost"),
        (l.cost_per_month.is_some_and(|b| w.month.cost >= b), "monthly cost"),
    ];
    match budgets.iter().find(|(over, _)| *over) {
        Some((_, what)) => Err(ApiError::QuotaExceeded(format!(
            "This {} has used its {what} budget. It renews at the start of the next UTC {}.",
            s.kind.name(),
            if what.starts_with("daily") { "day" } else { "month" }
        ))),
        None => Ok(()),
    }
}

/// (limit, remaining, reset) of the tightest scope, for requests and for tokens.
#[derive(Default)]
struct Tightest([Option<(u64, u64, Duration)>; 2]);

impl Tightest {
    fn add(&mut self, s: &Subject, used: &InWindow) {
        let limits =
            [(s.limits.rpm, used.requests, used.request_wait), (s.limits.tpm, used.tokens, used.token_wait)];
        for (tightest, (limit, used, wait)) in self.0.iter_mut().zip(limits) {
            if let Some(limit) = limit {
                let remaining = limit.saturating_sub(used);
                if tightest.is_none_or(|(_, r, _)| remaining < r) {
                    *tightest = Some((limit, remaining, wait));
                }
            }
        }
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

/// One millisecond of a scope's admissions: when its first came, and how many (requests or
/// tokens). Admissions within a millisecond of each other share one, so a window holds at
/// most 60,000 of them whatever the traffic (one per admission made it grow with the request
/// rate: about a million a scope at 17k requests a second), and each leaves the window up to
/// a millisecond early.
type Bucket = (Instant, u64);

/// How close in time two admissions must be to share a bucket.
const BUCKET: Duration = Duration::from_millis(1);

/// Adds `amount` at `now` to the newest bucket, or to a new one; the bucket's index.
fn add(buckets: &mut VecDeque<Bucket>, now: Instant, amount: u64) -> usize {
    match buckets.back_mut() {
        Some((t, n)) if now.saturating_duration_since(*t) < BUCKET => *n += amount,
        _ => buckets.push_back((now, amount)),
    }
    buckets.len() - 1
}

#[derive(Default)]
struct Window {
    requests: VecDeque<Bucket>,
    request_count: u64,
    tokens: VecDeque<Bucket>,
    token_sum: u64,
    /// How many buckets have left `tokens` from the front, ever: a bucket at index `i` when
    /// this was `p` sits at index `i + p - pruned` until it leaves.
    pruned: u64,
    day: Spend,
    month: Spend,
    /// When the budgets' spending was last read from the usage records.
    seeded_at: Option<Instant>,
}

impl Window {
    fn in_window(&self, now: Instant) -> InWindow {
        let wait = |buckets: &VecDeque<Bucket>| {
            buckets.front().map_or(WINDOW, |(t, _)| WINDOW.saturating_sub(now.duration_since(*t)))
        };
        InWindow {
            requests: self.request_count,
            request_wait: wait(&self.requests),
            tokens: self.token_sum,
            token_wait: wait(&self.tokens),
        }
    }

    fn prune(&mut self, now: Instant) {
        while let Some(&(t, count)) = self.requests.front() {
            if now.duration_since(t) < WINDOW {
                break;
            }
            self.request_count -= count;
            self.requests.pop_front();
        }
        while let Some(&(t, amount)) = self.tokens.front() {
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
        // Within the day being counted neither total changes: the calendar is asked only when
        // the day may have moved on (it was asked for every scope of every request).
        const DAY_MS: i64 = 86_400_000;
        if (self.day.since_ms..self.day.since_ms + DAY_MS).contains(&now_ms) {
            return;
        }
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
    /// The tokens admitted, to be replaced by those used when it is settled.
    estimate: u64,
    /// Each scope's window, with the position of the bucket holding this admission's tokens
    /// (see `Window::pruned`), so that settling finds them without a search; or, when
    /// `shared`, the bucket's time in the shared window (`NO_BUCKET`: the scope has none).
    scopes: Vec<(Arc<str>, u64)>,
    /// Counted in the windows replicas share through Redis.
    shared: bool,
    /// The `x-ratelimit-*` headers for the response: (limit, remaining, reset) of the
    /// tightest scope, for requests and for tokens.
    headers: [Option<[HeaderValue; 3]>; 2],
}

impl Admission {
    /// An admission of `estimate` tokens about to be counted in `scopes` windows, the
    /// process's own or (`shared`) those in Redis.
    fn counting(estimate: u64, scopes: usize, shared: bool) -> Admission {
        Admission { estimate, scopes: Vec::with_capacity(scopes), shared, headers: [None, None] }
    }

    /// How many `x-ratelimit-*` headers [`Admission::write_headers`] adds.
    pub fn n_headers(&self) -> usize {
        self.headers.iter().flatten().count() * 3
    }

    /// Adds the `x-ratelimit-*` headers to a response's.
    pub fn write_headers(&mut self, headers: &mut HeaderMap) {
        for (names, values) in HEADER_NAMES.iter().zip(&mut self.headers) {
            if let Some(values) = values.take() {
                for (name, value) in names.iter().zip(values) {
                    headers.insert(name.clone(), value);
                }
            }
        }
    }
}

/// OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` header names, made at
/// compile time (a name built per request is checked byte by byte each time).
static HEADER_NAMES: [[HeaderName; 3]; 2] = [
    [
        HeaderName::from_static("x-ratelimit-limit-requests"),
        HeaderName::from_static("x-ratelimit-remaining-requests"),
        HeaderName::from_static("x-ratelimit-reset-requests"),
    ],
    [
        HeaderName::from_static("x-ratelimit-limit-tokens"),
        HeaderName::from_static("x-ratelimit-remaining-tokens"),
        HeaderName::from_static("x-ratelimit-reset-tokens"),
    ],
];

pub struct Limiter {
    windows: Mutex<foldhash::HashMap<Arc<str>, Window>>,
    /// Per-minute windows shared with other replicas, when Redis is configured.
    shared: Option<Arc<crate::shared::SharedState>>,
    /// How often budgets are read again from the usage records (`None`: once, for a server
    /// that writes no records).
    budget_refresh: Option<Duration>,
}

/// OpenAI's duration format for reset headers: `20ms`, `6s`, `1m30s`.
fn reset(d: Duration) -> String {
    String::from_utf8_lossy(&reset_text(d)).into_owned()
}

/// [`reset`]'s text, without `fmt` or an allocation: at most 27 bytes (`{u64}m59s`).
fn reset_text(d: Duration) -> ArrayText {
    let ms = d.as_millis().min(u128::from(u64::MAX)) as u64;
    let secs = ms.div_ceil(1000);
    let mut text = ArrayText::default();
    let mut digits = itoa::Buffer::new();
    if ms < 1000 {
        text.push(digits.format(ms).as_bytes());
        text.push(b"ms");
    } else if secs < 60 {
        text.push(digits.format(secs).as_bytes());
        text.push(b"s");
    } else {
        text.push(digits.format(secs / 60).as_bytes());
        text.push(b"m");
        text.push(digits.format(secs % 60).as_bytes());
        text.push(b"s");
    }
    text
}

/// A short text on the stack.
#[derive(Default)]
struct ArrayText {
    bytes: [u8; 32],
    len: usize,
}

impl ArrayText {
    fn push(&mut self, bytes: &[u8]) {
        let end = (self.len + bytes.len()).min(self.bytes.len());
        self.bytes[self.len..end].copy_from_slice(&bytes[..end - self.len]);
        self.len = end;
    }
}

impl std::ops::Deref for ArrayText {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl Limiter {
    pub fn new() -> Limiter {
        Limiter {
            windows: Mutex::new(Default::default()),
            shared: None,
            budget_refresh: Some(BUDGET_REFRESH),
        }
    }

    /// Counts requests and tokens per minute in windows shared with other replicas.
    pub fn share(&mut self, shared: Arc<crate::shared::SharedState>) {
        self.shared = Some(shared);
    }

    /// Reads budgets from the usage records once only (a server without metering writes none,
    /// so its budgets count this process alone).
    pub fn read_budgets_once(&mut self) {
        self.budget_refresh = None;
    }

    /// Reads the day and month spending of scopes with budgets this process hasn't seen, or
    /// hasn't read for [`BUDGET_REFRESH`] (other replicas spend too).
    async fn seed(&self, store: &Store, scoped: &[&Subject]) -> Result<(), ApiError> {
        let fresh = |w: &Window| {
            w.seeded_at.is_some_and(|at| self.budget_refresh.is_none_or(|every| at.elapsed() < every))
        };
        for s in scoped {
            let key = &s.window;
            let l = &s.limits;
            let budgets = l.tokens_per_day.is_some()
                || l.tokens_per_month.is_some()
                || l.cost_per_day.is_some()
                || l.cost_per_month.is_some();
            if !budgets || self.windows.lock().map_err(poisoned)?.get(key).is_some_and(fresh) {
                continue;
            }
            let (day, month) = day_and_month_start(now_ms());
            let scope = match s.kind {
                ScopeKind::Key => Scope::Key(&s.id),
                ScopeKind::Project => Scope::Project(&s.id),
                ScopeKind::Tenant => Scope::Tenant(&s.id),
            };
            // Boxed: read once per scope, they would otherwise size every admission's state.
            let (day_tokens, day_cost) = Box::pin(store.spent(scope, day)).await?;
            let (month_tokens, month_cost) = Box::pin(store.spent(scope, month)).await?;
            let mut windows = self.windows.lock().map_err(poisoned)?;
            let w = windows.entry(key.clone()).or_default();
            // The records hold every replica's finished requests, this one's included (those of
            // the last moments, still gathering for their group commit, are counted again at the
            // next reading).
            if !fresh(w) {
                w.day = Spend { since_ms: day, tokens: day_tokens, cost: day_cost };
                w.month = Spend { since_ms: month, tokens: month_tokens, cost: month_cost };
                w.seeded_at = Some(Instant::now());
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
        if let Some(shared) = &self.shared {
            let windowed: Vec<&Subject> =
                scoped.iter().copied().filter(|s| s.limits.rpm.is_some() || s.limits.tpm.is_some()).collect();
            // Budgets are checked here first: the shared windows count an admission at once.
            self.check_budgets(&scoped, tokens)?;
            let outcome = if windowed.is_empty() {
                Ok(Shared::Admitted(Vec::new()))
            } else {
                shared.admit(&windowed, tokens).await
            };
            match outcome {
                Ok(Shared::Admitted(uses)) => {
                    return Ok(self.admitted_shared(&scoped, &windowed, &uses, tokens));
                }
                Ok(Shared::Refused(index, in_window)) => {
                    return match windowed.get(index) {
                        Some(s) => check_rate(s, &in_window, tokens),
                        None => Err(ApiError::Internal("the shared rate limiter named no scope".into())),
                    }
                    .map(|()| Admission::default());
                }
                // The shared windows are out of reach: this process counts alone until they
                // are back (each replica then enforces the whole limit).
                Err(e) => shared.unreachable(&e),
            }
        }
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
            check_rate(s, &w.in_window(now), tokens)?;
            check_budget(s, w, tokens)?;
        }
        let mut admission = Admission::counting(tokens, scoped.len(), false);
        let mut tightest = Tightest::default();
        for s in scoped {
            let Some(w) = windows.get_mut(&s.window) else { continue };
            add(&mut w.requests, now, 1);
            w.request_count += 1;
            let position = w.pruned + add(&mut w.tokens, now, tokens) as u64;
            w.token_sum += tokens;
            tightest.add(s, &w.in_window(now));
            admission.scopes.push((s.window.clone(), position));
        }
        admission.headers = header_values(tightest.0);
        Ok(admission)
    }

    /// Refuses a request that the day or month budgets of any scope cannot take.
    fn check_budgets(&self, scoped: &[&Subject], tokens: u64) -> Result<(), ApiError> {
        let wall = now_ms();
        let mut windows = self.windows.lock().map_err(poisoned)?;
        for s in scoped {
            let w = windows.entry(s.window.clone()).or_default();
            w.roll(wall);
            check_budget(s, w, tokens)?;
        }
        Ok(())
    }

    /// The admission the shared windows made: their buckets, to settle in them, and the
    /// headers of the tightest scope.
    fn admitted_shared(
        &self,
        scoped: &[&Subject],
        windowed: &[&Subject],
        uses: &[(u64, InWindow)],
        tokens: u64,
    ) -> Admission {
        let mut admission = Admission::counting(tokens, scoped.len(), true);
        let mut tightest = Tightest::default();
        for (s, (bucket, in_window)) in windowed.iter().zip(uses) {
            tightest.add(s, in_window);
            admission.scopes.push((s.window.clone(), *bucket));
        }
        // Scopes with budgets only: settled in this process alone.
        for s in scoped.iter().filter(|s| !windowed.iter().any(|w| Arc::ptr_eq(&w.window, &s.window))) {
            admission.scopes.push((s.window.clone(), NO_BUCKET));
        }
        admission.headers = header_values(tightest.0);
        admission
    }

    /// Replaces the admitted estimate with the tokens really used, and adds them and their
    /// cost to the budgets.
    pub fn settle(&self, admission: &Admission, tokens: u64, cost: f64) {
        if admission.scopes.is_empty() {
            return;
        }
        if admission.shared
            && let Some(shared) = &self.shared
        {
            let buckets = admission.scopes.iter().filter(|(_, b)| *b != NO_BUCKET).cloned().collect();
            shared.settle(buckets, admission.estimate, tokens);
        }
        let Ok(mut windows) = self.windows.lock() else { return };
        let wall = now_ms();
        for (key, position) in &admission.scopes {
            let Some(w) = windows.get_mut(key) else { continue };
            // Gone from the window once older than a minute (the position is then below
            // `pruned`); while there, its bucket holds the estimate among others' tokens.
            let index = position.checked_sub(w.pruned).and_then(|i| usize::try_from(i).ok());
            if !admission.shared
                && let Some(bucket) = index.and_then(|i| w.tokens.get_mut(i))
            {
                let estimate = admission.estimate.min(bucket.1);
                bucket.1 = bucket.1 - estimate + tokens;
                w.token_sum = w.token_sum - estimate + tokens;
            }
            w.roll(wall);
            w.day.tokens += tokens;
            w.day.cost += cost;
            w.month.tokens += tokens;
            w.month.cost += cost;
        }
    }
}

/// The values of OpenAI's `x-ratelimit-*` headers for (limit, remaining, reset) of requests
/// and of tokens.
fn header_values(values: [Option<(u64, u64, Duration)>; 2]) -> [Option<[HeaderValue; 3]>; 2] {
    values.map(|values| {
        let (limit, remaining, wait) = values?;
        // `reset` writes digits and letters only, always a valid header value.
        let reset = HeaderValue::from_bytes(&reset_text(wait)).unwrap_or(HeaderValue::from_static("0ms"));
        Some([HeaderValue::from(limit), HeaderValue::from(remaining), reset])
    })
}

/// The same, as a map (for a refusal's response).
fn headers(tokens: bool, limit: u64, remaining: u64, wait: Duration) -> HeaderMap {
    let mut values = [None, None];
    values[usize::from(tokens)] = Some((limit, remaining, wait));
    let mut admission = Admission { headers: header_values(values), ..Default::default() };
    let mut map = HeaderMap::with_capacity(3);
    admission.write_headers(&mut map);
    map
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
        assert_eq!(reset(Duration::ZERO), "0ms");
        assert_eq!(reset(Duration::from_millis(60_000)), "1m0s");
    }

    #[test]
    fn rate_limit_headers_read_as_openai_writes_them() {
        let mut map = HeaderMap::new();
        let values =
            [Some((60, 0, Duration::from_millis(1500))), Some((u64::MAX, 1234, Duration::from_millis(7)))];
        let mut admission = Admission { headers: header_values(values), ..Default::default() };
        assert_eq!(retry_after(Duration::from_millis(59_001)), 60);
        assert_eq!(retry_after(Duration::from_millis(20)), 1);
        assert_eq!(admission.n_headers(), 6);
        admission.write_headers(&mut map);
        let get = |name: &str| map.get(name).and_then(|v| v.to_str().ok()).map(String::from);
        assert_eq!(get("x-ratelimit-limit-requests").as_deref(), Some("60"));
        assert_eq!(get("x-ratelimit-remaining-requests").as_deref(), Some("0"));
        assert_eq!(get("x-ratelimit-reset-requests").as_deref(), Some("2s"));
        assert_eq!(get("x-ratelimit-limit-tokens"), Some(u64::MAX.to_string()));
        assert_eq!(get("x-ratelimit-remaining-tokens").as_deref(), Some("1234"));
        assert_eq!(get("x-ratelimit-reset-tokens").as_deref(), Some("7ms"));
        // Only the tokens' three when requests have no limit.
        let only_tokens = headers(true, 100, 40, Duration::from_secs(60));
        assert_eq!(only_tokens.len(), 3);
        assert_eq!(only_tokens.get("x-ratelimit-reset-tokens").and_then(|v| v.to_str().ok()), Some("1m0s"));
    }

    #[test]
    fn admissions_within_a_millisecond_share_a_bucket_and_settle_within_it() {
        let limiter = Limiter::new();
        let key: Arc<str> = "key:k1".into();
        let now = Instant::now();
        let mut window = Window::default();
        // A burst: 1000 admissions of 10 tokens in the same instant.
        let positions: Vec<u64> = (0..1000)
            .map(|_| {
                add(&mut window.requests, now, 1);
                window.request_count += 1;
                window.token_sum += 10;
                window.pruned + add(&mut window.tokens, now, 10) as u64
            })
            .collect();
        assert_eq!((window.requests.len(), window.tokens.len()), (1, 1));
        assert_eq!((window.request_count, window.token_sum), (1000, 10_000));
        // Two milliseconds on, a new bucket.
        let later = now + Duration::from_millis(2);
        add(&mut window.tokens, later, 5);
        window.token_sum += 5;
        assert_eq!(window.tokens.len(), 2);
        limiter.windows.lock().unwrap().insert(key.clone(), window);
        // One admission used 3 of its 10 tokens: its bucket and the sum drop by 7.
        let admission = Admission {
            estimate: 10,
            scopes: vec![(key.clone(), positions[0])],
            shared: false,
            headers: [None, None],
        };
        limiter.settle(&admission, 3, 0.0);
        let windows = limiter.windows.lock().unwrap();
        let w = &windows[&key];
        assert_eq!((w.tokens[0].1, w.tokens[1].1, w.token_sum), (9_993, 5, 9_998));
        assert_eq!((w.day.tokens, w.month.tokens), (3, 3));
    }

    #[test]
    fn buckets_leave_the_window_after_a_minute() {
        let start = Instant::now();
        let mut w = Window::default();
        add(&mut w.requests, start, 1);
        w.request_count = 1;
        w.token_sum = 7;
        add(&mut w.tokens, start, 7);
        w.prune(start + WINDOW - Duration::from_millis(1));
        assert_eq!((w.request_count, w.token_sum, w.pruned), (1, 7, 0));
        w.prune(start + WINDOW);
        assert_eq!((w.request_count, w.token_sum, w.pruned), (0, 0, 1));
        assert!(w.requests.is_empty() && w.tokens.is_empty());
    }
}
