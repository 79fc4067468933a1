//! The records steps write and read (as JSON lines in blobs): a generated [`Response`], a
//! [`Judgement`] of one, a preference [`Pair`] with its lineage, an evaluation output
//! ([`EvalOutput`]) and its [`Annotation`], and their parts (the [`Role`] of a generator, a
//! judge's [`Verdict`]). Their serde names are stored formats: a field added
//! later needs `#[serde(default)]` so that older records still read.

use serde::{Deserialize, Serialize};
use tsr_state::Digest;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub prompt_id: String,
    pub sample: u32,
    pub seed: u64,
    pub text: String,
    pub tokens: usize,
    /// `eot` (end of turn) or `length` (max tokens reached).
    pub finish: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Judgement {
    pub prompt_id: String,
    pub sample: u32,
    /// Raw judge outputs (text mode), verbatim.
    pub texts: Vec<String>,
    pub verdicts: Vec<Verdict>,
    /// Probabilities of scores 0..=5 (logprob mode).
    pub probs: Option<Vec<f64>>,
    /// Mean parsed score (text) or expected score (logprob); `None` when nothing parsed.
    pub score: Option<f64>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    /// Self-Rewarding: best vs worst of Mi.
    Standard,
    /// Anchored Rejection (phase 1 of Temporal).
    Anchored,
    /// Future-Guided Chosen (phase 2), reusing phase 1's rejected.
    FutureGuided,
    /// Meta-Rewarding: a judgement preferred by the meta-judge in both orders.
    MetaJudge,
}

/// What a pair trains: the actor (responses to prompts; the default, left out of the record) or
/// the judge (judgements of a response, whose prompt is the rendered judge prompt).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PairKind {
    Actor,
    Judge,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Side {
    pub text: String,
    pub role: Role,
    /// The model that wrote the text (its weights digest).
    #[serde(with = "tsr_state::hex")]
    pub generator_model: Digest,
    pub sample: u32,
    pub seed: u64,
    pub tokens: usize,
    pub judgements: Vec<String>,
    pub scores: Vec<Option<u8>>,
    pub score: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct JudgeInfo {
    #[serde(with = "tsr_state::hex")]
    pub model: Digest,
    pub mode: String,
    pub template_digest: String,
}

/// One preference pair with its lineage. `prompt`/`chosen`/`rejected` at the top level are
/// TRL-compatible when exported.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Pair {
    pub pair_id: String,
    pub iteration: u32,
    pub phase: String,
    pub prompt_id: String,
    pub prompt: String,
    pub prompt_digest: String,
    pub chosen: Side,
    pub rejected: Side,
    pub judge: JudgeInfo,
    pub rule: Rule,
    pub decision: String,
    /// `None` for actor pairs (records written before judge pairs existed read the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<PairKind>,
    /// Lineage of a judge pair.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<MetaLineage>,
}

impl Pair {
    pub fn is_judge(&self) -> bool {
        self.kind == Some(PairKind::Judge)
    }
}

/// One output of a generator for one prompt (a model's answer or a reference output).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EvalOutput {
    pub prompt_id: String,
    pub output: String,
    /// The model's weights digest, or the `generator` of a reference file.
    pub generator: String,
    /// Generated tokens (`None` for reference outputs).
    #[serde(default)]
    pub tokens: Option<usize>,
    /// `eot` or `length` (`None` for reference outputs).
    #[serde(default)]
    pub finish: Option<String>,
    /// The sampling seed (`None` for greedy answers and reference outputs).
    #[serde(default)]
    pub seed: Option<u64>,
}

/// Which output the judge saw first (as `A`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Order {
    BaselineFirst,
    ModelFirst,
}

/// What one order's verdict says.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Prefers {
    Baseline,
    Model,
    /// `logprob` mode only: both tokens exactly equally likely.
    Tie,
    /// The verdict could not be read (text mode), with the reason.
    Unparsed(String),
}

/// The judge's verdict in one order.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct OrderVerdict {
    pub order: Order,
    /// The judge's raw text (`text` mode).
    #[serde(default)]
    pub text: Option<String>,
    /// Probabilities of `A` and `B` renormalised over the two (`logprob` mode).
    #[serde(default)]
    pub prob_a: Option<f64>,
    #[serde(default)]
    pub prob_b: Option<f64>,
    pub prefers: Prefers,
}

