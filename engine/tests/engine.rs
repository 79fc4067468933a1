//! In-process engine tests: reuse across runs, definition-change refusal, replay (match and a
//! planted mismatch), corruption detected by verify and on read, cycles, changed input files.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::sync::Arc;
use tsr_engine::testkit::{toy_dag, ToyMap, ToySource, ToySpec};
use tsr_engine::{
    open_run, replay, DagBuilder, Driver, EngineError, InputSource, Outcome, StopFlag,
};
use tsr_state::{Commit, Digest, StepStatus, Store};

fn small() -> ToySpec {
    ToySpec {
        iterations: 2,
        items: 10,
        train_steps: 6,
        checkpoint_every: 2,
        work_ms: 0,
        seed: 3,
    }
}

#[test]
fn anchor_runs_once_and_rerun_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let Outcome::Completed { executed, reused } = run_toy(&store, "a", &small()) else {
        panic!()
    };
    // 1 source + 2 maps + 1 anchor + 2 trains + report; iter2/anchor reuses iter1/anchor.
    assert_eq!(executed.len(), 7, "{executed:?}");
    assert_eq!(reused, vec!["iter2/anchor".to_string()]);
    let nodes: BTreeMap<_, _> = store.nodes("a").unwrap().into_iter().collect();
    assert!(nodes["iter2/anchor"].reused);
    assert_eq!(
        nodes["iter1/anchor"].step_key,
        nodes["iter2/anchor"].step_key
    );
    // The same command again does nothing.
    let again = run_toy(&store, "a", &small());
    assert_eq!(
        again,
        Outcome::Completed {
            executed: vec![],
            reused: vec![]
        }
    );
}

#[test]
fn changed_definition_is_refused_naming_the_fields() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    run_toy(&store, "a", &small());
    let mut edited = small();
    edited.train_steps = 8;
    let dag = toy_dag(&edited).unwrap();
    let err = open_run(&store, &run_spec("a", &edited), &dag).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, EngineError::DefinitionChanged { .. }),
        "{msg}"
    );
    assert!(msg.contains("toy.train_steps: 6 -> 8"), "{msg}");
    assert!(
        msg.contains("tsr fork a --name NEW --set toy.train_steps=8"),
        "{msg}"
    );
}

#[test]
fn a_new_run_reuses_every_unchanged_step() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    run_toy(&store, "a", &small());
    let mut edited = small();
    edited.train_steps = 8;
    let Outcome::Completed { executed, reused } = run_toy(&store, "b", &edited) else {
        panic!()
    };
    // Only what depends on training is recomputed.
    assert_eq!(
        executed,
        vec!["iter1/train", "iter2/map", "iter2/train", "report"]
    );
    assert_eq!(reused.len(), 4, "{reused:?}"); // source, iter1/map, iter1/anchor, iter2/anchor
}

#[test]
fn replay_matches_and_detects_a_planted_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let spec = small();
    run_toy(&store, "a", &spec);
    let dag = toy_dag(&spec).unwrap();
    let nodes: Vec<String> = dag.nodes().iter().map(|n| n.name.clone()).collect();
    let reports = replay(&store, &dag, "a", &nodes, "cpu", StopFlag::new()).unwrap();
    assert_eq!(reports.len(), nodes.len());
    for r in &reports {
        assert!(r.identical, "{r:?}");
    }
    // Plant: pretend the recorded output of iter1/train was something else.
    let key = store
        .get_node("a", "iter1/train")
        .unwrap()
        .unwrap()
        .step_key;
    let mut rec = store.get_step(&key).unwrap().unwrap();
    let fake = store.blobs().put_bytes(b"not what the step makes").unwrap();
    if let StepStatus::Done { outputs, .. } = &mut rec.status {
        outputs.insert("model".into(), fake);
    }
    let mut c = Commit::new();
    c.step(&key, &rec);
    store.commit(c).unwrap();
    let r = replay(
        &store,
        &dag,
        "a",
        &["iter1/train".into()],
        "cpu",
        StopFlag::new(),
    )
    .unwrap();
    assert!(!r[0].identical);
    assert_eq!(r[0].outputs[0].recorded, fake.to_hex());
}

