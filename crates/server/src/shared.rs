//! State that replicas behind one load balancer share through Redis (`--redis-url`): the
//! per-minute rate-limit windows, so that a limit of N requests a minute admits N across all
//! replicas, not N on each; and word that keys changed, so that a revocation on one replica
//! takes effect on every other at once instead of when their key caches expire.
//!
//! A window is a scope's admissions of the last minute in millisecond buckets, as in
//! `limits.rs`: a list of bucket times (oldest first) and a hash of each bucket's requests and
//! tokens with their running sums. One Lua script prunes, checks and counts every scope of a
//! request atomically, on Redis's clock (replicas' clocks may disagree). A request's tokens are
//! settled to what it used by the same script at the next admission (one round trip a
//! request), or after a few milliseconds by a script of their own when no admission comes.
//! Keys expire a minute after their last admission.
//!
//! Redis is a helper, not a dependency of serving: while it is out of reach each replica
//! counts in its own windows (and says so in its log and in
//! `ferry_shared_state_errors_total`), and goes back to the shared ones when it answers.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures::StreamExt;
use redis::aio::ConnectionManager;

use crate::limits::{InWindow, Subject, WINDOW};
use crate::tenancy::Tenancy;

/// How long a call to Redis may take before admission goes on without it.
const CALL_TIMEOUT: Duration = Duration::from_millis(500);
/// Out of reach, it is warned about at most this often.
const WARN_EVERY: Duration = Duration::from_secs(30);

/// Settles requests' tokens to what they used (a bucket gone from the window is left alone):
/// one entry per scope of a request, KEYS from `first_key` on (each the scope's hash), three
/// ARGV from `first_arg` on (the estimate, the tokens used, the bucket).
const SETTLE_FN: &str = r"
local function settle(first_key, first_arg)
  local a = first_arg
  for k = first_key, #KEYS do
    local estimate, used, field = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), 't' .. ARGV[a + 2]
    local held = redis.call('HGET', KEYS[k], field)
    if held then
      local delta = used - math.min(estimate, tonumber(held))
      if delta ~= 0 then
        redis.call('HINCRBY', KEYS[k], field, delta)
        redis.call('HINCRBY', KEYS[k], 't', delta)
      end
    end
    a = a + 3
  end
end
";

/// Settles the entries given (see [`SETTLE_FN`]) first, then prunes, checks and counts a
/// request in every scope's window, or in none. Settles ride along with the next admission
/// so that a request costs one round trip to Redis, not two.
/// KEYS: per scope its bucket list and its hash, then the settles' hashes. ARGV: tokens, the
/// window in ms, the number of scopes, per scope its requests and tokens per minute ('' for
/// no limit), then the settles' arguments.
/// Returns {1, then per scope: bucket, requests, tokens, age of its oldest bucket in ms}, or
/// {0, the refusing scope (from 1), requests, tokens, age (-1: empty)}.
const ADMIT: &str = r"
local tokens = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
settle(2 * n + 1, 4 + 2 * n)
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
for i = 1, n do
  local buckets, sums = KEYS[2 * i - 1], KEYS[2 * i]
  while true do
    local oldest = redis.call('LINDEX', buckets, 0)
    if not oldest or now - tonumber(oldest) < window then break end
    redis.call('LPOP', buckets)
    local r = tonumber(redis.call('HGET', sums, 'r' .. oldest) or 0)
    local t = tonumber(redis.call('HGET', sums, 't' .. oldest) or 0)
    redis.call('HDEL', sums, 'r' .. oldest, 't' .. oldest)
    -- (Lua writes the negation of 0 as -0, which HINCRBY refuses.)
    if r ~= 0 then redis.call('HINCRBY', sums, 'r', 0 - r) end
    if t ~= 0 then redis.call('HINCRBY', sums, 't', 0 - t) end
  end
  local count = tonumber(redis.call('HGET', sums, 'r') or 0)
  local sum = tonumber(redis.call('HGET', sums, 't') or 0)
  local rpm, tpm = tonumber(ARGV[2 + 2 * i]), tonumber(ARGV[3 + 2 * i])
  if (rpm and count >= rpm) or (tpm and sum + tokens > tpm) then
    local oldest = redis.call('LINDEX', buckets, 0)
    return {0, i, count, sum, oldest and now - tonumber(oldest) or -1}
  end
