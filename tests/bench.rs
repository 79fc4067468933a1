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
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    assert!(!store.exists(), "bench must not create a store");

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
