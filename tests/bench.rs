//! `tsr bench` on the tiny model: both measurements print their RESULT lines, and
//! what cannot run on this binary or device is a clear error with exit code 1, never a panic.

mod common;

use common::*;

#[test]
fn bench_prints_results_and_refuses_what_it_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = tsr_model::testing::write_tiny_hf_model(&dir.path().join("tiny"), 5);
    let m = model.to_str().unwrap();
    let store = dir.path().join("store");
    let o = tsr(
        &[
            "bench",
            "--model",
            m,
            "--dpo-batch",
            "1,2",
            "--steps",
            "1",
            "--prompt-tokens",
            "8",
            "--response-tokens",
            "6",
            "--gen-batch",
            "3",
            "--gen-prompt-tokens",
            "12",
            "--gen-new-tokens",
            "5",
            "--peak-tflops",
            "1",
        ],
        &store,
    );
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    for want in [
        "RESULT dpo batch 1:",
        "RESULT dpo batch 2:",
        "RESULT generate batch 3:",
        "MFU ",
        "few-row kernel alone over a decode step's 538 MB of weights: 1 row",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    assert!(!store.exists(), "bench must not create a store");
    // The bench's default is a new run's: the fused prompt attention.
    assert!(out.contains("prompt attention Fused)"), "{out}");

    // Generation with the batched prompt attention, as a run's `prompt_attention = "batched"`.
    let o = tsr(
        &[
            "bench",
            "--model",
            m,
            "--only",
            "generate",
            "--gen-batch",
            "3",
            "--gen-prompt-tokens",
            "20",
            "--gen-new-tokens",
            "4",
            "--gen-attention",
            "batched",
        ],
        &store,
    );
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("RESULT generate batch 3:") && out.contains("prompt attention Batched)"),
        "{out}"
    );

    // A logprob judge's forward, both ways.
    for (how, shown) in [("batched", "Batched"), ("fused", "Fused")] {
        let o = tsr(
            &[
                "bench",
                "--model",
                m,
                "--only",
                "judge",
                "--gen-batch",
                "2",
                "--gen-prompt-tokens",
                "300",
                "--gen-attention",
                how,
            ],
            &store,
        );
        let out = text(&o);
        assert!(o.status.success(), "{out}");
        assert!(
            out.contains("RESULT judge batch 2:")
                && out.contains("judge prompts of ")
                && out.contains(&format!("prompt attention {shown})"))
                && !out.contains("RESULT generate")
                && !out.contains("RESULT dpo"),
            "{out}"
        );
    }

    // A generation step's workload, one batch at a time against continuous batching; a
    // prompts file that is missing or holds no prompt is named.
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"id\": \"a\", \"prompt\": \"hello\"}\n{\"id\": \"b\", \"prompt\": \"name two colours\"}\n",
    )
    .unwrap();
    let workload = |file: &std::path::Path| {
        tsr(
            &[
                "bench",
                "--model",
                m,
                "--only",
                "generate",
                "--gen-prompts",
                file.to_str().unwrap(),
                "--gen-samples",
                "3",
                "--gen-batch",
                "2",
                "--gen-new-tokens",
                "4",
                "--rounds",
                "1",
            ],
            &store,
        )
    };
    let o = workload(&prompts);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    for want in [
        "2 prompts x 3 samples = 6 requests, batch 2",
        "round 0, one batch at a time:",
        "round 0, continuous:",
        "RESULT generate workload: one batch at a time",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    let missing = dir.path().join("none.jsonl");
    let o = workload(&missing);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("none.jsonl"), "{}", text(&o));
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let o = workload(&empty);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("empty.jsonl") || text(&o).contains("at least one prompt"),
        "{}",
        text(&o)
    );

    let o = tsr(&["bench", "--model", m, "--dtype", "bf16"], &store);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("--dtype bf16 needs --device cuda:N"),
        "{}",
        text(&o)
    );

    // Without the cuda feature: the message says how to get a CUDA build. (With it, on a
    // machine without a driver, the error names the library; checked by hand, see README.)
    if !cfg!(feature = "cuda") {
        let o = tsr(&["bench", "--model", m, "--device", "cuda:0"], &store);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(
            text(&o).contains("built without CUDA; build with scripts/build-cuda.sh"),
            "{}",
            text(&o)
        );
    }
}
