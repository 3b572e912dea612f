//! Any OpenAI-compatible server: vLLM, Ollama, llama-server, DeepSeek, Qwen's compatible
//! mode, OpenAI itself, another Ferry. Chat completions and legacy text completions, plain
//! and streamed.

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use serde::Serialize;
use serde_json::Value;

mod answer;

pub use answer::{WireAnswer, parse_completion, parse_response};

use crate::sse::messages;
use crate::transport::Answer;
use crate::{
    ChatRequest, ChatResponse, CompletionRequest, EventStream, KeyHeader, Message, Part, Prompt, Provider,
    ProviderError, Role, Timeouts, ToolChoice, Upstream,
};

pub struct OpenAiProvider {
    http: Upstream,
}

impl OpenAiProvider {
    /// `base_url` ends before `/chat/completions` (e.g. `http://host:8000/v1`).
    pub fn new(base_url: &str, api_key: Option<String>, timeouts: Timeouts) -> Result<Self, ProviderError> {
        Ok(OpenAiProvider { http: Upstream::new(base_url, api_key, KeyHeader::Bearer, &[], timeouts)? })
    }

    async fn send(&self, path: &str, body: impl Serialize) -> Result<Answer, ProviderError> {
        self.http.post(path, &body).await
    }
}

impl Provider for OpenAiProvider {
    fn name(&self) -> &'static str {
        "OpenAI-compatible"
    }

    fn chat(&self, request: ChatRequest) -> BoxFuture<'_, Result<ChatResponse, ProviderError>> {
        async move {
            let body = request_body(&request, false)?;
            let response = self.send("/chat/completions", body).await?;
            parse_response(self.http.json(response).await?)
        }
        .boxed()
    }

    fn chat_stream(&self, request: ChatRequest) -> BoxFuture<'_, Result<EventStream, ProviderError>> {
        async move {
            let body = request_body(&request, true)?;
            let response = self.send("/chat/completions", body).await?;
            self.events(response).await
        }
        .boxed()
    }

    /// The upstream's own `/completions`: prompts, `echo`, `logprobs`, `suffix` as they are.
    fn completion(&self, request: CompletionRequest) -> BoxFuture<'_, Result<ChatResponse, ProviderError>> {
        async move {
            let response = self.send("/completions", completion_body(&request, false)).await?;
            parse_completion(self.http.json(response).await?)
        }
        .boxed()
    }

    fn completion_stream(
        &self,
        request: CompletionRequest,
    ) -> BoxFuture<'_, Result<EventStream, ProviderError>> {
        async move {
            let response = self.send("/completions", completion_body(&request, true)).await?;
            self.events(response).await
        }
        .boxed()
    }
}

impl OpenAiProvider {
    /// The neutral events of a streamed answer (chat or text completion chunks) up to `[DONE]`.
    async fn events(&self, response: Answer) -> Result<EventStream, ProviderError> {
        let events = messages(self.http.stream(response))
            .take_while(|m| futures::future::ready(!matches!(m, Ok(m) if m.data == "[DONE]")))
            .flat_map(|m| futures::stream::iter(answer::parse_chunk(m)))
            .boxed();
        crate::after_first_event(events, self.http.timeouts.first_byte).await
    }
}

fn role(role: Role) -> &'static str {
    match role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    }
}

/// One message of an OpenAI chat body.
#[derive(Serialize)]
struct OutMessage<'a> {
    role: &'static str,
    content: OutContent<'a>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<OutToolCall<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<&'a str>,
}

/// A message's content: its text, its parts where any is not text, or `null` (an assistant
/// turn that only calls tools).
#[derive(Serialize)]
#[serde(untagged)]
enum OutContent<'a> {
    Text(String),
    Parts(Vec<OutPart<'a>>),
    Null,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum OutPart<'a> {
    Text { text: &'a str },
    ImageUrl { image_url: OutImage<'a> },
}

#[derive(Serialize)]
struct OutImage<'a> {
    url: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a str>,
}

#[derive(Serialize)]
struct OutToolCall<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: OutCall<'a>,
}

#[derive(Serialize)]
struct OutCall<'a> {
    name: &'a str,
    arguments: &'a str,
}

