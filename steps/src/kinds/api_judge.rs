//! `api-judge`: AlpacaEval 2.0's default annotator (`weighted_alpaca_eval_gpt4_turbo`) asked
//! of an OpenAI-compatible server, one comparison per prompt, as alpaca_eval asks it:
//!
//! - which output is shown first follows AlpacaEval's seeded switch on the instruction
//!   ([`crate::rules::py_random::alpaca_eval_switched`]); the baseline is `output_1` unless
//!   switched;
//! - the prompt is the annotator's template filled as alpaca_eval fills it, split into chat
//!   messages at its `<|im_start|>` blocks ([`crate::rules::alpaca_annotator`]);
//! - the request asks for one token with its top log-probabilities (`max_tokens = 1`,
//!   `temperature = 1`, `logprobs`, `top_logprobs = 5`);
//! - the preference is `2 - P(m) / (P(m) + P(M))` from the top log-probabilities, read back in
//!   the original order when switched, and undecided when neither token is there; identical
//!   outputs are 1.5 without asking.
//!
//! Each prompt is an item, committed as soon as its answer arrives: the raw answer (body with
//! log-probabilities, status, tries, time), never the key. A stopped, killed or restarted
//! evaluation asks only for the prompts without an item; `tsr replay` parses the recorded
//! answers again without asking the server. The server's address, the key's variable, the
//! concurrency, timeouts, retries and the token budget are not in the step key: changing them
//! continues the evaluation.

use crate::kinds::eval_judge::read_outputs;
use crate::lm;
use crate::openai::{ApiSettings, CallError, Client, Reply};
use crate::prompts::Prompt;
use crate::records::{Annotation, ApiVerdict, EvalOutput, Order, OrderVerdict, Prefers};
use crate::rules::alpaca_annotator::{
    fill_template, soft_preference, to_chat_messages, unswitch, ChatMessage,
};
use crate::rules::eval::summarize;
use crate::rules::py_random::alpaca_eval_switched;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use tsr_engine::{Resource, Step, StepContext, StepError, StepInputs, StepOutputs};

/// AlpacaEval 2.0's default annotator, reproduced.
pub const WEIGHTED_ALPACA_EVAL_GPT4_TURBO: &str = "weighted_alpaca_eval_gpt4_turbo";
/// tsr's own pairwise judgement (the local judge's, in `text` mode) asked of a server: both
/// orders, each its own request, a preference only when they agree.
pub const TSR_PAIRWISE: &str = "tsr_pairwise";

/// The step. Its config (the step key) is what changes the answers: the annotator, the
/// model's name, the template and the completion settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiJudge {
    pub annotator: String,
    /// The model name sent in each request.
    pub model: String,
    /// The annotator's prompt template (`{instruction}`, `{output_1}`, `{output_2}`, as
    /// `<|im_start|>ROLE ... <|im_end|>` blocks).
    pub template: String,
    pub max_tokens: u32,
    pub temperature: f64,
    /// Sent as is (AlpacaEval's client sends 1.0).
    pub top_p: f64,
    /// AlpacaEval's annotator: the top log-probabilities asked for (`tsr_pairwise`: 0, none).
    pub top_logprobs: u32,
    pub bootstrap_resamples: usize,
    /// Where and how to ask (not part of the key).
    #[serde(skip)]
    pub server: Option<ApiSettings>,
    /// Tokens (in and out) the evaluation may spend in all (not part of the key).
    #[serde(skip)]
    pub max_cost_tokens: Option<u64>,
}

/// What the server said about one prompt, as recorded (the item).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Exchange {
    pub prompt_id: String,
    /// The model's output was shown first (`output_1`): AlpacaEval's switch.
    pub switched: bool,
    /// blake3 of the request body sent (rebuilt from the inputs and the config, so not kept).
    pub request: String,
    pub reply: Recorded,
    /// Tries until the server answered.
    pub tries: u32,
    pub elapsed_ms: u64,
    /// When the answer arrived (ms since the Unix epoch).
    pub at_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Recorded {
    /// The two outputs are the same text: a tie, not asked.
    Identical,
    /// A 2xx answer, its body as received.
    Answered { status: u16, body: String },
    /// The server refused this request (a content filter, a context too long).
    Refused { status: u16, message: String },
}

/// The parts of an answer's body that the annotation keeps.
struct Parsed {
    model: Option<String>,
    system_fingerprint: Option<String>,
    id: Option<String>,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    text: Option<String>,
    /// The first token's top log-probabilities; `Err` says why there are none.
    top: Result<Vec<(String, f64)>, String>,
}

