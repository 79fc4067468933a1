//! `metrics`: the collapse diagnostics of one iteration, per phase: mean chosen and rejected
//! score and their gap, cosine similarity of chosen vs rejected mean-pooled final hidden states
//! under Mi (the paper's signal that the preference gap is vanishing), mean response lengths,
//! the share of pairs whose rejected came from the anchor and whose chosen came from the future
//! model, skipped prompts, unscored judgements, and the final DPO loss / accuracy / margin.
//!
//! Inputs per phase `n` (1, 2): `p<n>_pairs`, `p<n>_summary`, `p<n>_dpo`; and the model Mi.
//! The pair diagnostics are over actor pairs; judge pairs mixed into a phase are only counted.
//! Meta workflows add `meta_judgements`, `meta_responses`, `meta_summary` and
//! `meta_comparisons`, giving the judge-side diagnostics (`judge_pairs::MetaMetrics`).

use crate::kinds::dpo::DpoReport;
use crate::kinds::meta_judge::MetaSummary;
use crate::kinds::select::SelectSummary;
use crate::lm::{self, model_err};
use crate::records::Judgement;
use crate::records::Pair;
use crate::records::Response;
use crate::records::Role;
use crate::rules::judge_pairs::{meta_metrics, Comparison};
use serde::{Deserialize, Serialize};
use tsr_engine::{Step, StepContext, StepError, StepInputs, StepOutputs};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PhaseMetrics {
    pub phase: String,
    pub prompts: usize,
    pub pairs: usize,
    pub skipped: usize,
    pub unscored_judgements: usize,
    pub mean_chosen_score: f64,
    pub mean_rejected_score: f64,
    pub score_gap: f64,
    /// Mean cosine similarity of chosen vs rejected (mean-pooled hidden states under Mi).
    pub cosine_similarity: Option<f64>,
    pub mean_chosen_tokens: f64,
    pub mean_rejected_tokens: f64,
    pub share_rejected_from_anchor: f64,
    pub share_chosen_from_future: f64,
    pub dpo_steps: u64,
    pub dpo_final_loss: Option<f64>,
    pub dpo_final_accuracy: Option<f64>,
    pub dpo_final_margin: Option<f64>,
    /// Judge pairs trained on in this phase (meta workflows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge_pairs: Option<usize>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct IterationMetrics {
    pub workflow: String,
    pub iteration: u32,
    /// Mi: the model that generated, judged, and was trained from in this iteration.
    pub model: String,
    /// Mi+1: the model this iteration produced.
    pub produced: Option<String>,
    pub phases: Vec<PhaseMetrics>,
    /// Judge-side diagnostics (meta workflows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<crate::rules::judge_pairs::MetaMetrics>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Metrics {
    pub workflow: String,
    pub iteration: u32,
    pub phases: Vec<String>,
    pub batch_size: usize,
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        ab += *x as f64 * *y as f64;
        aa += *x as f64 * *x as f64;
        bb += *y as f64 * *y as f64;
    }
    ab / (aa.sqrt() * bb.sqrt()).max(1e-12)
}

impl Step for Metrics {
    fn kind(&self) -> &'static str {
        "metrics"
    }
    fn runs_as_job(&self) -> bool {
        true
    }
    fn version(&self) -> u32 {
        1
    }
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap()
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["metrics"]
    }
    fn run(&self, inputs: &StepInputs, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let model = lm::load(inputs, "model", ctx)?;
        let tok = model.tokenizer();
        let mut out = IterationMetrics {
            workflow: self.workflow.clone(),
            iteration: self.iteration,
            model: lm::model_digest(inputs, "model")?.to_hex(),
            produced: inputs
                .has("produced")
                .then(|| inputs.digest("produced").map(|d| d.to_hex()))
                .transpose()?,
            phases: vec![],
            meta: None,
        };
        ctx.progress().set_length(self.phases.len() as u64);
        for (n, name) in self.phases.iter().enumerate() {
            let p = n + 1;
            let (judge_pairs, pairs): (Vec<Pair>, Vec<Pair>) =
                lm::from_jsonl::<Pair>(&inputs.bytes(&format!("p{p}_pairs"))?, "pairs")?
                    .into_iter()
                    .partition(|p| p.is_judge());
            let sum: SelectSummary = inputs.json(&format!("p{p}_summary"))?;
            let dpo: DpoReport = inputs.json(&format!("p{p}_dpo"))?;
            let mut seqs = Vec::with_capacity(pairs.len() * 2);
            for pair in &pairs {
                seqs.push(
                    tok.encode_response(&pair.chosen.text)
                        .map_err(model_err("encoding"))?,
                );
                seqs.push(
                    tok.encode_response(&pair.rejected.text)
                        .map_err(model_err("encoding"))?,
                );
            }
            let cosine_similarity = if pairs.is_empty() {
                None
            } else {
                let h = model
                    .mean_hidden(&seqs, self.batch_size)
                    .map_err(model_err("hidden states"))?;
                Some(h.chunks(2).map(|c| cosine(&c[0], &c[1])).sum::<f64>() / pairs.len() as f64)
            };
            let k = pairs.len().max(1) as f64;
            let last = dpo.metrics.last();
            out.phases.push(PhaseMetrics {
                phase: name.clone(),
                prompts: sum.prompts,
                pairs: pairs.len(),
                skipped: sum.skipped_no_gap + sum.skipped_no_scored + sum.skipped_no_phase1,
                unscored_judgements: sum.unscored_judgements,
                mean_chosen_score: sum.mean_chosen_score,
                mean_rejected_score: sum.mean_rejected_score,
                score_gap: sum.mean_chosen_score - sum.mean_rejected_score,
                cosine_similarity,
                mean_chosen_tokens: sum.mean_chosen_tokens,
                mean_rejected_tokens: sum.mean_rejected_tokens,
                share_rejected_from_anchor: pairs
                    .iter()
                    .filter(|p| p.rejected.role == Role::Anchor)
                    .count() as f64
                    / k,
                share_chosen_from_future: pairs
                    .iter()
                    .filter(|p| p.chosen.role == Role::Future)
                    .count() as f64
                    / k,
                dpo_steps: dpo.steps,
                dpo_final_loss: last.map(|m| m.loss),
                dpo_final_accuracy: last.and_then(|m| m.dpo.map(|d| d.accuracy)),
                dpo_final_margin: last.and_then(|m| m.dpo.map(|d| d.margin)),
                judge_pairs: sum
                    .judge_pairs_kept
                    .or((!judge_pairs.is_empty()).then_some(judge_pairs.len())),
            });
            ctx.progress().inc(1);
        }
        if inputs.has("meta_summary") {
            let judgements: Vec<Judgement> =
                lm::from_jsonl(&inputs.bytes("meta_judgements")?, "judgements")?;
            let responses: Vec<Response> =
                lm::from_jsonl(&inputs.bytes("meta_responses")?, "responses")?;
            let comparisons: Vec<Comparison> =
                lm::from_jsonl(&inputs.bytes("meta_comparisons")?, "meta comparisons")?;
            let summary: MetaSummary = inputs.json("meta_summary")?;
            let tokens: Vec<usize> = responses.iter().map(|r| r.tokens).collect();
            out.meta = Some(meta_metrics(
                &judgements,
                &tokens,
                &comparisons,
                summary.uncertain,
                summary.pairs,
            ));
        }
        Ok(StepOutputs::new().json("metrics", &out))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cosine_of_parallel_and_orthogonal() {
        assert!((super::cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-12);
        assert!(super::cosine(&[1.0, 0.0], &[0.0, 3.0]).abs() < 1e-12);
    }
}
