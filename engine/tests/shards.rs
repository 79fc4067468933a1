//! Sharded item steps in one process: a batch runner that computes each batch the way a worker
//! does (`worker::run_shard` into result files, read back and verified) gives the outputs of the
//! local run; a batch delivered twice is committed once; a batch with the wrong number of items,
//! or one never delivered, fails the step; a worker whose step is not the job's refuses it.

mod common;

use common::*;
use std::path::PathBuf;
use std::sync::Arc;
use tsr_engine::exchange::StepExchange;
use tsr_engine::job::{FolderFiles, JobFiles, JobPlace};
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
    /// The training step's first worker stopped after its first checkpoint, a second one
    /// continuing from the last.
    StopAfterCheckpoint,
}

/// Computes each batch as a worker does, in this process.
#[derive(Debug)]
struct InProcess {
    work: PathBuf,
    how: Misbehave,
    /// What the exchange said.
    said: std::sync::Mutex<Vec<String>>,
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
        if job.whole {
            return self.run_whole(step.as_ref(), job, stop, deliver);
        }
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

impl InProcess {
    /// A whole step as the executors run it: its worker into the job's folder, the driver's
    /// side through the step's exchange. With `how = StopAfterCheckpoint`, the first worker is
    /// stopped once it has recorded its first checkpoint, and a second one continues.
    fn run_whole(
        &self,
        step: &dyn Step,
        job: &ShardJob,
        stop: &StopFlag,
        deliver: &mut tsr_engine::shard::Deliver<'_>,
    ) -> Result<(), StepError> {
        let said = &self.said;
        let say = |m: String| said.lock().unwrap().push(m);
        let mut x = StepExchange::open(&self.work, None, job, stop, &say)?;
        let attempts = if self.how == Misbehave::StopAfterCheckpoint {
            2
        } else {
            1
        };
        for attempt in 0..attempts {
            let worker_stop = StopFlag::new();
            let files = FolderFiles::open(&x.dir)?;
            let files: Box<dyn JobFiles> = if attempt + 1 < attempts {
                Box::new(StopAfterFirst(files, worker_stop.clone()))
            } else {
                Box::new(files)
            };
            let place = JobPlace {
                sink: Box::new(FolderSink(x.dir.join("results"))),
                files,
                scratch: &x.dir.join("scratch"),
                tag: &format!("0-{attempt}"),
                who: tsr_engine::identity::here(
                    "processes",
                    Some("job".into()),
                    attempt as u32,
                    "cpu",
                ),
            };
            match tsr_engine::job::run_job(step, job, place, worker_stop) {
                Err(StepError::Interrupted) if attempt + 1 < attempts => {}
                r => r?,
            }
        }
        let mut pending = std::collections::BTreeSet::from([0]);
        x.collect(job, &mut pending, deliver, &say)?;
        assert!(pending.is_empty(), "the job's result was not delivered");
        x.finish(job, &say);
        Ok(())
    }
}

/// A job's files that stop the worker once it has recorded its first checkpoint.
struct StopAfterFirst(FolderFiles, StopFlag);

impl JobFiles for StopAfterFirst {
    fn checkpoint(&self) -> Result<Option<tsr_engine::job::SavedCheckpoint>, StepError> {
        self.0.checkpoint()
    }
    fn put_checkpoint_file(
        &self,
        d: &tsr_state::Digest,
        p: &std::path::Path,
    ) -> Result<(), StepError> {
        self.0.put_checkpoint_file(d, p)
    }
    fn take_checkpoint_file(
        &self,
        d: &tsr_state::Digest,
        b: &tsr_state::BlobStore,
    ) -> Result<PathBuf, StepError> {
        self.0.take_checkpoint_file(d, b)
    }
    fn record_checkpoint(&self, cp: &tsr_engine::job::SavedCheckpoint) -> Result<(), StepError> {
        self.0.record_checkpoint(cp)?;
        self.1.set();
        Ok(())
    }
    fn drop_checkpoint_file(&self, d: &tsr_state::Digest) -> Result<(), StepError> {
        self.0.drop_checkpoint_file(d)
    }
    fn put_output(&self, d: &tsr_state::Digest, p: &std::path::Path) -> Result<(), StepError> {
        self.0.put_output(d, p)
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
    let runner = Arc::new(InProcess {
        work: store.blobs().tmp_dir().join("shards"),
        how,
        said: Default::default(),
    });
    opts.runner = Some((runner.clone(), "test".into()));
    let out = Driver::new(store.clone(), dag, "r", opts).run();
    SAID.lock()
        .unwrap()
        .extend(runner.said.lock().unwrap().drain(..));
    out
}

/// What the runners' exchanges said, over the test.
static SAID: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

#[test]
fn batches_computed_as_workers_do_give_the_local_outputs_once_each() {
    let local = tempfile::tempdir().unwrap();
    let local = Arc::new(Store::open(local.path()).unwrap());
    run_toy(&local, "r", &spec());
    let want = outputs(&local, "r");
    for how in [
        Misbehave::None,
        Misbehave::Twice,
        Misbehave::StopAfterCheckpoint,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        assert!(matches!(
            run_with(&store, how).unwrap(),
            Outcome::Completed { .. }
        ));
        assert_eq!(outputs(&store, "r"), want, "{how:?}");
        assert_computed_by(&store, |w, first, kind| {
            // The map step's batches and the training step go to workers; the others run in
            // the driver.
            if kind == "toy-train" {
                return w.executor == "processes" && w.job.as_deref() == Some("job");
            }
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
        // Who ran each training step is kept, as for a batch.
        let mut trained = 0;
        for (key, rec) in store.steps().unwrap() {
            if rec.kind == "toy-train" {
                let w = store.workers(&key).unwrap();
                assert_eq!(w.len(), 1, "{w:?}");
                assert_eq!((w[0].0, w[0].1.job.as_deref()), (0, Some("job")), "{w:?}");
                trained += 1;
            }
        }
        assert_eq!(trained, 1);
        let said = std::mem::take(&mut *SAID.lock().unwrap()).join("\n");
        let want_line = match how {
            Misbehave::StopAfterCheckpoint => {
                "continued from checkpoint 1 (saved by 0-0), saved 0 more"
            }
            _ => "ran from the start, saved 1 checkpoint(s)",
        };
        assert!(
            said.contains("iter1/train: ran as one job by worker process")
                && said.contains(want_line),
            "{how:?}: {said}"
        );
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
        whole: false,
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