fn parse_body(body: &str) -> Parsed {
    let v: serde_json::Value = match serde_json::from_str(body) {
        Ok(v) => v,
        Err(e) => {
            return Parsed {
                model: None,
                system_fingerprint: None,
                id: None,
                prompt_tokens: None,
                completion_tokens: None,
                text: None,
                top: Err(format!("the answer is not JSON ({e})")),
            }
        }
    };
    let s = |v: &serde_json::Value| v.as_str().map(str::to_string);
    let choice = &v["choices"][0];
    let top = match choice["logprobs"]["content"][0]["top_logprobs"].as_array() {
        None => Err("the answer has no log-probabilities (choices[0].logprobs.content[0].top_logprobs); the server must support logprobs with top_logprobs".to_string()),
        Some(list) => list
            .iter()
            .map(|t| match (t["token"].as_str(), t["logprob"].as_f64()) {
                (Some(tok), Some(lp)) => Ok((tok.to_string(), lp)),
                _ => Err(format!("a top log-probability entry is not {{token, logprob}}: {t}")),
            })
            .collect(),
    };
    Parsed {
        model: s(&v["model"]),
        system_fingerprint: s(&v["system_fingerprint"]),
        id: s(&v["id"]),
        prompt_tokens: v["usage"]["prompt_tokens"].as_u64(),
        completion_tokens: v["usage"]["completion_tokens"].as_u64(),
        text: s(&choice["message"]["content"]),
        top,
    }
}

/// Tokens an exchange cost (in and out), as the server counted them.
fn tokens_of(e: &Exchange) -> u64 {
    match &e.reply {
        Recorded::Answered { body, .. } => {
            let p = parse_body(body);
            p.prompt_tokens.unwrap_or(0) + p.completion_tokens.unwrap_or(0)
        }
        _ => 0,
    }
}

/// What the answers recorded so far (the items of an `api-judge` step, finished or not)
/// asked and spent; `model` is the step's.
pub fn usage_of(
    items: &[(u64, Vec<u8>)],
    model: &str,
) -> Result<crate::rules::eval::ApiUsage, StepError> {
    let mut u = crate::rules::eval::ApiUsage {
        model: model.to_string(),
        ..Default::default()
    };
    for (i, bytes) in items {
        let e = decode(*i, bytes)?;
        match &e.reply {
            Recorded::Identical => {}
            Recorded::Refused { .. } => {
                u.requests += 1;
                u.refused += 1;
            }
            Recorded::Answered { body, .. } => {
                let p = parse_body(body);
                u.requests += 1;
                u.prompt_tokens += p.prompt_tokens.unwrap_or(0);
                u.completion_tokens += p.completion_tokens.unwrap_or(0);
            }
        }
    }
    Ok(u)
}

fn decode(i: u64, bytes: &[u8]) -> Result<Exchange, StepError> {
    serde_json::from_slice(bytes).map_err(|e| {
        StepError::Invalid(format!(
            "recorded answer {i} is not an exchange of this build ({e})"
        ))
    })
}

impl ApiJudge {
    /// AlpacaEval 2.0's default annotator with its completion settings (alpaca_eval's
    /// `weighted_alpaca_eval_gpt4_turbo/configs.yaml`: one token, temperature 1, the top 5
    /// log-probabilities; its client also sends `top_p = 1.0`), asking `model` with `template`.
    pub fn weighted_alpaca_eval(model: &str, template: String, bootstrap_resamples: usize) -> Self {
        ApiJudge {
            annotator: WEIGHTED_ALPACA_EVAL_GPT4_TURBO.into(),
            model: model.into(),
            template,
            max_tokens: 1,
            temperature: 1.0,
            top_p: 1.0,
            top_logprobs: 5,
            bootstrap_resamples,
            server: None,
            max_cost_tokens: None,
        }
    }

    fn template_digest(&self) -> String {
        blake3::hash(self.template.as_bytes()).to_hex().to_string()
    }

    /// tsr's own two-order judgement rather than AlpacaEval's annotator.
    pub fn pairwise(&self) -> bool {
        self.annotator == TSR_PAIRWISE
    }

    /// Recorded answers per prompt: one for AlpacaEval's annotator, one per order for tsr's.
    fn per_prompt(&self) -> u64 {
        if self.pairwise() {
            2
        } else {
            1
        }
    }

    /// The request body for answer `j` of prompt `p` under tsr's pairwise judgement: the
    /// template filled with the two outputs in the order `j` names (even: the baseline's first),
    /// as one user message, as the local judge sees it.
    pub fn pairwise_request(
        &self,
        p: &Prompt,
        baseline: &str,
        model: &str,
        order: Order,
    ) -> Vec<u8> {
        let (a, b) = match order {
            Order::BaselineFirst => (baseline, model),
            Order::ModelFirst => (model, baseline),
        };
        let text = crate::rules::eval::render_placeholders(
            &self.template,
            &[
                ("{instruction}", p.prompt.as_str()),
                ("{output_a}", a),
                ("{output_b}", b),
            ],
        );
        let body = serde_json::json!({
            "model": self.model,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
        });
        serde_json::to_vec(&body).expect("a request serializes")
    }

