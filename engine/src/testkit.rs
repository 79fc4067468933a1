//! Toy steps and a toy workflow with the shape of a temporal iteration (a shared anchor step,
//! item-journaled steps, a checkpointed "training" step), deterministic and free of any model.
//! Used by the engine's own tests (crash, SIGTERM, replay, fork) and by `workflow = "toy"`.
//!
//! If the environment variable `TSR_TOY_LOG` names a file, every unit computed (before its
//! commit) appends a line `kind node unit` to it, so tests can count executions.

use crate::context::StepContext;
use crate::dag::{Dag, DagBuilder, InputSource};
use crate::error::{EngineError, StepError};
use crate::output::OutputData;
use crate::step::{Resource, Step, StepInputs, StepOutputs};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

fn log_unit(kind: &str, ctx: &StepContext, unit: u64) {
    if let Some(path) = std::env::var_os("TSR_TOY_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            // One write per line (O_APPEND): a kill never leaves half a line.
            let line = format!("{kind} {} {unit}\n", ctx.node());
            let _ = f.write_all(line.as_bytes());
        }
    }
}

fn work(ms: u64) {
    if ms > 0 {
        std::thread::sleep(Duration::from_millis(ms));
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Makes `items` lines, each a digest of the item seed. Journals items in batches of 4.
#[derive(Serialize)]
pub struct ToySource {
    items: u64,
    #[serde(skip)]
    work_ms: u64,
    seed: u64,
}

impl ToySource {
    pub fn new(items: u64, work_ms: u64, seed: u64) -> Self {
        ToySource {
            items,
            work_ms,
            seed,
        }
    }
}

impl Step for ToySource {
    fn kind(&self) -> &'static str {
        "toy-source"
    }
    fn version(&self) -> u32 {
        1
    }
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap()
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["data"]
    }
    fn resources(&self) -> Vec<Resource> {
        vec![]
    }
    fn run(&self, _inputs: &StepInputs, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        ctx.for_each_batch(self.items, 4, |idx| {
            Ok(idx
                .iter()
                .map(|&i| {
                    work(self.work_ms);
                    log_unit(self.kind(), ctx, i);
                    hex(blake3::hash(&ctx.derive_seed("item", i).to_le_bytes()).as_bytes())
                        .into_bytes()
                })
                .collect())
        })?;
        let lines: Vec<String> = ctx
            .items()
            .all()?
            .into_iter()
            .map(|(_, b)| String::from_utf8(b).expect("toy items are UTF-8"))
            .collect();
        Ok(StepOutputs::new().bytes("data", "lines", lines.join("\n").into_bytes()))
    }
}

/// Maps each input line (one item per line) through a labelled hash, optionally mixed with a
/// `model` input.
#[derive(Serialize, Deserialize)]
pub struct ToyMap {
    label: String,
    #[serde(skip)]
    work_ms: u64,
}

impl ToyMap {
    pub fn new(label: &str, work_ms: u64) -> Self {
        ToyMap {
            label: label.to_string(),
            work_ms,
        }
    }
}

impl Step for ToyMap {
    fn kind(&self) -> &'static str {
        "toy-map"
    }
    fn version(&self) -> u32 {
        1
    }
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap()
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["data"]
    }
    fn resources(&self) -> Vec<Resource> {
        vec![Resource::Compute]
    }
    fn run(&self, inputs: &StepInputs, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        self.compute(inputs, ctx)?;
        let out: Vec<String> = ctx
            .items()
            .all()?
            .into_iter()
            .map(|(_, b)| String::from_utf8(b).expect("toy items are UTF-8"))
            .collect();
        Ok(StepOutputs::new().bytes("data", "lines", out.join("\n").into_bytes()))
    }
    fn shardable(&self) -> bool {
        true
    }
    fn shard(&self, inputs: &StepInputs, ctx: &StepContext) -> Result<(), StepError> {
        self.compute(inputs, ctx)
    }
}