fn out_message(message: &Message) -> OutMessage<'_> {
    let only_text = message.content.iter().all(|p| matches!(p, Part::Text(_)));
    let content = if !message.tool_calls.is_empty() && message.content.is_empty() {
        OutContent::Null
    } else if only_text {
        OutContent::Text(message.joined_text())
    } else {
        OutContent::Parts(
            message
                .content
                .iter()
                .map(|p| match p {
                    Part::Text(text) => OutPart::Text { text },
                    Part::Image { url, detail } => {
                        OutPart::ImageUrl { image_url: OutImage { url, detail: detail.as_deref() } }
                    }
                })
                .collect(),
        )
    };
    OutMessage {
        role: role(message.role),
        content,
        tool_calls: message
            .tool_calls
            .iter()
            .map(|c| OutToolCall {
                id: &c.id,
                kind: "function",
                function: OutCall { name: &c.name, arguments: &c.arguments },
            })
            .collect(),
        tool_call_id: message.tool_call_id.as_deref(),
    }
}

/// The sampling and stream fields chat and legacy completion bodies share, each sent only
/// when set.
#[derive(Serialize)]
struct OutSampling<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u64>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    stop: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    n: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    /// A streamed request asks for the usage in a last chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

impl<'a> OutSampling<'a> {
    fn new(p: &'a crate::Params, stream: bool) -> Self {
        OutSampling {
            temperature: p.temperature,
            top_p: p.top_p,
            max_tokens: p.max_tokens,
            stop: &p.stop,
            seed: p.seed,
            n: p.n,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            stream,
            stream_options: stream.then_some(StreamOptions { include_usage: true }),
        }
    }
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

/// The OpenAI chat body of a neutral request, serialised straight from it: building a
/// `serde_json::Value` first cost more than writing the JSON.
#[derive(Serialize)]
pub struct ChatBody<'a> {
    model: &'a str,
    messages: Vec<OutMessage<'a>>,
    #[serde(flatten)]
    sampling: OutSampling<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_logprobs: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<&'a Value>,
    /// Only with tools: some servers refuse it alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel_tool_calls: Option<bool>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<OutTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<OutToolChoice<'a>>,
}

#[derive(Serialize)]
struct OutTool<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: OutFunction<'a>,
}

#[derive(Serialize)]
struct OutFunction<'a> {
    name: &'a str,
    description: Option<&'a str>,
    parameters: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    strict: Option<bool>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum OutToolChoice<'a> {
    Mode(&'static str),
    Function {
        #[serde(rename = "type")]
        kind: &'static str,
        function: OutChosen<'a>,
    },
}

#[derive(Serialize)]
struct OutChosen<'a> {
    name: &'a str,
}

/// The OpenAI request body of a neutral request.
pub fn request_body(request: &ChatRequest, stream: bool) -> Result<ChatBody<'_>, ProviderError> {
    let p = &request.params;
    Ok(ChatBody {
        model: &request.model,
        messages: request.messages.iter().map(out_message).collect(),
        sampling: OutSampling::new(p, stream),
        logprobs: p.logprobs,
        top_logprobs: p.top_logprobs,
        response_format: request.response_format.as_ref(),
        parallel_tool_calls: p.parallel_tool_calls.filter(|_| !request.tools.is_empty()),
        tools: request
            .tools
            .iter()
            .map(|t| OutTool {
                kind: "function",
                function: OutFunction {
                    name: &t.name,
                    description: t.description.as_deref(),
                    parameters: &t.parameters,
                    strict: t.strict,
                },
            })
            .collect(),
        tool_choice: request.tool_choice.as_ref().map(|c| match c {
            ToolChoice::Auto => OutToolChoice::Mode("auto"),
            ToolChoice::None => OutToolChoice::Mode("none"),
            ToolChoice::Required => OutToolChoice::Mode("required"),
            ToolChoice::Function(name) => {
                OutToolChoice::Function { kind: "function", function: OutChosen { name } }
            }
        }),
    })
}

/// The `/completions` body of a legacy completion.
#[derive(Serialize)]
pub struct CompletionBody<'a> {
    model: &'a str,
    prompt: OutPrompts<'a>,
    #[serde(flatten)]
    sampling: OutSampling<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<u32>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    echo: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    suffix: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    best_of: Option<u32>,
}