    /// The annotation of prompt `p` under tsr's pairwise judgement from its two recorded
    /// answers (baseline first, model first). The `api` record sums both requests' tries and
    /// tokens and keeps the later answer's identity.
    fn annotate_pairwise(
        &self,
        p: &Prompt,
        b: &EvalOutput,
        c: &EvalOutput,
        answers: [&Exchange; 2],
    ) -> Annotation {
        use crate::records::MetaVerdict;
        let mut api = ApiVerdict {
            annotator: self.annotator.clone(),
            requested_model: self.model.clone(),
            ..Default::default()
        };
        let identical = answers
            .iter()
            .all(|e| matches!(e.reply, Recorded::Identical));
        let mut verdicts = Vec::new();
        let mut errors = Vec::new();
        for (e, order) in answers
            .iter()
            .zip([Order::BaselineFirst, Order::ModelFirst])
        {
            api.tries += e.tries;
            api.elapsed_ms += e.elapsed_ms;
            api.at_ms = api.at_ms.max(e.at_ms);
            let side = |letter: MetaVerdict| match (order, letter) {
                (Order::BaselineFirst, MetaVerdict::A) | (Order::ModelFirst, MetaVerdict::B) => {
                    Prefers::Baseline
                }
                _ => Prefers::Model,
            };
            let (text, prefers) = match &e.reply {
                Recorded::Identical => continue,
                Recorded::Refused { status, message } => {
                    let why = format!("the server refused the request ({status}: {message})");
                    errors.push(why.clone());
                    (None, Prefers::Unparsed(why))
                }
                Recorded::Answered { body, .. } => {
                    let parsed = parse_body(body);
                    api.model = parsed.model.or(api.model.take());
                    api.system_fingerprint =
                        parsed.system_fingerprint.or(api.system_fingerprint.take());
                    api.id = parsed.id.or(api.id.take());
                    api.prompt_tokens =
                        Some(api.prompt_tokens.unwrap_or(0) + parsed.prompt_tokens.unwrap_or(0));
                    api.completion_tokens = Some(
                        api.completion_tokens.unwrap_or(0) + parsed.completion_tokens.unwrap_or(0),
                    );
                    match parsed.text {
                        Some(t) => {
                            let prefers = match crate::rules::meta_verdict::parse_better(&t) {
                                MetaVerdict::Unparsed(why) => Prefers::Unparsed(why),
                                letter => side(letter),
                            };
                            (Some(t), prefers)
                        }
                        None => {
                            let why = "the answer has no message text (choices[0].message.content)"
                                .to_string();
                            errors.push(why.clone());
                            (None, Prefers::Unparsed(why))
                        }
                    }
                }
            };
            verdicts.push(OrderVerdict {
                order,
                text,
                prob_a: None,
                prob_b: None,
                prefers,
            });
        }
        if !errors.is_empty() {
            api.error = Some(errors.join("; "));
        }
        let (preference, decision) = if identical {
            (Some(1.5), crate::rules::eval::IDENTICAL.to_string())
        } else {
            crate::rules::eval::combine(&verdicts)
        };
        crate::rules::eval::annotation(
            p,
            b,
            c,
            crate::rules::eval::Judged {
                preference,
                decision,
                verdicts,
                judge_model: self.judge_id(),
                mode: self.annotator.clone(),
                template_digest: self.template_digest(),
                api: Some(api),
            },
        )
    }

    /// What the judge is, as annotations and summaries name it.
    fn judge_id(&self) -> tsr_state::Digest {
        tsr_state::Digest::of(format!("api:{}:{}", self.annotator, self.model).as_bytes())
    }

    /// Checks the template before any work: it fills with the three placeholders and splits
    /// into chat messages.
    pub fn check(&self) -> Result<(), String> {
        if self.pairwise() {
            return crate::rules::eval::check_pairwise_template(&self.template)
                .map_err(|e| format!("the pairwise template: {e}"));
        }
        if self.annotator != WEIGHTED_ALPACA_EVAL_GPT4_TURBO {
            return Err(format!(
                "annotator `{}` is not known; use `{WEIGHTED_ALPACA_EVAL_GPT4_TURBO}` (AlpacaEval 2.0's) or `{TSR_PAIRWISE}` (tsr's own two-order judgement)",
                self.annotator
            ));
        }
        let filled = fill_template(
            &self.template,
            &[("instruction", "i"), ("output_1", "a"), ("output_2", "b")],
        )
        .map_err(|e| format!("the template: {e}"))?;
        to_chat_messages(&filled).map_err(|e| format!("the template: {e}"))?;
        Ok(())
    }