end
local out = {1}
for i = 1, n do
  local buckets, sums = KEYS[2 * i - 1], KEYS[2 * i]
  local bucket = redis.call('LINDEX', buckets, -1)
  if not bucket or now - tonumber(bucket) >= 1 then
    bucket = tostring(now)
    redis.call('RPUSH', buckets, bucket)
  end
  redis.call('HINCRBY', sums, 'r' .. bucket, 1)
  redis.call('HINCRBY', sums, 't' .. bucket, tokens)
  local count = redis.call('HINCRBY', sums, 'r', 1)
  local sum = redis.call('HINCRBY', sums, 't', tokens)
  local oldest = redis.call('LINDEX', buckets, 0)
  redis.call('PEXPIRE', buckets, window + 1000)
  redis.call('PEXPIRE', sums, window + 1000)
  table.insert(out, tonumber(bucket))
  table.insert(out, count)
  table.insert(out, sum)
  table.insert(out, now - tonumber(oldest))
end
return out
";

/// Settles the entries given, alone (when no admission came to carry them).
const SETTLE: &str = r"
settle(1, 1)
return 0
";

/// How long a settle may wait for an admission to carry it before it goes in a call of its own.
const SETTLE_DELAY: Duration = Duration::from_millis(20);
/// At most this many scopes' settles go in one call.
const SETTLES_PER_CALL: usize = 256;

/// One scope's settle: its window, the bucket that holds the request, the estimate, the
/// tokens used.
struct Settle {
    window: Arc<str>,
    bucket: u64,
    estimate: u64,
    used: u64,
}

#[derive(Default)]
struct Pending {
    settles: Vec<Settle>,
    /// A call of their own is on its way (after [`SETTLE_DELAY`]).
    flush_scheduled: bool,
}

/// Takes up to [`SETTLES_PER_CALL`] of the settles waiting, oldest first.
fn oldest_settles(pending: &mut Pending) -> Vec<Settle> {
    let n = pending.settles.len().min(SETTLES_PER_CALL);
    pending.settles.drain(..n).collect()
}

/// What the shared windows said of a request.
pub(crate) enum Shared {
    /// Counted: each scope's bucket and its window after the admission.
    Admitted(Vec<(u64, InWindow)>),
    /// Refused by the scope at this index (of those passed), with its window.
    Refused(usize, InWindow),
}

pub struct SharedState {
    client: redis::Client,
    connection: ConnectionManager,
    /// Begins every Redis key and channel name, so that deployments can share a server.
    prefix: String,
    admit: redis::Script,
    settle: redis::Script,
    /// Settles not sent yet: the next admission carries them, or a call of their own.
    pending: Mutex<Pending>,
    /// Names this process in key-change announcements, so that it skips its own.
    me: String,
    warned_at: Mutex<Option<Instant>>,
    /// Set while calls fail; the first that succeeds again says so in the log.
    failing: std::sync::atomic::AtomicBool,
}

