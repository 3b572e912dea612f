//! Server-sent events from an upstream's byte stream: `event:` and `data:` fields, one
//! event per blank line.

use futures::{Stream, StreamExt};

use crate::ProviderError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseMessage {
    pub event: Option<String>,
    pub data: String,
}

/// Splits a byte stream into SSE messages.
/// A failure of the byte stream (a broken connection, the total timeout) ends it.
pub fn messages<S, B>(bytes: S) -> impl Stream<Item = Result<SseMessage, ProviderError>> + Send
where
    S: Stream<Item = Result<B, ProviderError>> + Send + 'static,
    B: AsRef<[u8]>,
{
    let state = (Box::pin(bytes), Vec::<u8>::new(), None::<String>, String::new(), false);
    futures::stream::unfold(state, |(mut bytes, mut buffer, mut event, mut data, done)| async move {
        if done {
            return None;
        }
        loop {
            if let Some(end) = buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                let line = line.trim_end_matches(['\r', '\n']);
                if line.is_empty() {
                    if !data.is_empty() || event.is_some() {
                        let message = SseMessage { event: event.take(), data: std::mem::take(&mut data) };
                        return Some((Ok(message), (bytes, buffer, event, data, false)));
                    }
                    continue;
                }
                if let Some(value) = line.strip_prefix("data:") {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(value.strip_prefix(' ').unwrap_or(value));
                } else if let Some(value) = line.strip_prefix("event:") {
                    event = Some(value.trim().to_string());
                }
                continue;
            }
            match bytes.next().await {
                Some(Ok(chunk)) => buffer.extend_from_slice(chunk.as_ref()),
                Some(Err(e)) => return Some((Err(e), (bytes, buffer, event, data, true))),
                None => {
                    // A last message without its blank line still counts.
                    if !data.is_empty() {
                        let message = SseMessage { event: event.take(), data: std::mem::take(&mut data) };
                        return Some((Ok(message), (bytes, buffer, event, data, true)));
                    }
                    return None;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn splits_events_across_chunks() {
        let chunks: Vec<Result<&[u8], ProviderError>> = vec![
            Ok(b"event: a\ndata: {\"x\"" as &[u8]),
            Ok(b":1}\n\ndata: second\r\n\r\n"),
            Ok(b"data: [DONE]\n\n"),
        ];
        let got: Vec<SseMessage> =
            messages(futures::stream::iter(chunks)).map(|m| m.unwrap()).collect().await;
        assert_eq!(got[0], SseMessage { event: Some("a".into()), data: "{\"x\":1}".into() });
        assert_eq!(got[1], SseMessage { event: None, data: "second".into() });
        assert_eq!(got[2].data, "[DONE]");
    }
}