    /// The request body for one prompt (its instruction), with the baseline's output and the
    /// model's, and whether the model's is shown first: the body alpaca_eval's openai decoder
    /// sends (`top_p = 1.0` included, as it sends it; the servers' default, so not part of the
    /// key).
    pub fn request(
        &self,
        p: &Prompt,
        baseline: &str,
        model: &str,
    ) -> Result<(Vec<u8>, bool), StepError> {
        let switched = alpaca_eval_switched(&p.prompt);
        let (first, second) = if switched {
            (model, baseline)
        } else {
            (baseline, model)
        };
        let filled = fill_template(
            &self.template,
            &[
                ("instruction", p.prompt.as_str()),
                ("output_1", first),
                ("output_2", second),
            ],
        )
        .map_err(|e| StepError::Invalid(format!("filling the judge's template: {e}")))?;
        let messages: Vec<ChatMessage> = to_chat_messages(&filled)
            .map_err(|e| StepError::Invalid(format!("the judge's prompt for `{}`: {e}", p.id)))?;
        let body = serde_json::json!({
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "logprobs": true,
            "top_logprobs": self.top_logprobs,
        });
        Ok((
            serde_json::to_vec(&body).expect("a request serializes"),
            switched,
        ))
    }

    /// The annotation of prompt `p` from its recorded exchange.
    fn annotate(&self, p: &Prompt, b: &EvalOutput, c: &EvalOutput, e: &Exchange) -> Annotation {
        let order = if e.switched {
            Order::ModelFirst
        } else {
            Order::BaselineFirst
        };
        let mut api = ApiVerdict {
            annotator: self.annotator.clone(),
            requested_model: self.model.clone(),
            switched: e.switched,
            tries: e.tries,
            elapsed_ms: e.elapsed_ms,
            at_ms: e.at_ms,
            ..Default::default()
        };
        let (preference, decision, verdicts) = match &e.reply {
            Recorded::Identical => (Some(1.5), crate::rules::eval::IDENTICAL.to_string(), vec![]),
            Recorded::Refused { status, message } => {
                let why = format!("the server refused the request ({status}: {message})");
                api.error = Some(why.clone());
                (
                    None,
                    format!("undecided: {why}"),
                    vec![OrderVerdict {
                        order,
                        text: None,
                        prob_a: None,
                        prob_b: None,
                        prefers: Prefers::Unparsed(why),
                    }],
                )
            }
            Recorded::Answered { body, .. } => {
                let parsed = parse_body(body);
                api.model = parsed.model;
                api.system_fingerprint = parsed.system_fingerprint;
                api.id = parsed.id;
                api.prompt_tokens = parsed.prompt_tokens;
                api.completion_tokens = parsed.completion_tokens;
                let shown = match parsed.top {
                    Ok(top) => {
                        let raw = soft_preference(&top);
                        api.top_logprobs = top;
                        raw.ok_or_else(|| {
                            "neither `m` nor `M` is among the top log-probabilities".to_string()
                        })
                    }
                    Err(why) => Err(why),
                };
                api.shown_preference = shown.as_ref().ok().copied();
                match shown {
                    Ok(raw) => {
                        let pref = if e.switched { unswitch(raw) } else { raw };
                        let prefers = if pref > 1.5 {
                            Prefers::Model
                        } else if pref < 1.5 {
                            Prefers::Baseline
                        } else {
                            Prefers::Tie
                        };
                        (
                            Some(pref),
                            format!(
                                "soft preference {pref:.4} (2 - P(m) / (P(m) + P(M)) = {raw:.4} with the {} shown first)",
                                if e.switched { "model's output" } else { "baseline" }
                            ),
                            vec![OrderVerdict {
                                order,
                                text: parsed.text,
                                // The shown-first output is `m`.
                                prob_a: Some(2.0 - raw),
                                prob_b: Some(raw - 1.0),
                                prefers,
                            }],
                        )
                    }
                    Err(why) => {
                        api.error = Some(why.clone());
                        (
                            None,
                            format!("undecided: {why}"),
                            vec![OrderVerdict {
                                order,
                                text: parsed.text,
                                prob_a: None,
                                prob_b: None,
                                prefers: Prefers::Unparsed(why),
                            }],
                        )
                    }
                }
            }
        };
        crate::rules::eval::annotation(
            p,
            b,
            c,
            crate::rules::eval::Judged {
                preference,
                decision,
                verdicts,
                judge_model: self.judge_id(),
                mode: self.annotator.clone(),
                template_digest: self.template_digest(),
                api: Some(api),
            },
        )
    }
}

/// How the asking ended when not every prompt was answered.
enum Ended {
    Stopped,
    Budget {
        spent: u64,
        limit: u64,
        overshoot: u64,
    },
    Fatal(String),
    Unavailable(String),
}

