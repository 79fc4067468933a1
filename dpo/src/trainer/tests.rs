//! Trainer-level tests on the tiny random model: exact resume from checkpoint files (digests,
//! metrics, and every pair consumed exactly once per epoch), self-reference gives ln 2 at the
//! first step, a diverged step fails cleanly, and pairs-file errors name the line.

use super::*;
use tsr_model::testing::tiny_model;

use super::testing::{config, text_pairs};

fn pairs_for(model: &LanguageModel) -> Vec<TrainPair> {
    let dir = tempfile::tempdir().unwrap();
    super::testing::pairs_for(model, dir.path())
}

#[test]
fn resume_from_checkpoint_files_is_exact_and_never_skips_or_repeats_a_pair() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir.path().join("m"), 5);
    let pairs = pairs_for(&model);
    let mut t = DpoTrainer::new(&model, pairs.clone(), config()).unwrap();
    assert_eq!(t.total_steps(), 9, "3 epochs of ceil(5 / 2) steps");
    let mut seen = Vec::new();
    while !t.is_done() {
        seen.extend(t.step().unwrap().pairs.iter().map(|p| p.index));
    }
    let want_digest = model.digest().unwrap();
    let want_metrics = t.metrics().to_vec();

    // The same run stopped after steps 2, 3 and 7; each time a fresh model is loaded from the
    // original files (as a new process would) and the trainer is restored from the files.
    let mut got = Vec::new();
    let mut ck: Option<(CheckpointFiles, Vec<StepMetrics>)> = None;
    for stop_at in [2u64, 3, 7, 9] {
        let m = tiny_model(&dir.path().join(format!("m{stop_at}")), 5);
        let mut t = DpoTrainer::new(&m, pairs.clone(), config()).unwrap();
        if let Some((files, metrics)) = &ck {
            let bytes = std::fs::read(&files.trainer).unwrap();
            t.restore(&files.weights, &bytes, Some(metrics.clone()))
                .unwrap();
        }
        while t.steps_done() < stop_at {
            got.extend(t.step().unwrap().pairs.iter().map(|p| p.index));
        }
        if t.is_done() {
            assert_eq!(m.digest().unwrap(), want_digest);
            assert_eq!(t.metrics(), want_metrics.as_slice());
            break;
        }
        let files = t
            .write_checkpoint(&dir.path().join(format!("ck{stop_at}")))
            .unwrap();
        ck = Some((files, t.metrics().to_vec()));
    }
    assert_eq!(
        got, seen,
        "the resumed run consumed the same pairs in the same order"
    );
    for i in 0..5 {
        assert_eq!(
            seen.iter().filter(|&&j| j == i).count(),
            3,
            "pair {i} once per epoch"
        );
    }
}

#[test]
fn a_lora_trainer_checkpoints_only_the_adapter_and_resumes_exactly() {
    let plain = lora_resume("r=4,alpha=8");
    // With dropout the masks follow the step and micro-batch, so resume is exact too; and
    // they change what is learnt.
    let dropped = lora_resume("r=4,alpha=8,dropout=0.3");
    assert_ne!(plain, dropped, "dropout had no effect");
    assert_eq!(dropped, lora_resume("r=4,alpha=8,dropout=0.3"));
}