impl SharedState {
    /// Connects to the Redis at `url` (`redis://[user:password@]host:port[/db]`; this build
    /// has no TLS for Redis). Fails when it can't be reached now: a replica that started
    /// alone would count alone without saying so. Errors don't repeat the URL (it may hold a
    /// password).
    pub async fn connect(url: &str, prefix: &str) -> Result<Arc<SharedState>, String> {
        let client = redis::Client::open(url).map_err(|e| format!("not a Redis URL: {e}"))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(CALL_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        let mut connection = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let _: String = redis::cmd("PING")
            .query_async(&mut connection)
            .await
            .map_err(|e| format!("no answer to PING: {e}"))?;
        Ok(Arc::new(SharedState {
            client,
            connection,
            prefix: prefix.to_string(),
            admit: redis::Script::new(&format!("{SETTLE_FN}{ADMIT}")),
            settle: redis::Script::new(&format!("{SETTLE_FN}{SETTLE}")),
            pending: Mutex::new(Pending::default()),
            me: uuid::Uuid::new_v4().simple().to_string(),
            warned_at: Mutex::new(None),
            failing: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// A scope's window in Redis: its bucket list (`b`) or its hash (`h`).
    fn window_key(&self, window: &str, part: &str) -> String {
        format!("{}:rl:{window}:{part}", self.prefix)
    }

    fn window_keys(&self, subject: &Subject) -> [String; 2] {
        ["b", "h"].map(|part| self.window_key(subject.window_name(), part))
    }

    /// A call to Redis, given up after [`CALL_TIMEOUT`].
    async fn call<T>(&self, call: impl Future<Output = redis::RedisResult<T>>) -> redis::RedisResult<T> {
        tokio::time::timeout(CALL_TIMEOUT, call).await.map_err(|_| timed_out())?
    }

    /// Counts a request of `tokens` (estimated) in every scope's window, or refuses it; sends
    /// the settles waiting with it.
    pub(crate) async fn admit(&self, windowed: &[&Subject], tokens: u64) -> redis::RedisResult<Shared> {
        let settles = self.take_settles();
        let mut call = self.admit.prepare_invoke();
        for s in windowed {
            for key in self.window_keys(s) {
                call.key(key);
            }
        }
        call.arg(tokens).arg(WINDOW.as_millis() as u64).arg(windowed.len());
        for s in windowed {
            call.arg(s.limits.rpm.map(|n| n.to_string()).unwrap_or_default());
            call.arg(s.limits.tpm.map(|n| n.to_string()).unwrap_or_default());
        }
        self.add_settles(&mut call, &settles);
        let mut connection = self.connection.clone();
        let reply: Vec<i64> = self.call(call.invoke_async(&mut connection)).await?;
        if self.failing.swap(false, std::sync::atomic::Ordering::Relaxed) {
            tracing::info!("Redis answers again: rate limits are shared with the other replicas again");
        }
        parse_admission(&reply, windowed.len())
    }

    /// Settles a shared admission's tokens: `windows` are (scope window, bucket) pairs. The
    /// next admission carries them to Redis; when none comes within [`SETTLE_DELAY`] they go
    /// in a call of their own. A request's end never waits for Redis.
    pub(crate) fn settle(self: &Arc<Self>, windows: Vec<(Arc<str>, u64)>, estimate: u64, used: u64) {
        if windows.is_empty() || estimate == used {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let Ok(mut pending) = self.pending.lock() else { return };
        pending.settles.extend(windows.into_iter().map(|(window, bucket)| Settle {
            window,
            bucket,
            estimate,
            used,
        }));
        if pending.flush_scheduled {
            return;
        }
        pending.flush_scheduled = true;
        drop(pending);
        let shared = self.clone();
        runtime.spawn(async move {
            tokio::time::sleep(SETTLE_DELAY).await;
            shared.flush_settles().await;
        });
    }

    /// Sends the settles no admission carried, in calls of their own.
    async fn flush_settles(&self) {
        loop {
            let settles = {
                let Ok(mut pending) = self.pending.lock() else { return };
                if pending.settles.is_empty() {
                    pending.flush_scheduled = false;
                    return;
                }
                oldest_settles(&mut pending)
            };
            let mut call = self.settle.prepare_invoke();
            self.add_settles(&mut call, &settles);
            let mut connection = self.connection.clone();
            if let Err(e) = self.call::<i64>(call.invoke_async(&mut connection)).await {
                self.unreachable(&e);
            }
        }
    }

    /// Up to [`SETTLES_PER_CALL`] waiting settles, oldest first. (Those a failed call took
    /// are lost: the windows then hold the estimates, the cautious side, for their minute.)
    fn take_settles(&self) -> Vec<Settle> {
        self.pending.lock().map(|mut pending| oldest_settles(&mut pending)).unwrap_or_default()
    }

    /// Appends settles to a script call, in [`SETTLE_FN`]'s layout.
    fn add_settles(&self, call: &mut redis::ScriptInvocation<'_>, settles: &[Settle]) {
        for s in settles {
            call.key(self.window_key(&s.window, "h"));
            call.arg(s.estimate).arg(s.used).arg(s.bucket);
        }
    }

    /// Notes that Redis failed a call: counted, and warned about now and then.
    pub(crate) fn unreachable(&self, error: &redis::RedisError) {
        metrics::counter!("ferry_shared_state_errors_total").increment(1);
        self.failing.store(true, std::sync::atomic::Ordering::Relaxed);
        let Ok(mut warned) = self.warned_at.lock() else { return };
        if warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            *warned = Some(Instant::now());
            tracing::warn!(
                error = %error,
                "Redis is out of reach: rate limits count in this replica alone until it answers"
            );
        }
    }

    fn keys_channel(&self) -> String {
        format!("{}:keys", self.prefix)
    }

    /// Tells the other replicas that keys, projects or tenants changed.
    pub(crate) async fn announce_key_change(&self) {
        let mut connection = self.connection.clone();
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(self.keys_channel()).arg(&self.me);
        if let Err(e) = self.call::<i64>(publish.query_async(&mut connection)).await {
            self.unreachable(&e);
        }
    }

    /// Listens for other replicas' key changes and forgets this one's cached keys on each;
    /// after a lost connection it forgets them too (announcements may have been missed), and
    /// reconnects. Ends with the tenancy.
    pub(crate) fn watch_keys(self: Arc<Self>, tenancy: Weak<Tenancy>) {
        tokio::spawn(async move {
            let mut subscribed_before = false;
            while tenancy.strong_count() > 0 {
                match self.client.get_async_pubsub().await {
                    Ok(mut pubsub) => match pubsub.subscribe(self.keys_channel()).await {
                        Ok(()) => {
                            if subscribed_before && let Some(t) = tenancy.upgrade() {
                                t.forget_keys().await;
                            }
                            subscribed_before = true;
                            let mut messages = pubsub.into_on_message();
                            while let Some(message) = messages.next().await {
                                let Some(t) = tenancy.upgrade() else { return };
                                let from: String = message.get_payload().unwrap_or_default();
                                if from != self.me {
                                    t.forget_keys().await;
                                }
                            }
                        }
                        Err(e) => self.unreachable(&e),
                    },
                    Err(e) => self.unreachable(&e),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
}

fn timed_out() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, "Redis did not answer in time"))
}

fn bad_reply() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "the rate-limit script answered in an unexpected shape",
    ))
}

/// A scope's window as the script reports it.
fn in_window(requests: i64, tokens: i64, age_ms: i64) -> InWindow {
    let wait = if age_ms < 0 { WINDOW } else { WINDOW.saturating_sub(Duration::from_millis(age_ms as u64)) };
    InWindow {
        requests: requests.max(0) as u64,
        request_wait: wait,
        tokens: tokens.max(0) as u64,
        token_wait: wait,
    }
}

fn parse_admission(reply: &[i64], scopes: usize) -> redis::RedisResult<Shared> {
    match reply {
        [1, rest @ ..] if rest.len() == 4 * scopes => Ok(Shared::Admitted(
            rest.chunks_exact(4).map(|c| (c[0].max(0) as u64, in_window(c[1], c[2], c[3]))).collect(),
        )),
        [0, index, requests, tokens, age] if (1..=scopes as i64).contains(index) => {
            Ok(Shared::Refused(*index as usize - 1, in_window(*requests, *tokens, *age)))
        }
        _ => Err(bad_reply()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_replies_read_as_admissions_and_refusals() {
        let Ok(Shared::Admitted(scopes)) = parse_admission(&[1, 1_700_000_000_123, 3, 40, 1_500], 1) else {
            panic!("an admission")
        };
        assert_eq!(scopes[0].0, 1_700_000_000_123);
        assert_eq!((scopes[0].1.requests, scopes[0].1.tokens), (3, 40));
        assert_eq!(scopes[0].1.request_wait, Duration::from_millis(58_500));
        let Ok(Shared::Refused(1, w)) = parse_admission(&[0, 2, 0, 0, -1], 2) else { panic!("a refusal") };
        assert_eq!(w.token_wait, WINDOW);
        assert!(parse_admission(&[1, 5, 1, 1], 1).is_err());
        assert!(parse_admission(&[0, 3, 0, 0, 0], 2).is_err());
    }

    /// The scripts against the Redis at 127.0.0.1:6379 (`FERRY_TEST_REDIS_URL` names another;
    /// outside CI the test passes without one).
    async fn test_redis() -> Option<Arc<SharedState>> {
        let url = std::env::var("FERRY_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let prefix = format!("ferry-unit-{}", uuid::Uuid::new_v4().simple());
        match SharedState::connect(&url, &prefix).await {
            Ok(shared) => Some(shared),
            Err(e) if std::env::var("CI").is_err() => {
                eprintln!("skipped: no Redis at {url}: {e}");
                None
            }
            Err(e) => panic!("Redis at {url} is needed in CI: {e}"),
        }
    }

    #[tokio::test]
    async fn a_bucket_settled_to_nothing_leaves_the_window_cleanly() {
        use crate::limits::ScopeKind;
        let Some(shared) = test_redis().await else { return };
        let limits = ferry_store::Limits { rpm: Some(3), tpm: Some(1000), ..Default::default() };
        let key = Subject::new(ScopeKind::Key, "k1", &limits);
        let [buckets, sums] = shared.window_keys(&key);
        let mut connection = shared.connection.clone();
        // A request a minute old that was admitted and then used no tokens (a 400 after
        // admission): its bucket holds one request and 0 tokens. Pruning it wrote `-0`, which
        // Redis refuses, and every admission of the scope failed over to counting alone.
        let _: () = redis::pipe()
            .rpush(&buckets, "1000")
            .ignore()
            .hset_multiple(&sums, &[("r1000", 1), ("t1000", 0), ("r", 1), ("t", 0)])
            .ignore()
            .query_async(&mut connection)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let Ok(Shared::Admitted(scopes)) = shared.admit(&[&key], 40).await else { panic!("admitted") };
        assert_eq!((scopes[0].1.requests, scopes[0].1.tokens), (1, 40), "the old bucket left");
        // Settled to nothing: the window keeps its request and drops its tokens. The next
        // admission carries the settle, ahead of its own count.
        let windows = vec![(Arc::from(key.window_name()), scopes[0].0)];
        shared.settle(windows, 40, 0);
        let Ok(Shared::Admitted(scopes)) = shared.admit(&[&key], 10).await else { panic!("admitted") };
        assert_eq!((scopes[0].1.requests, scopes[0].1.tokens), (2, 10));
        // With no admission after it, a settle goes alone after a moment.
        shared.settle(vec![(Arc::from(key.window_name()), scopes[0].0)], 10, 4);
        tokio::time::sleep(SETTLE_DELAY * 5).await;
        let held: i64 =
            redis::cmd("HGET").arg(&sums).arg("t").query_async(&mut connection).await.unwrap_or(-1);
        assert_eq!(held, 4, "settled without an admission to carry it");
        let Ok(Shared::Admitted(_)) = shared.admit(&[&key], 10).await else { panic!("admitted") };
        let Ok(Shared::Refused(0, window)) = shared.admit(&[&key], 10).await else {
            panic!("the fourth refused")
        };
        assert_eq!(window.requests, 3);
        let _: () =
            redis::cmd("DEL").arg(&buckets).arg(&sums).query_async(&mut connection).await.unwrap_or_default();
    }
}