impl Step for ApiJudge {
    fn kind(&self) -> &'static str {
        "api-judge"
    }
    /// 2: AlpacaEval's output order with the annotator's seed (0), and `top_p = 1.0` in each
    /// request, as alpaca_eval sends them (version 1 seeded the order with 123).
    fn version(&self) -> u32 {
        2
    }
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap()
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["annotations", "summary"]
    }
    /// Waits on a server, not on this machine's cores.
    fn resources(&self) -> Vec<Resource> {
        vec![Resource::Io]
    }
    /// The recorded answers are what was paid for: replay parses them, never asks again.
    fn replays_recorded_items(&self) -> bool {
        true
    }
    fn run(&self, inputs: &StepInputs, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let prompts: Vec<Prompt> = lm::from_jsonl(&inputs.bytes("prompts")?, "prompts")?;
        let baseline = read_outputs(inputs, "baseline", &prompts)?;
        let candidate = read_outputs(inputs, "candidate", &prompts)?;
        let journal = ctx.items();
        let n = prompts.len() as u64 * self.per_prompt();
        journal.set_total(n)?;
        let done: BTreeSet<u64> = journal.indices()?.into_iter().collect();
        ctx.progress().set_length(n);
        ctx.progress().set_position(done.len() as u64);
        ctx.progress().set_message(format!("asking {}", self.model));
        let todo: Vec<u64> = (0..n).filter(|i| !done.contains(i)).collect();
        if !todo.is_empty() {
            self.ask(&prompts, &baseline, &candidate, &todo, ctx)?;
        }
        let mut rows = Vec::with_capacity(prompts.len());
        let all = journal.all()?;
        let recorded: BTreeMap<u64, Vec<u8>> = all.iter().cloned().collect();
        let answer = |j: u64, p: &Prompt| -> Result<Exchange, StepError> {
            let bytes = recorded.get(&j).ok_or_else(|| {
                StepError::Other(format!("prompt `{}` has no recorded answer", p.id))
            })?;
            let e = decode(j, bytes)?;
            if e.prompt_id != p.id {
                return Err(StepError::Invalid(format!(
                    "recorded answer {j} is for prompt `{}`, not `{}`: the evaluation prompts changed under the step",
                    e.prompt_id, p.id
                )));
            }
            Ok(e)
        };
        for (i, p) in prompts.iter().enumerate() {
            let (b, c) = (&baseline[&p.id], &candidate[&p.id]);
            if self.pairwise() {
                let j = 2 * i as u64;
                let (first, second) = (answer(j, p)?, answer(j + 1, p)?);
                rows.push(self.annotate_pairwise(p, b, c, [&first, &second]));
            } else {
                rows.push(self.annotate(p, b, c, &answer(i as u64, p)?));
            }
        }
        let mut summary = summarize(
            &rows,
            self.judge_id(),
            &self.annotator,
            &self.template_digest(),
            ctx.derive_seed("bootstrap", 0),
            self.bootstrap_resamples,
        );
        // What the recorded answers asked and spent (both orders' requests for tsr's pairwise
        // judgement).
        summary.api = Some(usage_of(&all, &self.model)?);
        Ok(StepOutputs::new()
            .bytes("annotations", "eval-annotations-jsonl", lm::to_jsonl(&rows))
            .json("summary", &summary))
    }
}

