//! The step kinds whose batches other processes can compute, made back from a shard job's kind
//! and config (`tsr worker`). The worker then checks that the step's key equals the job's.

use crate::kinds::{
    answer::Answer, eval_judge::PairwiseJudge, generate::Generate, judge::Judge,
    meta_judge::MetaJudge, ref_logprobs::ReferenceLogprobs,
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

/// The step of kind `kind` with this config, or `None` for a kind that is not sharded.
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
            }),
            Arc::new(Judge {
                mode: JudgeMode::Text,
                samples: 3,
                max_new_tokens: 160,
                temperature: 0.1 + 0.2,
                top_p: 1.0 / 3.0,
                batch_size: 16,
                template: "rubric {prompt} {response} \u{e9}".into(),
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
                template: "meta".into(),
                judge_template: "judge".into(),
            }),
            Arc::new(ReferenceLogprobs { batch_size: 16 }),
            Arc::new(Answer {
                max_new_tokens: 256,
                temperature: 0.0,
                top_p: 1.0,
                batch_size: 16,
            }),
            Arc::new(PairwiseJudge {
                mode: JudgeMode::Logprob,
                max_new_tokens: 160,
                temperature: 1e-300,
                top_p: 1.0,
                batch_size: 16,
                bootstrap_resamples: 1000,
                template: "{instruction} {output_a} {output_b}".into(),
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
        assert!(step_of("select", &serde_json::json!({})).is_none());
        let e = step_of("generate", &serde_json::json!({"k": "seven"}))
            .unwrap()
            .err()
            .unwrap();
        assert!(e.to_string().contains("not this build's"), "{e}");
    }
}