/// Trains a new adapter of `spec` through, and again with a checkpoint after 4 steps resumed
/// in a fresh trainer; both must end equal. Returns the trained model's digest.
fn lora_resume(spec: &str) -> String {
    use tsr_model::adapter::LoraSpec;
    let dir = tempfile::tempdir().unwrap();
    let spec: LoraSpec = spec.parse().unwrap();
    let lora_model = |d: &str| {
        tiny_model(&dir.path().join(d), 5)
            .with_new_lora(&spec, 3)
            .unwrap()
    };
    let model = lora_model("m");
    let q0 = |m: &LanguageModel| -> Vec<f32> {
        let vars: std::collections::BTreeMap<String, candle_core::Var> =
            m.vars().into_iter().collect();
        vars["model.layers.0.self_attn.q_proj.weight"]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let base_before = q0(&model);
    let pairs = pairs_for(&model);
    let mut t = DpoTrainer::new(&model, pairs.clone(), config()).unwrap();
    while !t.is_done() {
        t.step().unwrap();
    }
    let want_digest = model.digest().unwrap();
    assert_eq!(
        base_before,
        q0(&model),
        "the adapted base weight stays frozen"
    );
    assert_ne!(
        want_digest,
        tiny_model(&dir.path().join("plain"), 5).digest().unwrap()
    );

    let m = lora_model("m2");
    let mut t = DpoTrainer::new(&m, pairs.clone(), config()).unwrap();
    while t.steps_done() < 4 {
        t.step().unwrap();
    }
    let files = t.write_checkpoint(&dir.path().join("ck")).unwrap();
    let adapter_bytes = std::fs::metadata(&files.weights).unwrap().len();
    let lora_params: usize = m.trainable_vars().iter().map(|(_, v)| v.elem_count()).sum();
    assert!(
        adapter_bytes < (lora_params * 4 + 16 * 1024) as u64,
        "the checkpoint holds the adapter ({adapter_bytes} bytes for {lora_params} parameters), not the model"
    );
    let metrics = t.metrics().to_vec();
    let m3 = lora_model("m3");
    let mut t = DpoTrainer::new(&m3, pairs, config()).unwrap();
    let bytes = std::fs::read(&files.trainer).unwrap();
    t.restore(&files.weights, &bytes, Some(metrics)).unwrap();
    while !t.is_done() {
        t.step().unwrap();
    }
    assert_eq!(m3.digest().unwrap(), want_digest);
    want_digest
}

#[test]
fn self_reference_gives_ln2_at_the_first_step_and_mean_loss_matches_the_next_step() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 5);
    let mut pairs = encode_text_pairs(&model, &text_pairs()).unwrap();
    let cfg = TrainerConfig {
        schedule: LrSchedule::constant(1e-2),
        micro_batch: 2,
        accum_steps: 3,
        shuffle: false,
        epochs: 2,
        ..config()
    };
    DpoTrainer::self_reference(&model, &mut pairs, &cfg).unwrap();
    let mut t = DpoTrainer::new(&model, pairs, cfg).unwrap();
    assert_eq!(t.mean_loss().unwrap(), std::f32::consts::LN_2 as f64);
    let first = t.step().unwrap();
    assert_eq!(first.metrics.loss, std::f32::consts::LN_2 as f64);
    for p in &first.pairs {
        assert_eq!(
            (p.chosen, p.rejected),
            (
                t.pairs()[p.index].ref_chosen,
                t.pairs()[p.index].ref_rejected
            )
        );
    }
    let after = t.mean_loss().unwrap();
    let second = t.step().unwrap();
    assert!(
        (after - second.metrics.loss).abs() < 1e-6,
        "{after} vs {}",
        second.metrics.loss
    );
    assert!(
        after < std::f32::consts::LN_2 as f64,
        "a step lowers the loss: {after}"
    );
}

#[test]
fn a_diverged_step_is_a_clear_error_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 5);
    let pairs = pairs_for(&model);
    let cfg = TrainerConfig {
        schedule: LrSchedule::constant(1e30),
        max_grad_norm: None,
        ..config()
    };
    let mut t = DpoTrainer::new(&model, pairs, cfg).unwrap();
    let mut err = None;
    for _ in 0..4 {
        let before = (model.digest().unwrap(), *t.cursor());
        match t.step() {
            Ok(_) => continue,
            Err(e) => {
                assert_eq!((model.digest().unwrap(), *t.cursor()), before);
                err = Some(e);
                break;
            }
        }
    }
    let err = err.expect("a learning rate of 1e30 diverges");
    assert!(err.is_non_finite(), "{err}");
    assert!(err.to_string().contains("non-finite"), "{err}");
}

#[test]
fn bad_pairs_lines_are_named() {
    let ok = "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n\n";
    assert_eq!(parse_pairs_jsonl(ok).unwrap().len(), 1);
    let bad = format!("{ok}{{\"prompt\": \"a\", \"chosen\": \"b\"}}\n");
    let e = parse_pairs_jsonl(&bad).unwrap_err().to_string();
    assert!(e.starts_with("line 3:"), "{e}");
    assert!(parse_pairs_jsonl("\n").is_err());
    // TRL's conversational rows (what `tsr export RUN pairs` writes) read as the same pair.
    let conv = r#"{"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}], "rejected": [{"role": "assistant", "content": "c"}], "pair_id": "x"}"#;
    assert_eq!(
        parse_pairs_jsonl(conv).unwrap(),
        parse_pairs_jsonl(ok).unwrap()
    );
    let standard = r#"{"prompt": "<|im_start|>user\na<|im_end|>\n", "chosen": "b<|im_end|>", "rejected": "c<|im_end|>", "prompt_text": "a"}"#;
    let e = parse_pairs_jsonl(standard).unwrap_err().to_string();
    assert!(
        e.contains("--format standard") && e.contains("conversational"),
        "{e}"
    );
    let two_turns = r#"{"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}], "chosen": "b", "rejected": "c"}"#;
    let e = parse_pairs_jsonl(two_turns).unwrap_err().to_string();
    assert!(
        e.contains("line 1") && e.contains("\"system\", \"user\"") && e.contains("single-turn"),
        "{e}"
    );
}