/// One prompt as a string or token list, several as a list of them.
#[derive(Serialize)]
#[serde(untagged)]
enum OutPrompts<'a> {
    One(OutPrompt<'a>),
    Many(Vec<OutPrompt<'a>>),
}

#[derive(Serialize)]
#[serde(untagged)]
enum OutPrompt<'a> {
    Text(&'a str),
    Tokens(&'a [i64]),
}

fn out_prompt(prompt: &Prompt) -> OutPrompt<'_> {
    match prompt {
        Prompt::Text(text) => OutPrompt::Text(text),
        Prompt::Tokens(ids) => OutPrompt::Tokens(ids),
    }
}

/// The `/completions` body of a legacy completion: prompts, `echo`, `logprobs`, `suffix` as
/// they are.
pub fn completion_body(request: &CompletionRequest, stream: bool) -> CompletionBody<'_> {
    CompletionBody {
        model: &request.model,
        prompt: match request.prompts.as_slice() {
            [one] => OutPrompts::One(out_prompt(one)),
            many => OutPrompts::Many(many.iter().map(out_prompt).collect()),
        },
        sampling: OutSampling::new(&request.params, stream),
        logprobs: request.logprobs,
        echo: request.echo,
        suffix: request.suffix.as_deref(),
        best_of: request.best_of,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{Params, ToolCall};

    /// The chat body as the upstream receives it.
    fn body_json(request: &ChatRequest, stream: bool) -> Value {
        serde_json::to_value(request_body(request, stream).unwrap()).unwrap()
    }

    #[test]
    fn request_translation() {
        let request = ChatRequest {
            model: "m".into(),
            messages: crate::types::sample_conversation(
                "what is this?",
                "data:image/png;base64,AA==",
                ToolCall { id: "c1".into(), name: "look".into(), arguments: "{}".into() },
                "a cat",
            ),
            params: Params {
                temperature: Some(0.5),
                max_tokens: Some(9),
                stop: vec!["x".into()],
                ..Params::default()
            },
            tools: vec![],
            tool_choice: Some(ToolChoice::Function("look".into())),
            response_format: None,
        };
        let body = body_json(&request, true);
        assert_eq!(body["messages"][0], json!({"role": "system", "content": "be brief"}));
        assert_eq!(body["messages"][1]["content"][1]["image_url"]["url"], "data:image/png;base64,AA==");
        assert_eq!(body["messages"][2]["content"], Value::Null);
        assert_eq!(body["messages"][2]["tool_calls"][0]["function"]["name"], "look");
        assert_eq!(body["messages"][3]["tool_call_id"], "c1");
        assert_eq!(body["tool_choice"]["function"]["name"], "look");
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["max_tokens"], 9);
    }

    #[test]
    fn a_legacy_completion_goes_to_completions_as_it_is() {
        let request = CompletionRequest {
            model: "m".into(),
            prompts: vec![Prompt::Text("a".into()), Prompt::Tokens(vec![1, 2])],
            params: Params { max_tokens: Some(16), n: Some(2), stop: vec!["\n".into()], ..Params::default() },
            echo: true,
            logprobs: Some(3),
            suffix: Some("z".into()),
            best_of: Some(2),
        };
        let body = serde_json::to_value(completion_body(&request, true)).unwrap();
        assert_eq!(body["prompt"], json!(["a", [1, 2]]));
        assert_eq!((body["echo"].clone(), body["logprobs"].clone()), (json!(true), json!(3)));
        assert_eq!(
            (body["suffix"].clone(), body["best_of"].clone(), body["n"].clone()),
            (json!("z"), json!(2), json!(2))
        );
        assert_eq!(body["stream_options"]["include_usage"], true);
        let one = CompletionRequest { prompts: vec![Prompt::Text("a".into())], echo: false, ..request };
        let body = serde_json::to_value(completion_body(&one, false)).unwrap();
        assert_eq!(body["prompt"], "a");
        assert!(body.get("echo").is_none() && body.get("stream").is_none());
    }

    #[test]
    fn one_call_at_a_time_is_passed_only_with_tools() {
        let mut request = ChatRequest {
            model: "m".into(),
            messages: vec![Message::text(Role::User, "hi")],
            params: Params { parallel_tool_calls: Some(false), ..Params::default() },
            tools: vec![],
            tool_choice: None,
            response_format: None,
        };
        assert!(body_json(&request, false).get("parallel_tool_calls").is_none());
        request.tools =
            vec![crate::Tool { name: "f".into(), description: None, parameters: json!({}), strict: None }];
        assert_eq!(body_json(&request, false)["parallel_tool_calls"], false);
    }

    #[test]
    fn image_detail_and_tool_strict_are_sent_on_as_given() {
        for (detail, strict) in [(Some("low"), Some(true)), (Some("auto"), Some(false)), (None, None)] {
            let request = crate::types::detail_and_strict_request(detail, strict);
            let body = body_json(&request, false);
            let image = &body["messages"][0]["content"][1]["image_url"];
            assert_eq!(image["url"], "data:image/png;base64,AA==");
            assert_eq!(image.get("detail").and_then(Value::as_str), detail);
            let function = &body["tools"][0]["function"];
            assert_eq!(function.get("strict").and_then(Value::as_bool), strict);
        }
    }
}
