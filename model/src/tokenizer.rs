//! [`ChatTokenizer`]: a Hugging Face `tokenizers` tokenizer plus the model's own Jinja chat
//! template (rendered with `minijinja`, configured like `transformers`: trim_blocks and
//! lstrip_blocks) and its end-of-turn token.
//!
//! Encoding conventions (shared by generation, judging and DPO):
//! - prompt = tokens of `template([user], add_generation_prompt=true)`;
//! - response = tokens of the response text followed by the end-of-turn token;
//! - the scored sequence is prompt ++ response, so scoring sees exactly what generation produced.
//!
//! Text is always encoded without the tokenizer's post-processor specials
//! (`add_special_tokens = false`): the template already writes BOS/turn markers as text.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tokenizers::Tokenizer;

use super::ModelError;

/// Tokenizer, chat template and special tokens of one model.
#[derive(Clone)]
pub struct ChatTokenizer {
    tokenizer: Tokenizer,
    tokenizer_json: String,
    tokenizer_config: Value,
    chat_template: String,
    eot_id: u32,
    eot_token: String,
    bos_token: Option<String>,
    stop_ids: Vec<u32>,
    pad_id: u32,
}

impl std::fmt::Debug for ChatTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTokenizer")
            .field("vocab", &self.tokenizer.get_vocab_size(true))
            .field("eot", &self.eot_token)
            .field("stop_ids", &self.stop_ids)
            .finish()
    }
}