impl ToyMap {
    /// One item per line, three per batch.
    fn compute(&self, inputs: &StepInputs, ctx: &StepContext) -> Result<(), StepError> {
        let data = String::from_utf8(inputs.bytes("data")?)
            .map_err(|_| StepError::Invalid("toy data is not UTF-8".into()))?;
        let lines: Vec<&str> = data.lines().collect();
        let model = if inputs.has("model") {
            inputs.bytes("model")?
        } else {
            vec![]
        };
        ctx.for_each_batch(lines.len() as u64, 3, |idx| {
            Ok(idx
                .iter()
                .map(|&i| {
                    work(self.work_ms);
                    log_unit(self.kind(), ctx, i);
                    let mut h = blake3::Hasher::new();
                    h.update(self.label.as_bytes());
                    h.update(lines[i as usize].as_bytes());
                    h.update(&model);
                    hex(h.finalize().as_bytes()).into_bytes()
                })
                .collect())
        })
    }
}

/// The toy steps a shard worker can compute, made back from a job's kind and config.
pub fn shard_step(
    kind: &str,
    config: &serde_json::Value,
) -> Option<Result<Arc<dyn Step>, StepError>> {
    let bad =
        |e: serde_json::Error| StepError::Invalid(format!("the shard job's `{kind}` config: {e}"));
    match kind {
        "toy-map" => Some(
            serde_json::from_value::<ToyMap>(config.clone())
                .map(|s| Arc::new(s) as Arc<dyn Step>)
                .map_err(bad),
        ),
        "toy-train" => Some(
            serde_json::from_value::<ToyTrain>(config.clone())
                .map(|s| Arc::new(s) as Arc<dyn Step>)
                .map_err(bad),
        ),
        _ => None,
    }
}

#[derive(Serialize, Deserialize)]
struct TrainCursor {
    step: u64,
}

/// A stand-in for DPO: `steps` sequential updates of a 64 KiB state, checkpointed every
/// `checkpoint_every` steps and at a stop request; resumes from the last checkpoint. Another
/// executor runs it as one job.
#[derive(Serialize, Deserialize)]
pub struct ToyTrain {
    steps: u64,
    checkpoint_every: u64,
    #[serde(skip)]
    work_ms: u64,
}

impl ToyTrain {
    pub fn new(steps: u64, checkpoint_every: u64, work_ms: u64) -> Self {
        ToyTrain {
            steps,
            checkpoint_every: checkpoint_every.max(1),
            work_ms,
        }
    }
}

impl Step for ToyTrain {
    fn kind(&self) -> &'static str {
        "toy-train"
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
        vec!["model"]
    }
    fn run(&self, inputs: &StepInputs, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let (mut state, mut step) = match ctx.items().load_checkpoint()? {
            Some(cp) => {
                let cursor: TrainCursor = serde_json::from_slice(&cp.cursor)
                    .map_err(|e| StepError::Invalid(format!("toy checkpoint cursor: {e}")))?;
                let path = &cp.files["state"];
                let state = std::fs::read(path)
                    .map_err(|e| StepError::io(format!("reading {}", path.display()), e))?;
                (state, cursor.step)
            }
            None => {
                let mut h = blake3::Hasher::new();
                for name in inputs.names().map(String::from).collect::<Vec<_>>() {
                    h.update(&inputs.bytes(&name)?);
                }
                let mut xof = h.finalize_xof();
                let mut state = vec![0u8; 64 * 1024];
                xof.fill(&mut state);
                (state, 0)
            }
        };
        ctx.progress().set_length(self.steps);
        ctx.progress().set_position(step);
        let save = |state: &[u8], step: u64| -> Result<(), StepError> {
            let mut files = BTreeMap::new();
            files.insert("state".to_string(), OutputData::Bytes(state.to_vec()));
            let cursor = serde_json::to_vec(&TrainCursor { step }).unwrap();
            ctx.items().save_checkpoint(files, cursor)
        };
        while step < self.steps {
            if ctx.should_stop() {
                save(&state, step)?;
                return Err(StepError::Interrupted);
            }
            work(self.work_ms);
            log_unit(self.kind(), ctx, step);
            let mut h = blake3::Hasher::new();
            h.update(&state);
            h.update(&step.to_le_bytes());
            let mut xof = h.finalize_xof();
            xof.fill(&mut state);
            step += 1;
            ctx.progress().inc(1);
            if step % self.checkpoint_every == 0 && step < self.steps {
                save(&state, step)?;
            }
        }
        let out = ctx.scratch().join("model.bin");
        std::fs::write(&out, &state)
            .map_err(|e| StepError::io(format!("writing {}", out.display()), e))?;
        Ok(StepOutputs::new().file("model", "toy-model", &out))
    }
}

