//! Chat templates render exactly as Hugging Face's `apply_chat_template` does.
//! The expected strings in data/chat_templates.json were recorded with transformers'
//! `render_jinja_template` by tests/reference/make_template_refs.py.

mod common;

use ferry_engine::ChatMessage;
use serde_json::Value;

#[test]
fn chat_templates_match_hugging_face() {
    let cases: Vec<Value> =
        serde_json::from_str(include_str!("data/chat_templates.json")).expect("reference data parses");
    assert!(cases.len() >= 16);
    let mut checked = 0;
    for file in [common::SMOLLM2, common::QWEN] {
        let model = common::load(file, 1);
        let template = model.template.as_ref().expect("the model has a chat template");
        for case in cases.iter().filter(|c| c["model"] == file) {
            let messages: Vec<ChatMessage> = case["messages"]
                .as_array()
                .expect("messages")
                .iter()
                .map(|m| {
                    ChatMessage::new(
                        m["role"].as_str().unwrap_or_default(),
                        m["content"].as_str().unwrap_or_default(),
                    )
                })
                .collect();
            let add = case["add_generation_prompt"].as_bool().unwrap_or(false);
            let rendered = template.render(&messages, add).expect("renders");
            assert_eq!(
                rendered,
                case["rendered"].as_str().unwrap_or_default(),
                "{file} {messages:?} add={add}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, cases.len());
}

#[test]
fn rendered_prompt_tokenizes_special_tokens() {
    let model = common::load(common::SMOLLM2, 1);
    let messages = [ChatMessage::new("user", "Hi")];
    let tokens = model.chat_prompt(&messages).expect("prompt");
    // <|im_start|> is one special token (id 1 in SmolLM2's vocabulary), not text.
    assert_eq!(tokens[0], 1, "{tokens:?}");
    assert_eq!(model.token_text(tokens[0]), "");
}