impl ApiJudge {
    /// Asks for every prompt in `todo`, at most `max_concurrency` at once, committing each
    /// answer as it arrives.
    fn ask(
        &self,
        prompts: &[Prompt],
        baseline: &BTreeMap<String, EvalOutput>,
        candidate: &BTreeMap<String, EvalOutput>,
        todo: &[u64],
        ctx: &StepContext,
    ) -> Result<(), StepError> {
        let journal = ctx.items();
        let node = ctx.node().to_string();
        // Identical outputs are ties without asking.
        let mut asks = Vec::new();
        for &i in todo {
            let p = &prompts[(i / self.per_prompt()) as usize];
            let (b, c) = (&baseline[&p.id].output, &candidate[&p.id].output);
            if b == c {
                let e = Exchange {
                    prompt_id: p.id.clone(),
                    switched: false,
                    request: String::new(),
                    reply: Recorded::Identical,
                    tries: 0,
                    elapsed_ms: 0,
                    at_ms: tsr_state::now_ms(),
                };
                journal.commit(&[(i, serde_json::to_vec(&e).expect("an exchange serializes"))])?;
                ctx.progress().inc(1);
            } else {
                asks.push(i);
            }
        }
        if asks.is_empty() {
            return Ok(());
        }
        let server = self.server.as_ref().ok_or_else(|| {
            StepError::Invalid(format!(
                "`{node}` has {} answer(s) not recorded and may not ask its server here: `tsr verify --repair` recomputes evaluations from recorded answers only (it never pays twice); run `tsr verify --repair --ask-api` or `tsr resume RUN` to ask for them",
                asks.len()
            ))
        })?;
        let key = server
            .check()
            .map_err(|e| StepError::Invalid(format!("eval.judge: {e}")))?;
        let client = Client::new(server, key)
            .map_err(|e| StepError::wrap("setting up the judge server's client", e))?;
        // What was asked and spent before this run, from the recorded answers.
        let mut spent: u64 = 0;
        let recorded = journal.all()?;
        let mut usage = usage_of(&recorded, &self.model)?;
        let mut count = recorded.len() as u64;
        for (i, bytes) in &recorded {
            spent += tokens_of(&decode(*i, bytes)?);
        }
        // For `tsr status` from another terminal while this runs.
        let total = prompts.len() as u64 * self.per_prompt();
        let publish = |u: &crate::rules::eval::ApiUsage, count: u64| {
            ctx.progress().set_note(format!(
                "judge {}: {count} of {total} answers recorded, {} request(s) ({} refused), {} tokens in, {} out",
                u.model, u.requests, u.refused, u.prompt_tokens, u.completion_tokens
            ));
        };
        publish(&usage, count);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StepError::io("starting the judge server's client", e))?;
        let last_said = std::sync::Arc::new(std::sync::Mutex::new(None::<std::time::Instant>));
        let ended = rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            let mut next = asks.iter().copied();
            let mut ended: Option<Ended> = None;
            let mut budget_hit_at: Option<u64> = None;
            loop {
                while ended.is_none() && set.len() < server.max_concurrency {
                    if ctx.should_stop() {
                        ended = Some(Ended::Stopped);
                        break;
                    }
                    if let Some(limit) = self.max_cost_tokens {
                        if spent >= limit {
                            budget_hit_at = Some(spent);
                            ended = Some(Ended::Budget {
                                spent,
                                limit,
                                overshoot: 0,
                            });
                            break;
                        }
                    }
                    let Some(i) = next.next() else { break };
                    let p = &prompts[(i / self.per_prompt()) as usize];
                    let (b, c) = (&baseline[&p.id].output, &candidate[&p.id].output);
                    let (body, switched) = if self.pairwise() {
                        // Even: the baseline's output first; odd: the model's.
                        let order = if i % 2 == 0 { Order::BaselineFirst } else { Order::ModelFirst };
                        (self.pairwise_request(p, b, c, order), i % 2 == 1)
                    } else {
                        self.request(p, b, c)?
                    };
                    let client = client.clone();
                    let said = last_said.clone();
                    let node = node.clone();
                    set.spawn(async move {
                        let t0 = std::time::Instant::now();
                        let on_retry = move |tries: u32, why: &str, wait: std::time::Duration| {
                            // At most one line every 10 s, however many requests wait.
                            let mut last = said.lock().unwrap();
                            if last.is_none_or(|t| t.elapsed().as_secs() >= 10) {
                                eprintln!(
                                    "tsr: {node}: the judge server: {why}; trying again in {:.1} s (try {} of this request)",
                                    wait.as_secs_f64(),
                                    tries + 1
                                );
                                *last = Some(std::time::Instant::now());
                            }
                        };
                        let r = client.call(&body, &on_retry).await;
                        (i, switched, blake3::hash(&body).to_hex().to_string(), t0.elapsed(), r)
                    });
                }
                let Some(joined) = set.join_next().await else {
                    break;
                };
                let (i, switched, request, elapsed, r) = joined
                    .map_err(|e| StepError::Other(format!("a request task failed: {e}")))?;
                match r {
                    Ok(called) => {
                        let e = Exchange {
                            prompt_id: prompts[(i / self.per_prompt()) as usize].id.clone(),
                            switched,
                            request,
                            reply: match called.reply {
                                Reply::Answered { status, body } => Recorded::Answered { status, body },
                                Reply::Refused { status, message } => Recorded::Refused { status, message },
                            },
                            tries: called.tries,
                            elapsed_ms: elapsed.as_millis() as u64,
                            at_ms: tsr_state::now_ms(),
                        };
                        spent += tokens_of(&e);
                        let bytes = serde_json::to_vec(&e).expect("an exchange serializes");
                        journal.commit(&[(i, bytes.clone())])?;
                        ctx.progress().inc(1);
                        let now = usage_of(&[(i, bytes)], &self.model)?;
                        usage.requests += now.requests;
                        usage.refused += now.refused;
                        usage.prompt_tokens += now.prompt_tokens;
                        usage.completion_tokens += now.completion_tokens;
                        count += 1;
                        publish(&usage, count);
                    }
                    Err(CallError::Fatal { status, message }) => {
                        ended.get_or_insert(Ended::Fatal(format!(
                            "{}",
                            CallError::Fatal { status, message }
                        )));
                    }
                    Err(e @ CallError::Unavailable { .. }) => {
                        ended.get_or_insert(Ended::Unavailable(e.to_string()));
                    }
                }
            }
            if let (Some(Ended::Budget { overshoot, .. }), Some(at)) = (&mut ended, budget_hit_at) {
                *overshoot = spent - at;
            }
            Ok::<_, StepError>(ended)
        })?;
        match ended {
            None => Ok(()),
            Some(Ended::Stopped) => Err(StepError::Interrupted),
            Some(Ended::Budget {
                spent,
                limit,
                overshoot,
            }) => Err(StepError::Limit(format!(
                "the evaluation spent {} tokens, reaching max_cost_tokens = {limit}{}; raise [eval.judge] max_cost_tokens and run again to continue",
                spent + overshoot,
                if overshoot > 0 {
                    format!(" (requests already in flight added {overshoot})")
                } else {
                    String::new()
                }
            ))),
            Some(Ended::Fatal(m)) => Err(StepError::Invalid(m)),
            Some(Ended::Unavailable(m)) => Err(StepError::Unavailable(m)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judge() -> ApiJudge {
        ApiJudge::weighted_alpaca_eval(
            "gpt-4-1106-preview",
            "<|im_start|>system\nYou judge.\n<|im_end|>\n<|im_start|>user\n{instruction}\nm: {output_1}\nM: {output_2}\n<|im_end|>".into(),
            0,
        )
    }

    fn out(text: &str) -> EvalOutput {
        EvalOutput {
            prompt_id: "p".into(),
            output: text.into(),
            generator: "g".into(),
            tokens: None,
            finish: None,
            seed: None,
        }
    }

    fn answered(text: &str, switched: bool) -> Exchange {
        let body = serde_json::json!({
            "id": "x", "model": "m",
            "choices": [{"message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 3},
        });
        Exchange {
            prompt_id: "p".into(),
            switched,
            request: String::new(),
            reply: Recorded::Answered {
                status: 200,
                body: body.to_string(),
            },
            tries: 1,
            elapsed_ms: 5,
            at_ms: 7,
        }
    }

    #[test]
    fn tsrs_pairwise_judgement_needs_both_orders_to_agree() {
        let mut j = judge();
        j.annotator = TSR_PAIRWISE.into();
        j.template = crate::rules::eval::DEFAULT_PAIRWISE_TEMPLATE.into();
        j.max_tokens = 160;
        j.top_logprobs = 0;
        assert!(j.check().is_ok());
        let p = Prompt {
            id: "p".into(),
            prompt: "Say hi.".into(),
            answer: None,
        };
        let (b, c) = (out("hello"), out("hi there"));
        // Baseline first says A (the baseline), model first says B (the baseline): the baseline.
        let a = j.annotate_pairwise(
            &p,
            &b,
            &c,
            [
                &answered("x\nBetter: A", false),
                &answered("y\nBetter: B", true),
            ],
        );
        assert_eq!(a.preference, Some(1.0), "{}", a.decision);
        assert_eq!(a.verdicts.len(), 2);
        let api = a.api.as_ref().unwrap();
        assert_eq!(
            (api.tries, api.prompt_tokens, api.completion_tokens),
            (2, Some(20), Some(6))
        );
        // Both say A: each order prefers its first output, so they disagree: a tie.
        let a = j.annotate_pairwise(
            &p,
            &b,
            &c,
            [&answered("Better: A", false), &answered("Better: A", true)],
        );
        assert_eq!(a.preference, Some(1.5), "{}", a.decision);
        // Both prefer the model.
        let a = j.annotate_pairwise(
            &p,
            &b,
            &c,
            [&answered("Better: B", false), &answered("Better: A", true)],
        );
        assert_eq!(a.preference, Some(2.0), "{}", a.decision);
        // An order without a verdict leaves the prompt undecided, saying why.
        let a = j.annotate_pairwise(
            &p,
            &b,
            &c,
            [&answered("Better: B", false), &answered("no idea", true)],
        );
        assert_eq!(a.preference, None);
        assert!(a.decision.contains("model first"), "{}", a.decision);
        // The request is the template with the outputs in that order, one user message.
        let body: serde_json::Value =
            serde_json::from_slice(&j.pairwise_request(&p, "hello", "hi there", Order::ModelFirst))
                .unwrap();
        let text = body["messages"][0]["content"].as_str().unwrap();
        assert!(
            text.find("hi there").unwrap() < text.find("hello").unwrap(),
            "{text}"
        );
        assert_eq!(body["max_tokens"], 160);
        assert!(body.get("logprobs").is_none());
        // Logprob-free: AlpacaEval's template is not a pairwise one.
        let mut bad = j.clone();
        bad.template = "no placeholders".into();
        assert!(bad.check().unwrap_err().contains("pairwise template"));
    }

    #[test]
    fn the_key_leaves_out_where_and_how_patiently_to_ask() {
        let a = judge();
        let mut b = judge();
        b.server = Some(ApiSettings {
            base_url: "http://127.0.0.1:1/v1".into(),
            api_key_env: Some("K".into()),
            max_concurrency: 16,
            timeout_s: 5.0,
            max_retries: 9,
        });
        b.max_cost_tokens = Some(10);
        assert_eq!(a.config(), b.config());
        let mut c = judge();
        c.model = "gpt-4o".into();
        assert_ne!(a.config(), c.config());
        assert!(a.check().is_ok());
        let mut bad = judge();
        bad.template = "{instruction} {output_1} {output_2}".into();
        assert!(
            bad.check().unwrap_err().contains("<|im_start|>"),
            "{:?}",
            bad.check()
        );
    }

    #[test]
    fn answers_become_preferences_read_in_the_original_order() {
        let j = judge();
        let p = Prompt {
            id: "p".into(),
            prompt: "Say hi".into(),
            answer: None,
        };
        let body = |top: &str| {
            format!(
                r#"{{"id": "c1", "model": "served", "system_fingerprint": "fp", "usage": {{"prompt_tokens": 90, "completion_tokens": 1}}, "choices": [{{"message": {{"content": "M"}}, "logprobs": {{"content": [{{"token": "M", "logprob": -0.1, "top_logprobs": {top}}}]}}}}]}}"#
            )
        };
        let ex = |switched: bool, reply: Recorded| Exchange {
            prompt_id: "p".into(),
            switched,
            request: "r".into(),
            reply,
            tries: 1,
            elapsed_ms: 3,
            at_ms: 4,
        };
        let answered = |top: &str| Recorded::Answered {
            status: 200,
            body: body(top),
        };
        let lp = |p: f64| p.ln();
        let top = format!(
            r#"[{{"token": "M", "logprob": {}}}, {{"token": "m", "logprob": {}}}]"#,
            lp(0.75),
            lp(0.25)
        );
        // Not switched: M (the second shown, the model) at 0.75.
        let a = j.annotate(&p, &out("base"), &out("model"), &ex(false, answered(&top)));
        assert!((a.preference.unwrap() - 1.75).abs() < 1e-12, "{a:?}");
        assert_eq!(a.verdicts[0].prefers, Prefers::Model);
        let api = a.api.as_ref().unwrap();
        assert_eq!(
            (api.model.as_deref(), api.id.as_deref(), api.prompt_tokens),
            (Some("served"), Some("c1"), Some(90))
        );
        // Switched: the same answer now prefers the baseline (shown second).
        let a = j.annotate(&p, &out("base"), &out("model"), &ex(true, answered(&top)));
        assert!((a.preference.unwrap() - 1.25).abs() < 1e-12, "{a:?}");
        assert_eq!(a.verdicts[0].prefers, Prefers::Baseline);
        assert_eq!(a.verdicts[0].order, Order::ModelFirst);
        // Neither token: undecided, with why.
        let a = j.annotate(
            &p,
            &out("base"),
            &out("model"),
            &ex(false, answered(r#"[{"token": "The", "logprob": -0.1}]"#)),
        );
        assert_eq!(a.preference, None);
        assert!(a.decision.contains("neither"), "{}", a.decision);
        // No log-probabilities, a body that is not JSON, a refusal: undecided, each saying why.
        let none = Recorded::Answered {
            status: 200,
            body: r#"{"choices": [{"message": {"content": "m"}}]}"#.into(),
        };
        let a = j.annotate(&p, &out("base"), &out("model"), &ex(false, none));
        assert!(
            a.decision.contains("no log-probabilities"),
            "{}",
            a.decision
        );
        let broken = Recorded::Answered {
            status: 200,
            body: "{\"choices\": [".into(),
        };
        let a = j.annotate(&p, &out("base"), &out("model"), &ex(false, broken));
        assert!(a.decision.contains("not JSON"), "{}", a.decision);
        let refused = Recorded::Refused {
            status: 400,
            message: "context too long".into(),
        };
        let a = j.annotate(&p, &out("base"), &out("model"), &ex(false, refused));
        assert!(
            a.decision.contains("400: context too long"),
            "{}",
            a.decision
        );
        assert_eq!(a.preference, None);
    }

    #[test]
    fn requests_follow_alpaca_evals_switch_and_settings() {
        let j = judge();
        // Instructions with each switch outcome (see py_random's goldens).
        let mut seen = BTreeSet::new();
        for k in 0..40 {
            let p = Prompt {
                id: format!("p{k}"),
                prompt: format!("instruction {k}"),
                ..Default::default()
            };
            let (body, switched) = j.request(&p, "BASE", "MODEL").unwrap();
            assert_eq!(switched, alpaca_eval_switched(&p.prompt));
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["max_tokens"], 1);
            assert_eq!(v["top_logprobs"], 5);
            assert_eq!(v["logprobs"], true);
            assert_eq!(v["model"], "gpt-4-1106-preview");
            let user = v["messages"][1]["content"].as_str().unwrap();
            let (first, second) = if switched {
                ("MODEL", "BASE")
            } else {
                ("BASE", "MODEL")
            };
            assert!(user.contains(&format!("m: {first}\nM: {second}")), "{user}");
            assert_eq!(v["messages"][0]["role"], "system");
            seen.insert(switched);
        }
        assert_eq!(seen.len(), 2, "both orders occur");
    }
}
