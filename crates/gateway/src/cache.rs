//! The exact response cache: answers keyed on the normalised request (alias, whether it
//! streams, and the whole neutral request), kept for a TTL within a memory bound, oldest
//! evicted first. A plain answer is kept whole; a streamed one as its events, replayed in
//! order. A hit costs no upstream call.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_providers::{ChatEvent, ChatResponse};
use sha2::{Digest, Sha256};

/// What a hit gives back.
#[derive(Debug, Clone, serde::Serialize)]
pub enum Cached {
    Response(ChatResponse),
    /// A complete stream (it ended with every choice finished), in order.
    Events(Vec<ChatEvent>),
}

struct Entry {
    response: Cached,
    /// The `provider/model` that produced it, for the hit's headers and trace.
    target: String,
    expires: Instant,
    bytes: usize,
}

pub struct ResponseCache {
    max_bytes: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<[u8; 32], Entry>,
    /// Insertion order, for eviction.
    order: VecDeque<[u8; 32]>,
    bytes: usize,
}

impl ResponseCache {
    pub fn new(max_bytes: usize) -> Self {
        ResponseCache { max_bytes, inner: Mutex::new(Inner::default()) }
    }

    /// The key of a request to an alias within a scope (the tenant). The neutral request
    /// serialises its fields in a fixed order, so equal requests give equal keys whatever the
    /// client's JSON looked like.
    pub fn key<R: crate::Routable>(alias: &str, scope: &str, request: &R, stream: bool) -> [u8; 32] {
        let mut hasher = Sha256::new();
        // Lengths first: no alias and scope can run together into another pair.
        hasher.update((alias.len() as u64).to_le_bytes());
        hasher.update(alias.as_bytes());
        hasher.update((scope.len() as u64).to_le_bytes());
        hasher.update(scope.as_bytes());
        hasher.update([0, u8::from(stream)]);
        hasher.update(R::KIND.as_bytes());
        hasher.update([0]);
        let mut value = serde_json::to_value(request).unwrap_or_default();
        sort_keys(&mut value);
        hasher.update(serde_json::to_vec(&value).unwrap_or_default());
        hasher.finalize().into()
    }

    /// The entry under `key` and the target that produced it, unless expired.
    pub fn get(&self, key: &[u8; 32]) -> Option<(Cached, String)> {
        let mut inner = self.inner.lock().ok()?;
        match inner.entries.get(key) {
            Some(entry) if entry.expires > Instant::now() => {
                Some((entry.response.clone(), entry.target.clone()))
            }
            Some(_) => {
                if let Some(old) = inner.entries.remove(key) {
                    inner.bytes -= old.bytes;
                }
                None
            }
            None => None,
        }
    }

    pub fn put(&self, key: [u8; 32], response: &Cached, target: &str, ttl: Duration) {
        let bytes = serde_json::to_vec(response).map(|v| v.len()).unwrap_or(0) + 64;
        if bytes > self.max_bytes {
            return;
        }
        let Ok(mut inner) = self.inner.lock() else { return };
        if let Some(old) = inner.entries.remove(&key) {
            inner.bytes -= old.bytes;
        }
        while inner.bytes + bytes > self.max_bytes {
            let Some(oldest) = inner.order.pop_front() else { break };
            if let Some(old) = inner.entries.remove(&oldest) {
                inner.bytes -= old.bytes;
            }
        }
        inner.order.push_back(key);
        inner.bytes += bytes;
        let entry = Entry {
            response: response.clone(),
            target: target.to_owned(),
            expires: Instant::now() + ttl,
            bytes,
        };
        inner.entries.insert(key, entry);
        // Keys whose entries were replaced or expired linger in `order`; drop them lazily.
        if inner.order.len() > inner.entries.len() * 2 + 16 {
            let Inner { entries, order, .. } = &mut *inner;
            order.retain(|k| entries.contains_key(k));
        }
    }
}

/// Objects in key order, at every depth: JSON maps keep the client's order (serde_json's
/// `preserve_order`), and a tool schema or `response_format` written in another order is the
/// same request.
fn sort_keys(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            map.sort_keys();
            map.values_mut().for_each(sort_keys);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(sort_keys),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_providers::{ChatRequest, Message, Params, Role, Usage};

    fn request(text: &str) -> ChatRequest {
        ChatRequest {
            model: "m".into(),
            messages: vec![Message::text(Role::User, text)],
            params: Params::default(),
            tools: vec![],
            tool_choice: None,
            response_format: None,
        }
    }

    fn response(text: &str) -> Cached {
        Cached::Response(ChatResponse {
            id: text.into(),
            model: "m".into(),
            choices: vec![],
            usage: Usage::default(),
        })
    }

    #[test]
    fn hits_expire_and_the_bound_evicts_the_oldest() {
        let cache = ResponseCache::new(400);
        let (a, b) = (
            ResponseCache::key("x", "t", &request("a"), false),
            ResponseCache::key("x", "t", &request("b"), false),
        );
        assert_ne!(a, ResponseCache::key("y", "t", &request("a"), false));
        assert_ne!(a, ResponseCache::key("x", "t", &request("a"), true), "a stream is kept apart");
        assert_ne!(a, ResponseCache::key("x", "u", &request("a"), false), "another tenant is kept apart");
        assert_ne!(
            ResponseCache::key("xt", "", &request("a"), false),
            ResponseCache::key("x", "t", &request("a"), false)
        );
        cache.put(a, &response("A"), "up/m", Duration::from_secs(60));
        assert!(
            matches!(cache.get(&a), Some((Cached::Response(r), target)) if r.id == "A" && target == "up/m")
        );
        cache.put(b, &response("B"), "up/m", Duration::from_millis(0));
        assert!(cache.get(&b).is_none(), "expired");
        for i in 0..20 {
            cache.put(
                ResponseCache::key("x", "t", &request(&i.to_string()), false),
                &response("filler"),
                "up/m",
                Duration::from_secs(60),
            );
        }
        assert!(cache.get(&a).is_none(), "the oldest entry was evicted");
    }

    #[test]
    fn nested_key_order_does_not_change_the_key() {
        let mut one = request("a");
        let mut two = request("a");
        one.response_format = serde_json::from_str(r#"{"type": "json_object", "x": {"b": 1, "a": 2}}"#).ok();
        two.response_format = serde_json::from_str(r#"{"x": {"a": 2, "b": 1}, "type": "json_object"}"#).ok();
        assert_eq!(ResponseCache::key("x", "t", &one, false), ResponseCache::key("x", "t", &two, false));
    }
}
