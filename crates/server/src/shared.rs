//! State that replicas behind one load balancer share through Redis (`--redis-url`): the
//! per-minute rate-limit windows, so that a limit of N requests a minute admits N across all
//! replicas, not N on each; and word that keys changed, so that a revocation on one replica
//! takes effect on every other at once instead of when their key caches expire.
//!
//! A window is a scope's admissions of the last minute in millisecond buckets, as in
//! `limits.rs`: a list of bucket times (oldest first) and a hash of each bucket's requests and
//! tokens with their running sums. One Lua script prunes, checks and counts every scope of a
//! request atomically, on Redis's clock (replicas' clocks may disagree); another settles a
//! request's tokens to what it used. Keys expire a minute after their last admission.
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

/// Prunes, checks and counts a request in every scope's window, or in none.
/// KEYS: per scope its bucket list and its hash. ARGV: tokens, the window in ms, then per
/// scope its requests and tokens per minute ('' for no limit).
/// Returns {1, then per scope: bucket, requests, tokens, age of its oldest bucket in ms}, or
/// {0, the refusing scope (from 1), requests, tokens, age (-1: empty)}.
const ADMIT: &str = r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local tokens = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local n = #KEYS / 2
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
  local rpm, tpm = tonumber(ARGV[1 + 2 * i]), tonumber(ARGV[2 + 2 * i])
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

/// Replaces a request's estimated tokens in its buckets with those it used (a bucket gone
/// from the window is left alone). KEYS: each scope's hash. ARGV: estimate, used, then each
/// scope's bucket.
const SETTLE: &str = r"
local estimate, used = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 1, #KEYS do
  local field = 't' .. ARGV[2 + i]
  local held = redis.call('HGET', KEYS[i], field)
  if held then
    local delta = used - math.min(estimate, tonumber(held))
    if delta ~= 0 then
      redis.call('HINCRBY', KEYS[i], field, delta)
      redis.call('HINCRBY', KEYS[i], 't', delta)
    end
  end
end
return 0
";

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
            admit: redis::Script::new(ADMIT),
            settle: redis::Script::new(SETTLE),
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

    /// Counts a request of `tokens` (estimated) in every scope's window, or refuses it.
    pub(crate) async fn admit(&self, windowed: &[&Subject], tokens: u64) -> redis::RedisResult<Shared> {
        let mut call = self.admit.prepare_invoke();
        for s in windowed {
            for key in self.window_keys(s) {
                call.key(key);
            }
        }
        call.arg(tokens).arg(WINDOW.as_millis() as u64);
        for s in windowed {
            call.arg(s.limits.rpm.map(|n| n.to_string()).unwrap_or_default());
            call.arg(s.limits.tpm.map(|n| n.to_string()).unwrap_or_default());
        }
        let mut connection = self.connection.clone();
        let reply: Vec<i64> = self.call(call.invoke_async(&mut connection)).await?;
        if self.failing.swap(false, std::sync::atomic::Ordering::Relaxed) {
            tracing::info!("Redis answers again: rate limits are shared with the other replicas again");
        }
        parse_admission(&reply, windowed.len())
    }

    /// Settles a shared admission's tokens in the background (a request's end must not wait
    /// for Redis). `buckets` are (scope window, bucket) pairs.
    pub(crate) fn settle(self: &Arc<Self>, windows: Vec<(Arc<str>, u64)>, estimate: u64, used: u64) {
        if windows.is_empty() || estimate == used {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let shared = self.clone();
        runtime.spawn(async move {
            let mut call = shared.settle.prepare_invoke();
            for (window, _) in &windows {
                call.key(shared.window_key(window, "h"));
            }
            call.arg(estimate).arg(used);
            for (_, bucket) in &windows {
                call.arg(*bucket);
            }
            let mut connection = shared.connection.clone();
            if let Err(e) = shared.call::<i64>(call.invoke_async(&mut connection)).await {
                shared.unreachable(&e);
            }
        });
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
        // Settled to nothing: the window keeps its request and drops its tokens.
        let windows = vec![(Arc::from(key.window_name()), scopes[0].0)];
        shared.settle(windows, 40, 0);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Ok(Shared::Admitted(scopes)) = shared.admit(&[&key], 10).await else { panic!("admitted") };
        assert_eq!((scopes[0].1.requests, scopes[0].1.tokens), (2, 10));
        let Ok(Shared::Admitted(_)) = shared.admit(&[&key], 10).await else { panic!("admitted") };
        let Ok(Shared::Refused(0, window)) = shared.admit(&[&key], 10).await else {
            panic!("the fourth refused")
        };
        assert_eq!(window.requests, 3);
        let _: () =
            redis::cmd("DEL").arg(&buckets).arg(&sums).query_async(&mut connection).await.unwrap_or_default();
    }
}