/// A special token in `tokenizer_config.json` is either a string or `{"content": ...}`.
fn special_token(v: Option<&Value>) -> Option<String> {
    match v {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

fn template_env() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    // Llama 3.2 templates print today's date; a fixed date keeps prompts reproducible.
    env.add_function("strftime_now", |_fmt: String| "26 Jul 2024".to_string());
    env
}

impl ChatTokenizer {
    /// Builds from the text of a `tokenizer.json` and a `tokenizer_config.json` value (which must
    /// hold `chat_template` and `eos_token`, or `default_eos` must name the end-of-turn id).
    /// `extra_stop_ids` (e.g. `eos_token_id` from config.json) also end generation.
    pub fn from_parts(
        tokenizer_json: String,
        tokenizer_config: Value,
        default_eos: Option<u32>,
        extra_stop_ids: &[u32],
        path: &Path,
    ) -> Result<Self, ModelError> {
        let tok_err = |msg: String| ModelError::Tokenizer {
            path: path.to_path_buf(),
            msg,
        };
        let tokenizer: Tokenizer = tokenizer_json
            .parse()
            .map_err(|e| tok_err(format!("invalid tokenizer.json: {e}")))?;
        let chat_template = match tokenizer_config.get("chat_template") {
            Some(Value::String(s)) => s.clone(),
            // A list of named templates: take "default".
            Some(Value::Array(a)) => a
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(String::from)
                .ok_or_else(|| tok_err("no \"default\" chat template".into()))?,
            _ => return Err(tok_err("tokenizer_config.json has no chat_template".into())),
        };
        let (eot_id, eot_token) = match special_token(tokenizer_config.get("eos_token")) {
            Some(tok) => {
                let id = tokenizer.token_to_id(&tok).ok_or_else(|| {
                    tok_err(format!("eos_token {tok:?} is not in the vocabulary"))
                })?;
                (id, tok)
            }
            None => {
                let id = default_eos.ok_or_else(|| tok_err("no eos_token".into()))?;
                let tok = tokenizer
                    .id_to_token(id)
                    .ok_or_else(|| tok_err(format!("eos id {id} is not in the vocabulary")))?;
                (id, tok)
            }
        };
        let bos_token = special_token(tokenizer_config.get("bos_token"));
        let pad_id = special_token(tokenizer_config.get("pad_token"))
            .and_then(|t| tokenizer.token_to_id(&t))
            .unwrap_or(eot_id);
        let mut stop_ids = vec![eot_id];
        for &id in extra_stop_ids {
            if !stop_ids.contains(&id) {
                stop_ids.push(id);
            }
        }
        let me = ChatTokenizer {
            tokenizer,
            tokenizer_json,
            tokenizer_config,
            chat_template,
            eot_id,
            eot_token,
            bos_token,
            stop_ids,
            pad_id,
        };
        // Fail at load time, not at the first prompt, when the template is broken.
        me.render(&[("user", "test")], true)?;
        Ok(me)
    }

    /// Reads `tokenizer.json` and `tokenizer_config.json` from a Hugging Face model directory.
    pub fn from_hf_dir(
        dir: &Path,
        default_eos: Option<u32>,
        extra_stop_ids: &[u32],
    ) -> Result<Self, ModelError> {
        let tj: PathBuf = dir.join("tokenizer.json");
        let tokenizer_json =
            std::fs::read_to_string(&tj).map_err(|e| ModelError::io(tj.clone(), e))?;
        let tc = dir.join("tokenizer_config.json");
        let text = std::fs::read_to_string(&tc).map_err(|e| ModelError::io(tc.clone(), e))?;
        let mut tokenizer_config: Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Tokenizer {
                path: tc.clone(),
                msg: e.to_string(),
            })?;
        // Newer checkpoints keep the template in a separate chat_template.jinja file.
        if tokenizer_config.get("chat_template").is_none() {
            let jinja = dir.join("chat_template.jinja");
            if let Ok(t) = std::fs::read_to_string(&jinja) {
                tokenizer_config["chat_template"] = Value::String(t);
            }
        }
        Self::from_parts(
            tokenizer_json,
            tokenizer_config,
            default_eos,
            extra_stop_ids,
            &tc,
        )
    }

    /// Renders the chat template for `(role, content)` messages.
    pub fn render(
        &self,
        messages: &[(&str, &str)],
        add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        let env = template_env();
        let msgs: Vec<Value> = messages
            .iter()
            .map(|(r, c)| json!({"role": r, "content": c}))
            .collect();
        let ctx = json!({
            "messages": msgs,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token.clone().unwrap_or_default(),
            "eos_token": self.eot_token,
        });
        env.render_str(&self.chat_template, ctx)
            .map_err(|e| ModelError::Template(format!("{e:#}")))
    }

    /// Tokens of `text` as is (no special tokens added; special-token text is recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| ModelError::Tokenize(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Prompt tokens: the chat template applied to one user turn, with the generation prompt.
    pub fn encode_prompt(&self, user: &str) -> Result<Vec<u32>, ModelError> {
        self.encode(&self.render(&[("user", user)], true)?)
    }

    /// Response tokens for scoring: `tokenize(text)` followed by the end-of-turn token.
    pub fn encode_response(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let mut ids = self.encode(text)?;
        ids.push(self.eot_id);
        Ok(ids)
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenize(e.to_string()))
    }

    /// Text of `ids` with special tokens kept (for debugging prompts).
    pub fn decode_with_special(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| ModelError::Tokenize(e.to_string()))
    }

    /// The end-of-turn token id (`<|im_end|>` for SmolLM2), appended to responses.
    pub fn eot_id(&self) -> u32 {
        self.eot_id
    }

    /// The end-of-turn token text.
    pub fn eot_token(&self) -> &str {
        &self.eot_token
    }

    /// Every id that ends generation (end-of-turn first).
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// Id used to fill padding positions (never attended to).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The Jinja chat template source.
    pub fn chat_template(&self) -> &str {
        &self.chat_template
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Text of the `tokenizer.json` this tokenizer was built from (written by `save_hf`).
    pub fn tokenizer_json(&self) -> &str {
        &self.tokenizer_json
    }

    /// The `tokenizer_config.json` value (holds `chat_template` and the special tokens).
    pub fn tokenizer_config(&self) -> &Value {
        &self.tokenizer_config
    }
}
