//! The step kinds that other processes compute (their batches, or the whole step), made back
//! from a job's kind and config (`tsr worker`). The worker then checks that the step's key equals the job's.

use crate::kinds::{
    answer::Answer, dpo::Dpo, eval_judge::PairwiseJudge, generate::Generate, judge::Judge,
    meta_judge::MetaJudge, metrics::Metrics, ref_logprobs::ReferenceLogprobs,
};
use std::sync::Arc;
use tsr_engine::{Step, StepError};

/// The kinds [`step_of`] makes.
pub const SHARDABLE: [&str; 6] = [
    "generate",
    "judge",
    "meta-judge",
    "ref-logprobs",
    "answer",
    "eval-judge",
];

/// The kinds another executor runs whole, in one of its workers (see `tsr_engine::job`).
pub const WHOLE: [&str; 2] = ["dpo", "metrics"];

/// Whether a worker runs steps of kind `kind` (as shards, or whole).
pub fn in_workers(kind: &str) -> bool {
    SHARDABLE.contains(&kind) || WHOLE.contains(&kind)
}

/// The step of kind `kind` with this config, or `None` for a kind no worker runs.
pub fn step_of(kind: &str, config: &serde_json::Value) -> Option<Result<Arc<dyn Step>, StepError>> {
    fn make<T: Step + serde::de::DeserializeOwned>(
        kind: &str,
        config: &serde_json::Value,
    ) -> Result<Arc<dyn Step>, StepError> {
        serde_json::from_value::<T>(config.clone())
            .map(|s| Arc::new(s) as Arc<dyn Step>)
            .map_err(|e| {
                StepError::Invalid(format!(
                    "the shard job's `{kind}` config is not this build's: {e}"
                ))
            })
    }
    Some(match kind {
        "generate" => make::<Generate>(kind, config),
        "judge" => make::<Judge>(kind, config),
        "meta-judge" => make::<MetaJudge>(kind, config),
        "ref-logprobs" => make::<ReferenceLogprobs>(kind, config),
        "answer" => make::<Answer>(kind, config),
        "eval-judge" => make::<PairwiseJudge>(kind, config),
        "dpo" => make::<Dpo>(kind, config),
        "metrics" => make::<Metrics>(kind, config),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::judge::JudgeMode;

    /// A worker makes each shardable step back from its config: same kind, version and config
    /// (hence the same key), with awkward floats.
    #[test]
    fn every_shardable_kind_comes_back_from_its_config() {
        let steps: Vec<Arc<dyn Step>> = vec![
            Arc::new(Generate {
                k: 7,
                max_new_tokens: 256,
                temperature: 0.7,
                top_p: 0.9,
                top_k: Some(40),
                batch_size: 16,
                commit_batches: 4,
                weights: Some(crate::lm::Weights::F16),
                prompt_attention: Some(crate::lm::PromptAttention::Fused),
            }),
            Arc::new(Judge {
                mode: JudgeMode::Text,
                samples: 3,
                max_new_tokens: 160,
                temperature: 0.1 + 0.2,
                top_p: 1.0 / 3.0,
                batch_size: 16,
                commit_batches: 3,
                template: "rubric {prompt} {response} \u{e9}".into(),
                weights: Some(crate::lm::Weights::Bf16),
                prompt_attention: Some(crate::lm::PromptAttention::Fused),
            }),
            Arc::new(MetaJudge {
                iteration: 2,
                max_responses: 0,
                response_share: 0.15,
                max_per_prompt: 1,
                max_new_tokens: 200,
                temperature: 0.7,
                top_p: 0.9,
                batch_size: 16,
                commit_batches: 2,
                template: "meta".into(),
                judge_template: "judge".into(),
                prompt_attention: Some(crate::lm::PromptAttention::Fused),
            }),
            Arc::new(ReferenceLogprobs { batch_size: 16 }),
            Arc::new(Answer {
                max_new_tokens: 256,
                temperature: 0.0,
                top_p: 1.0,
                batch_size: 16,
                commit_batches: 5,
                prompt_attention: Some(crate::lm::PromptAttention::Fused),
            }),
            Arc::new(PairwiseJudge {
                mode: JudgeMode::Text,
                max_new_tokens: 160,
                temperature: 1e-300,
                top_p: 1.0,
                batch_size: 16,
                commit_batches: 2,
                bootstrap_resamples: 1000,
                template: "{instruction} {output_a} {output_b}".into(),
                prompt_attention: None,
            }),
        ];
        let kinds: Vec<&str> = steps.iter().map(|s| s.kind()).collect();
        assert_eq!(kinds, SHARDABLE);
        for s in steps {
            assert!(s.shardable(), "{}", s.kind());
            let back = step_of(s.kind(), &s.config()).unwrap().unwrap();
            assert_eq!(back.kind(), s.kind());
            assert_eq!(back.version(), s.version());
            assert_eq!(back.config(), s.config(), "{}", s.kind());
        }
        // The whole-step kinds too, LoRA or not.
        let dpo = |lora| crate::kinds::dpo::Dpo {
            beta: 0.1 + 0.2,
            loss: tsr_dpo::DpoLossKind::Sigmoid,
            lr: 5e-7 / 3.0,
            warmup_steps: 3,
            epochs: 2,
            micro_batch: 2,
            accum_steps: 4,
            max_grad_norm: Some(1.0 / 3.0),
            weight_decay: 0.0,
            checkpoint_every: 7,
            lora,
        };
        let whole: Vec<Arc<dyn Step>> = vec![
            Arc::new(dpo(None)),
            Arc::new(dpo(Some(crate::kinds::dpo::LoraTraining {
                r: 16,
                alpha: 32.0,
                dropout: 0.05,
                targets: vec!["q_proj".into(), "v_proj".into()],
            }))),
            Arc::new(Metrics {
                workflow: "temporal".into(),
                iteration: 2,
                phases: vec!["d1".into(), "d2".into()],
                batch_size: 8,
            }),
        ];
        for s in whole {
            assert!(s.runs_as_job() && in_workers(s.kind()), "{}", s.kind());
            let back = step_of(s.kind(), &s.config()).unwrap().unwrap();
            assert_eq!(back.config(), s.config(), "{}", s.kind());
            assert_eq!(back.version(), s.version());
        }
        assert!(step_of("select", &serde_json::json!({})).is_none());
        let e = step_of("generate", &serde_json::json!({"k": "seven"}))
            .unwrap()
            .err()
            .unwrap();
        assert!(e.to_string().contains("not this build's"), "{e}");
    }
}