#[test]
fn corrupt_blob_is_detected_by_verify_and_on_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    run_toy(&store, "a", &small());
    assert!(tsr_state::verify(&store).unwrap().ok());
    let key = store.get_node("a", "source").unwrap().unwrap().step_key;
    let StepStatus::Done { outputs, .. } = store.get_step(&key).unwrap().unwrap().status else {
        panic!()
    };
    let d = outputs["data"];
    let path = store.blobs().path(&d);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let report = tsr_state::verify(&store).unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert_eq!(report.problems[0].kind, "blob-corrupt");
    assert_eq!(report.problems[0].steps, vec![key.to_hex()]);
    let err = store.blobs().read(&d).unwrap_err().to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");
    // Deleted blob: missing.
    std::fs::remove_file(&path).unwrap();
    assert_eq!(
        tsr_state::verify(&store).unwrap().problems[0].kind,
        "blob-missing"
    );
}

#[test]
fn cycle_is_rejected_with_the_cycle_named() {
    let mut b = DagBuilder::new();
    b.add(
        "a",
        Arc::new(ToyMap::new("a", 0)),
        vec![("data", InputSource::node("c", "data"))],
        None,
    );
    b.add(
        "b",
        Arc::new(ToyMap::new("b", 0)),
        vec![("data", InputSource::node("a", "data"))],
        None,
    );
    b.add(
        "c",
        Arc::new(ToyMap::new("c", 0)),
        vec![("data", InputSource::node("b", "data"))],
        None,
    );
    b.add("d", Arc::new(ToySource::new(1, 0, 0)), vec![], None);
    let Err(err) = b.build() else {
        panic!("a cycle was accepted")
    };
    assert_eq!(
        err.to_string(),
        "the workflow graph has a cycle: a -> b -> c -> a"
    );

    let mut b = DagBuilder::new();
    b.add(
        "a",
        Arc::new(ToyMap::new("a", 0)),
        vec![("data", InputSource::node("zz", "data"))],
        None,
    );
    assert!(matches!(b.build(), Err(EngineError::UnknownNode { .. })));
    let mut b = DagBuilder::new();
    b.add("s", Arc::new(ToySource::new(1, 0, 0)), vec![], None);
    b.add(
        "a",
        Arc::new(ToyMap::new("a", 0)),
        vec![("data", InputSource::node("s", "nope"))],
        None,
    );
    let Err(err) = b.build() else { panic!() };
    assert!(err.to_string().contains("wants output `nope`"), "{err}");
}

#[test]
fn edited_external_input_is_refused_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("store")).unwrap());
    let input = dir.path().join("lines.txt");
    std::fs::write(&input, "a\nb\nc\n").unwrap();
    let build = || {
        let mut b = DagBuilder::new();
        b.add(
            "m",
            Arc::new(ToyMap::new("x", 0)),
            vec![("data", InputSource::External(input.clone()))],
            None,
        );
        Arc::new(b.build().unwrap())
    };
    let spec = run_spec("ext", &small());
    let dag = build();
    open_run(&store, &spec, &dag).unwrap();
    Driver::new(store.clone(), dag, "ext", quiet(StopFlag::new()))
        .run()
        .unwrap();
    std::fs::write(&input, "a\nb\nd\n").unwrap();
    let err = open_run(&store, &spec, &build()).unwrap_err();
    assert!(matches!(err, EngineError::InputChanged { .. }), "{err}");
    assert!(err.to_string().contains("edited"), "{err}");
}

