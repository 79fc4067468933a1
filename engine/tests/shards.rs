//! Sharded item steps in one process: a batch runner that computes each batch the way a worker
//! does (`worker::run_shard` into result files, read back and verified) gives the outputs of the
//! local run; a batch delivered twice is committed once; a batch with the wrong number of items,
//! or one never delivered, fails the step; a worker whose step is not the job's refuses it.

mod common;

use common::*;
use std::path::PathBuf;
use std::sync::Arc;
use tsr_engine::shard::{read_batch, BatchRunner, ShardJob};
use tsr_engine::testkit::{shard_step, toy_dag, ToyMap, ToySpec};
use tsr_engine::worker::{FolderSink, ShardPlace};
use tsr_engine::{open_run, Driver, EngineError, Outcome, Step, StepError, StopFlag};
use tsr_state::Store;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Misbehave {
    None,
    /// Every batch delivered twice.
    Twice,
    /// The last batch delivered with one item fewer.
    Short,
    /// The last batch never delivered.
    Lost,
}

/// Computes each batch as a worker does, in this process.
#[derive(Debug)]
struct InProcess {
    work: PathBuf,
    how: Misbehave,
}

impl BatchRunner for InProcess {
    fn run(
        &self,
        job: &ShardJob,
        batches: &[u64],
        stop: &StopFlag,
        deliver: &mut tsr_engine::shard::Deliver<'_>,
    ) -> Result<(), StepError> {
        let step = shard_step(&job.kind, &job.config).expect("a toy kind")?;
        let dir = self.work.join(job.key.to_hex());
        for (n, &b) in batches.iter().enumerate() {
            let last = n + 1 == batches.len();
            let place = ShardPlace {
                sink: Box::new(FolderSink(dir.join("results"))),
                scratch: &dir.join("scratch"),
                tag: "t",
                who: tsr_engine::identity::here("processes", Some(format!("batch {b}")), 7, "cpu"),
            };
            tsr_engine::worker::run_shard(step.as_ref(), job, &[b], place, stop.clone())?;
            let path = dir.join("results").join(format!("{b}.t"));
            let (who, mut items) = read_batch(job, b, &path).map_err(StepError::Other)?;
            match self.how {
                Misbehave::Lost if last => continue,
                Misbehave::Short if last => {
                    items.pop();
                }
                _ => {}
            }
            let again = (items.clone(), who.clone());
            deliver(b, items, who)?;
            if self.how == Misbehave::Twice {
                // The first delivery is committed; this one, and who made it, are ignored.
                let mut other = again.1;
                other.job = Some("a second delivery".into());
                deliver(b, again.0, other)?;
            }
        }
        Ok(())
    }
}

fn spec() -> ToySpec {
    ToySpec {
        iterations: 1,
        items: 10,
        train_steps: 2,
        checkpoint_every: 1,
        work_ms: 0,
        seed: 3,
    }
}

fn run_with(store: &Arc<Store>, how: Misbehave) -> Result<Outcome, EngineError> {
    let dag = Arc::new(toy_dag(&spec()).unwrap());
    open_run(store, &run_spec("r", &spec()), &dag).unwrap();
    let mut opts = quiet(StopFlag::new());
    let runner = InProcess {
        work: store.blobs().tmp_dir().join("shards"),
        how,
    };
    opts.runner = Some((Arc::new(runner), "test".into()));
    Driver::new(store.clone(), dag, "r", opts).run()
}

#[test]
fn batches_computed_as_workers_do_give_the_local_outputs_once_each() {
    let local = tempfile::tempdir().unwrap();
    let local = Arc::new(Store::open(local.path()).unwrap());
    run_toy(&local, "r", &spec());
    let want = outputs(&local, "r");
    for how in [Misbehave::None, Misbehave::Twice] {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        assert!(matches!(
            run_with(&store, how).unwrap(),
            Outcome::Completed { .. }
        ));
        assert_eq!(outputs(&store, "r"), want, "{how:?}");
        assert_computed_by(&store, |w, first, kind| {
            // Only the map step is handed to workers; the others run in the driver.
            if kind != "toy-map" {
                return w.executor == "local";
            }
            w.executor == "processes"
                && w.attempt == 7
                && w.job.as_deref().is_some_and(|j| j.starts_with("batch "))
                && w.job.as_deref() != Some("a second delivery")
                && w.finished_ms > 0
                && w.last >= first
        });
    }
    assert_computed_by(&local, |w, _, _| {
        w.executor == "local" && w.job.is_none() && w.attempt == 1 && w.pid == std::process::id()
    });
}

/// Every item of every item step in `store` has a record of who computed it, and each record
/// passes `ok` (with the first item index of its batch and the step's kind).
fn assert_computed_by(store: &Store, ok: impl Fn(&tsr_state::WorkerRecord, u64, &str) -> bool) {
    let mut seen = 0;
    for (key, rec) in store.steps().unwrap() {
        let Some(total) = rec.items_total.filter(|t| *t > 0) else {
            continue;
        };
        let workers = store.workers(&key).unwrap();
        assert!(!workers.is_empty(), "{}", rec.kind);
        for (first, w) in &workers {
            assert!(ok(w, *first, &rec.kind), "{}: {w:?}", rec.kind);
        }
        for i in 0..total {
            let w = store.worker_of(&key, i).unwrap();
            assert!(w.is_some(), "{} item {i} has no worker", rec.kind);
        }
        assert!(store.worker_of(&key, total).unwrap().is_none());
        seen += 1;
    }
    assert!(seen > 0, "no item steps");
}

#[test]
fn a_short_or_missing_batch_fails_the_step() {
    for (how, want) in [
        (Misbehave::Short, "came back with 0 items, not 1"),
        (Misbehave::Lost, "the workers finished without batch 3"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let e = run_with(&store, how).unwrap_err();
        let chain = tsr_state::error_chain(&e);
        assert!(chain.contains(want), "{how:?}: {chain}");
    }
}

#[test]
fn a_worker_refuses_a_job_that_is_not_its_step() {
    let dir = tempfile::tempdir().unwrap();
    let step = ToyMap::new("a", 0);
    let job = ShardJob {
        node: "iter1/map".into(),
        key: tsr_state::Digest::of(b"another step"),
        kind: step.kind().into(),
        version: step.version(),
        config: step.config(),
        inputs: Default::default(),
        externals: Default::default(),
        external_blobs: Default::default(),
        blobs: dir.path().join("blobs"),
        device: "cpu".into(),
        total: 3,
        batch: 3,
        build: "b".into(),
    };
    let place = ShardPlace {
        sink: Box::new(FolderSink(dir.path().join("out"))),
        scratch: &dir.path().join("scratch"),
        tag: "t",
        who: tsr_engine::identity::here("processes", None, 0, "cpu"),
    };
    let e = tsr_engine::worker::run_shard(&step, &job, &[0], place, StopFlag::new()).unwrap_err();
    assert!(e.to_string().contains("not the job's"), "{e}");
}