/// Summarises its inputs' digests.
#[derive(Serialize)]
pub struct ToyReport;

impl Step for ToyReport {
    fn kind(&self) -> &'static str {
        "toy-report"
    }
    fn version(&self) -> u32 {
        1
    }
    fn config(&self) -> serde_json::Value {
        serde_json::json!({})
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["summary"]
    }
    fn resources(&self) -> Vec<Resource> {
        vec![]
    }
    fn run(&self, inputs: &StepInputs, _ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let mut m = BTreeMap::new();
        for name in inputs.names() {
            m.insert(name.to_string(), inputs.digest(name)?.to_hex());
        }
        Ok(StepOutputs::new().json("summary", &m))
    }
}

/// Shape of the toy workflow.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ToySpec {
    pub iterations: u32,
    pub items: u64,
    pub train_steps: u64,
    pub checkpoint_every: u64,
    pub work_ms: u64,
    pub seed: u64,
}

impl Default for ToySpec {
    fn default() -> Self {
        ToySpec {
            iterations: 2,
            items: 24,
            train_steps: 20,
            checkpoint_every: 5,
            work_ms: 2,
            seed: 1,
        }
    }
}

/// `source` -> per iteration i: `iter<i>/map` (source + previous model), `iter<i>/anchor`
/// (source only: the same key every iteration, so it runs once and is reused), `iter<i>/train`
/// -> `report`.
pub fn toy_dag(spec: &ToySpec) -> Result<Dag, EngineError> {
    let mut b = DagBuilder::new();
    b.add(
        "source",
        Arc::new(ToySource::new(spec.items, spec.work_ms, spec.seed)),
        vec![],
        None,
    );
    let mut report_inputs = Vec::new();
    for i in 1..=spec.iterations {
        let mut map_inputs = vec![("data", InputSource::node("source", "data"))];
        if i > 1 {
            map_inputs.push((
                "model",
                InputSource::node(&format!("iter{}/train", i - 1), "model"),
            ));
        }
        b.add(
            format!("iter{i}/map"),
            Arc::new(ToyMap::new("map", spec.work_ms)),
            map_inputs,
            Some(i),
        );
        b.add(
            format!("iter{i}/anchor"),
            Arc::new(ToyMap::new("anchor", spec.work_ms)),
            vec![("data", InputSource::node("source", "data"))],
            Some(i),
        );
        b.add(
            format!("iter{i}/train"),
            Arc::new(ToyTrain::new(
                spec.train_steps,
                spec.checkpoint_every,
                spec.work_ms,
            )),
            vec![
                ("data", InputSource::node(&format!("iter{i}/map"), "data")),
                (
                    "anchor",
                    InputSource::node(&format!("iter{i}/anchor"), "data"),
                ),
            ],
            Some(i),
        );
        report_inputs.push((format!("model{i}"), format!("iter{i}/train")));
    }
    let inputs: Vec<(&str, InputSource)> = report_inputs
        .iter()
        .map(|(k, n)| (k.as_str(), InputSource::node(n, "model")))
        .collect();
    b.add("report", Arc::new(ToyReport), inputs, None);
    b.build()
}