#[test]
fn a_new_or_dropped_input_file_is_another_definition() {
    // Path settings are left out of a run's definition (so a moved checkout continues), but
    // giving one that adds an input file changes the DAG: refused, not stalled.
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("store")).unwrap());
    let input = dir.path().join("lines.txt");
    std::fs::write(&input, "a\nb\n").unwrap();
    let build = |extra: bool| {
        let mut b = DagBuilder::new();
        b.add(
            "m",
            Arc::new(ToyMap::new("x", 0)),
            vec![("data", InputSource::External(input.clone()))],
            None,
        );
        if extra {
            b.add(
                "n",
                Arc::new(ToyMap::new("y", 0)),
                vec![("data", InputSource::External(input.clone()))],
                None,
            );
        }
        Arc::new(b.build().unwrap())
    };
    let spec = run_spec("ext", &small());
    open_run(&store, &spec, &build(false)).unwrap();
    let err = open_run(&store, &spec, &build(true)).unwrap_err();
    assert!(
        matches!(err, EngineError::DefinitionChanged { .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("new input file `data` of node `n`"),
        "{err}"
    );
    open_run(&store, &run_spec("ext2", &small()), &build(true)).unwrap();
    let err = open_run(&store, &run_spec("ext2", &small()), &build(false)).unwrap_err();
    assert!(
        err.to_string()
            .contains("no more input file `data` of node `n`"),
        "{err}"
    );
    open_run(&store, &spec, &build(false)).unwrap();
}

#[test]
fn failing_step_is_recorded_and_retried_on_the_next_run() {
    use tsr_engine::{Step, StepContext, StepError, StepInputs, StepOutputs};
    struct Flaky(std::path::PathBuf);
    impl Step for Flaky {
        fn kind(&self) -> &'static str {
            "flaky"
        }
        fn version(&self) -> u32 {
            1
        }
        fn config(&self) -> serde_json::Value {
            serde_json::json!({})
        }
        fn outputs(&self) -> Vec<&'static str> {
            vec!["out"]
        }
        fn run(&self, _: &StepInputs, _: &StepContext) -> Result<StepOutputs, StepError> {
            if !self.0.exists() {
                return Err(StepError::Invalid("the marker file is missing".into()));
            }
            Ok(StepOutputs::new().bytes("out", "text", b"ok".to_vec()))
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("s")).unwrap());
    let marker = dir.path().join("marker");
    let mut b = DagBuilder::new();
    b.add("f", Arc::new(Flaky(marker.clone())), vec![], None);
    let dag = Arc::new(b.build().unwrap());
    let spec = run_spec("f", &small());
    open_run(&store, &spec, &dag).unwrap();
    let err = Driver::new(store.clone(), dag.clone(), "f", quiet(StopFlag::new()))
        .run()
        .unwrap_err();
    // The step's own message is the cause of the engine's "step failed", said once.
    let chain = tsr_state::error_chain(&err);
    assert_eq!(
        chain.matches("the marker file is missing").count(),
        1,
        "{chain}"
    );
    assert!(
        chain.starts_with("step `f` (kind flaky, attempt 1) failed: "),
        "{chain}"
    );
    let key = store.get_node("f", "f").unwrap().unwrap().step_key;
    assert!(matches!(
        store.get_step(&key).unwrap().unwrap().status,
        StepStatus::Failed { attempt: 1, .. }
    ));
    std::fs::write(&marker, "").unwrap();
    Driver::new(store.clone(), dag, "f", quiet(StopFlag::new()))
        .run()
        .unwrap();
    let rec = store.get_step(&key).unwrap().unwrap();
    assert_eq!(rec.attempts, 2);
    let StepStatus::Done { outputs, .. } = rec.status else {
        panic!()
    };
    assert_eq!(outputs["out"], Digest::of(b"ok"));
    // Lineage: the output's producer is recorded.
    assert_eq!(
        store
            .get_artifact(&outputs["out"])
            .unwrap()
            .unwrap()
            .producer,
        Some(key)
    );
}

#[test]
fn a_step_defined_differently_by_a_newer_tsr_is_named_not_blamed_on_input_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let build = |label: &str| {
        let mut b = DagBuilder::new();
        b.add("src", Arc::new(ToySource::new(3, 0, 1)), vec![], None);
        b.add(
            "m",
            Arc::new(ToyMap::new(label, 0)),
            vec![("data", InputSource::node("src", "data"))],
            None,
        );
        Arc::new(b.build().unwrap())
    };
    let spec = run_spec("v", &small());
    let dag = build("old");
    open_run(&store, &spec, &dag).unwrap();
    Driver::new(store.clone(), dag, "v", quiet(StopFlag::new()))
        .run()
        .unwrap();
    // Same run definition, but the code now configures the step differently.
    let dag = build("new");
    open_run(&store, &spec, &dag).unwrap();
    let err = Driver::new(store.clone(), dag, "v", quiet(StopFlag::new()))
        .run()
        .unwrap_err();
    assert!(
        matches!(err, EngineError::StepDefinitionChanged { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("\"label\":\"old\"") && msg.contains("\"label\":\"new\""),
        "{msg}"
    );
    assert!(msg.contains("tsr fork v --name NEW"), "{msg}");
}
