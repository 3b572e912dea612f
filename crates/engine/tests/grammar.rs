//! Constrained decoding on the real models: what a schema or a tool grammar allows is all
//! that comes out, sampled or greedy, with constrained and free sequences in one batch.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests: a failure stops the test with its message"
)]

mod common;

use common::{QWEN, SMOLLM2, load, request, run};
use ferry_engine::tools::tool_grammar;
use ferry_engine::{
    ChatMessage, FinishReason, Grammar, SamplingParams, ToolCallParser, ToolMode, ToolOutput, ToolSpec,
};
use serde_json::{Value, json};

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": { "type": "string", "maxLength": 40 },
            "age": { "type": "integer", "minimum": 0, "maximum": 150 },
            "hobbies": { "type": "array", "items": { "type": "string", "maxLength": 30 }, "maxItems": 3 },
            "kind": { "enum": ["human", "robot"] },
        },
        "required": ["name", "age", "hobbies", "kind"],
        "additionalProperties": false,
    })
}

fn check_person(text: &str) {
    let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    let object = value.as_object().expect("an object");
    assert_eq!(object.len(), 4, "{text}");
    assert!(object["name"].as_str().is_some_and(|n| n.chars().count() <= 40), "{text}");
    assert!(object["age"].as_u64().is_some_and(|a| a <= 150), "{text}");
    let hobbies = object["hobbies"].as_array().expect("hobbies");
    assert!(hobbies.len() <= 3 && hobbies.iter().all(Value::is_string), "{text}");
    assert!(["human", "robot"].contains(&object["kind"].as_str().unwrap_or("")), "{text}");
}

#[test]
fn schema_constrained_choices_validate_while_a_free_sequence_shares_the_batch() {
    let model = load(SMOLLM2, 4);
    let constraint = model.compile_grammar(&Grammar::JsonSchema(person_schema())).expect("compiles");
    let prompt =
        model.chat_prompt(&[ChatMessage::new("user", "Describe a person as JSON.")]).expect("prompt");
    let sampled = SamplingParams { temperature: 1.0, seed: Some(3), ..SamplingParams::default() };
    let mut constrained = request(prompt.clone(), 256, sampled);
    constrained.n = 3;
    constrained.constraint = Some(constraint);
    let free = request(prompt, 40, SamplingParams::greedy());
    // Submitted together, so the scheduler batches constrained and free sequences.
    let a = model.scheduler.submit(constrained.clone()).expect("submitted");
    let b = model.scheduler.submit(free.clone()).expect("submitted");
    let constrained_out = common::collect(a, 3);
    let free_out = common::collect(b, 1);
    for out in &constrained_out {
        assert_eq!(out.finish, Some(FinishReason::Stop), "{out:?}");
        check_person(&out.text);
        // Logprobs stay on: one per generated token.
        assert_eq!(out.tokens.len(), out.completion_tokens);
    }
    // The free sequence is what it is alone.
    assert_eq!(free_out, run(&model, free));
    assert!(!free_out[0].text.trim_start().starts_with('{'), "{:?}", free_out[0].text);
}

#[test]
fn a_required_tool_call_parses_into_its_function_and_arguments() {
    let model = load(QWEN, 2);
    let tools = [ToolSpec {
        name: "get_weather".into(),
        description: Some("The current weather in a city".into()),
        parameters: json!({
            "type": "object",
            "properties": { "city": { "type": "string" }, "unit": { "enum": ["celsius", "fahrenheit"] } },
            "required": ["city", "unit"],
            "additionalProperties": false,
        }),
    }];
    let prompt = model
        .chat_prompt_with_tools(&[ChatMessage::new("user", "What is the weather in Paris?")], &tools)
        .expect("prompt");
    for mode in [ToolMode::Required, ToolMode::Auto] {
        let mut req = request(prompt.clone(), 80, SamplingParams::greedy());
        req.constraint = Some(model.compile_grammar(&tool_grammar(&tools, &mode, false)).expect("compiles"));
        let out = run(&model, req).remove(0);
        assert_eq!(out.finish, Some(FinishReason::Stop), "{mode:?}: {out:?}");
        let mut parser = ToolCallParser::default();
        let mut pieces = parser.push(&out.text);
        pieces.extend(parser.finish());
        let mut arguments = String::new();
        let mut names = Vec::new();
        for piece in pieces {
            match piece {
                ToolOutput::CallStart { name, .. } => names.push(name),
                ToolOutput::Arguments { text, .. } => arguments.push_str(&text),
                ToolOutput::Text(t) => assert!(t.trim().is_empty(), "{mode:?}: text {t:?} in {:?}", out.text),
            }
        }
        assert_eq!(names, ["get_weather"], "{mode:?}: {:?}", out.text);
        let arguments: Value = serde_json::from_str(&arguments).expect("arguments are JSON");
        assert!(arguments["city"].as_str().is_some_and(|c| c.contains("Paris")), "{arguments}");
        assert!(["celsius", "fahrenheit"].contains(&arguments["unit"].as_str().unwrap_or("")), "{arguments}");
    }
}
