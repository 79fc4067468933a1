//! Shared helpers for the engine's integration tests: run the toy workflow in this process or
//! in a child process (this same test binary re-executed with `TSR_CHILD_STORE` set).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use tsr_engine::testkit::{toy_dag, ToySpec};
use tsr_engine::{open_run, Driver, DriverOptions, Outcome, RunSpec, StopFlag};
use tsr_state::{StepStatus, Store};

pub fn spec_def(spec: &ToySpec) -> BTreeMap<String, String> {
    let v = serde_json::to_value(spec).unwrap();
    v.as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (format!("toy.{k}"), v.to_string()))
        .collect()
}

pub fn run_spec(name: &str, spec: &ToySpec) -> RunSpec {
    RunSpec {
        name: name.to_string(),
        workflow: "toy".into(),
        config_toml: String::new(),
        definition: spec_def(spec),
        forked_from: None,
    }
}

pub fn quiet(stop: StopFlag) -> DriverOptions {
    DriverOptions {
        stop,
        progress: false,
        log: false,
        ..DriverOptions::default()
    }
}

/// Run (or resume) the toy workflow in this process.
pub fn run_toy(store: &Arc<Store>, name: &str, spec: &ToySpec) -> Outcome {
    let dag = Arc::new(toy_dag(spec).unwrap());
    open_run(store, &run_spec(name, spec), &dag).unwrap();
    Driver::new(store.clone(), dag, name, quiet(StopFlag::new()))
        .run()
        .unwrap()
}

/// Node -> (output name -> digest hex) of a finished run, plus item counts per node.
pub fn outputs(store: &Store, run: &str) -> BTreeMap<String, (BTreeMap<String, String>, u64)> {
    let mut out = BTreeMap::new();
    for (node, rec) in store.nodes(run).unwrap() {
        let step = store.get_step(&rec.step_key).unwrap().unwrap();
        let StepStatus::Done { outputs, .. } = step.status else {
            panic!("node {node} is not done: {:?}", step.status)
        };
        let items = store.item_indices(&rec.step_key).unwrap().len() as u64;
        out.insert(
            node,
            (
                outputs.into_iter().map(|(k, d)| (k, d.to_hex())).collect(),
                items,
            ),
        );
    }
    out
}

pub fn crash_spec() -> ToySpec {
    ToySpec {
        iterations: 3,
        items: 32,
        train_steps: 30,
        checkpoint_every: 4,
        work_ms: 6,
        seed: 7,
    }
}

/// The child side: when `TSR_CHILD_STORE` is set, run the crash spec and exit with the run's
/// code (0 done, 75 interrupted, 1 error).
pub fn child_main() {
    let Some(dir) = std::env::var_os("TSR_CHILD_STORE") else {
        return;
    };
    let code = (|| -> Result<i32, String> {
        let store = Arc::new(Store::open(Path::new(&dir)).map_err(|e| e.to_string())?);
        let spec = crash_spec();
        let dag = Arc::new(toy_dag(&spec).map_err(|e| e.to_string())?);
        open_run(&store, &run_spec("crash", &spec), &dag).map_err(|e| e.to_string())?;
        let stop = StopFlag::new();
        tsr_engine::preempt::install(stop.clone(), String::new())?;
        match Driver::new(store, dag, "crash", quiet(stop)).run() {
            Ok(Outcome::Completed { .. }) => Ok(0),
            Ok(Outcome::Interrupted) => Ok(tsr_engine::EXIT_INTERRUPTED),
            Ok(Outcome::Limited(why)) => Err(why),
            Err(e) => Err(e.to_string()),
        }
    })()
    .unwrap_or_else(|e| {
        eprintln!("child error: {e}");
        1
    });
    std::process::exit(code);
}

pub fn spawn_child(store: &Path, log: &Path, test_name: &str) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env("TSR_CHILD_STORE", store)
        .env("TSR_TOY_LOG", log)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}