/// One judged prompt: AlpacaEval's annotation fields (`output_1` is the baseline, `output_2`
/// the evaluated model; `preference` 1 = baseline, 2 = model, 1.5 = tie, `None` = undecided)
/// plus the lineage of the verdict.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Annotation {
    pub prompt_id: String,
    pub instruction: String,
    pub output_1: String,
    pub output_2: String,
    pub generator_1: String,
    pub generator_2: String,
    pub preference: Option<f64>,
    /// How the preference was reached, in words.
    pub decision: String,
    /// Both orders' verdicts (empty when the outputs are identical).
    pub verdicts: Vec<OrderVerdict>,
    #[serde(with = "tsr_state::hex")]
    pub judge_model: Digest,
    pub mode: String,
    pub template_digest: String,
    #[serde(default)]
    pub answer: Option<String>,
    /// Exact match of the model's output (`output_2`) with `answer`.
    #[serde(default)]
    pub correct: Option<bool>,
    /// Exact match of the baseline's output with `answer`.
    #[serde(default)]
    pub baseline_correct: Option<bool>,
    /// An API judge's answer: who answered, what it cost, the raw log-probabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<ApiVerdict>,
}

/// What an OpenAI-compatible judge answered for one comparison (`api-judge`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ApiVerdict {
    pub annotator: String,
    /// The model name the request gave.
    pub requested_model: String,
    /// The answer's own `model`, `system_fingerprint` and `id` (an alias can change behind a
    /// name).
    pub model: Option<String>,
    pub system_fingerprint: Option<String>,
    pub id: Option<String>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// The model's output was shown first (AlpacaEval's switch).
    pub switched: bool,
    /// The judge's one token's top log-probabilities, as answered.
    pub top_logprobs: Vec<(String, f64)>,
    /// The preference in the order shown (before the switch is undone).
    pub shown_preference: Option<f64>,
    /// Why the comparison is undecided, if it is.
    pub error: Option<String>,
    /// Tries until the server answered (0: not asked).
    pub tries: u32,
    pub elapsed_ms: u64,
    pub at_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Mi, the model being trained this iteration.
    Current,
    /// M0 (or Mi-1): the past anchor.
    Anchor,
    /// Mf: the look-ahead model of phase 1.
    Future,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Verdict {
    Score(u8),
    Unscored(String),
}

impl Verdict {
    pub fn score(&self) -> Option<u8> {
        match self {
            Verdict::Score(s) => Some(*s),
            Verdict::Unscored(_) => None,
        }
    }
}

/// A meta-judge's verdict in one order: which of the two judgements shown (A first, B second)
/// is better; unparseable outputs are kept with the reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaVerdict {
    A,
    B,
    Unparsed(String),
}

/// One judgement of a judge pair.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JudgementRef {
    /// Index among the response's J judgements.
    pub index: usize,
    pub score: u8,
    pub text: String,
}

/// The lineage of a judge pair: the response judged, the two judgements compared, and the
/// meta-judgements of both orders.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetaLineage {
    pub response_prompt_id: String,
    pub response_sample: u32,
    #[serde(with = "tsr_state::hex")]
    pub response_generator_model: Digest,
    pub response_digest: String,
    /// The model that wrote the judgements.
    #[serde(with = "tsr_state::hex")]
    pub judge_model: Digest,
    pub judge_template_digest: String,
    /// Variance of the response's parsed judge scores.
    pub variance: f64,
    /// Judgement A and B as shown in order "ab".
    pub judgements: [JudgementRef; 2],
    #[serde(with = "tsr_state::hex")]
    pub meta_model: Digest,
    pub meta_template_digest: String,
    /// Order "ab" then order "ba", verbatim, with their parsed verdicts and seeds.
    pub meta_texts: [String; 2],
    pub meta_verdicts: [MetaVerdict; 2],
    pub meta_seeds: [u64; 2],
    /// The agreed verdict in order "ab" terms: `A` or `B`.
    pub verdict: String,
}
