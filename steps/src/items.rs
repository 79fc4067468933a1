//! The skeleton every item step shares (generate, judge, meta_judge, ref_logprobs, answer,
//! eval_judge): a known number of items, computed by one model in a fixed partition of
//! batches, each batch committed as it is done; then the step's output is assembled from every
//! committed item, in index order.
//!
//! A step states its items in a [`Batches`] value (made from its parsed inputs): how many, the
//! batch size, and how one batch is computed. [`run`] does the rest: it loads the model only
//! when items are left (a finished step resumes without reading a model), hands the missing
//! batches to the engine, and reads all items back. Seeds come from the step key and the
//! item's identity, never from the batch, so a batch computes the same bytes wherever and
//! whenever it runs; that is what lets a batch run on another machine.

use crate::lm::{self, decode_item};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tsr_engine::{StepContext, StepError, StepInputs};
use tsr_model::{GenOutput, GenRequest, LanguageModel, ModelError};

/// Items per commit of a generating step whose item makes `requests` generation requests
/// (a judge's J samples, a pairwise verdict's two orders): as many whole items as fill `rows`
/// rows, at least one, times `commit_batches`. When that makes more than `rows` requests, the
/// model refills its rows inside the commit (continuous batching).
pub fn items_per_commit(rows: usize, requests: usize, commit_batches: usize) -> usize {
    (rows / requests.max(1)).max(1) * commit_batches.max(1)
}

/// Generates `reqs` on `rows` rows for one unit of a step whose items make `per_item` requests
/// each, `settled` of its items needing none: the step's progress bar moves as requests finish
/// (a unit of many batches would otherwise move it only when committed).
pub fn generate(
    model: &LanguageModel,
    reqs: &[GenRequest],
    rows: usize,
    per_item: usize,
    settled: usize,
    ctx: &StepContext,
) -> Result<Vec<GenOutput>, ModelError> {
    let progress = ctx.progress();
    model.generate_observed(reqs, rows, &|n| {
        progress.within_unit((settled + n / per_item.max(1)) as u64)
    })
}

/// The serde default of a generation step's `commit_batches`: one batch per commit.
pub fn one_batch() -> usize {
    1
}

/// Whether `commit_batches` is its default, which stays out of the step's key (so a step keyed
/// before the setting existed keeps its key).
pub fn is_one_batch(n: &usize) -> bool {
    *n == 1
}

/// The items of one step, ready to compute.
pub trait Batches {
    /// The record each item is stored as (one JSON document per item).
    type Item: Serialize + DeserializeOwned;
    /// The step's name in errors about a committed item.
    const NAME: &'static str;
    /// How many items the step makes.
    fn count(&self) -> u64;
    /// Items per batch: the fixed partition (batch `b` is items `b * size ..`).
    fn batch_size(&self) -> usize;
    /// The progress bar's message.
    fn message(&self) -> String;
    /// Whether any item needs the model (a step whose items are all decided without one, as
    /// identical outputs in evaluation, never loads it).
    fn needs_model(&self) -> bool {
        true
    }
    /// The precision the model's weight matrices are held in while the step runs (its
    /// `weights` setting); `None`: as the model stores them.
    fn weights(&self) -> Option<lm::Weights> {
        None
    }
    /// How the model computes its prompts' attention while the step runs (its
    /// `prompt_attention` setting); `None`: batched, as always.
    fn prompt_attention(&self) -> Option<lm::PromptAttention> {
        None
    }
    /// The items `idx` (one batch, ascending), one per index, computed with `model`.
    fn compute(
        &self,
        model: Model<'_>,
        idx: &[u64],
        ctx: &StepContext,
    ) -> Result<Vec<Self::Item>, StepError>;
}

/// A `Step` impl's `shardable` and `shard` for an item step whose `batches(inputs)` method makes
/// its [`Batches`]: a worker computes its share of them with [`compute`].
macro_rules! shard_by_batches {
    () => {
        fn shardable(&self) -> bool {
            true
        }
        fn shard(
            &self,
            inputs: &tsr_engine::StepInputs,
            ctx: &tsr_engine::StepContext,
        ) -> Result<(), tsr_engine::StepError> {
            $crate::items::compute(&self.batches(inputs)?, inputs, ctx)
        }
    };
}
pub(crate) use shard_by_batches;

/// The step's model, as a batch sees it: loaded when items are left and
/// [`Batches::needs_model`] says so.
#[derive(Clone, Copy)]
pub struct Model<'a>(Option<&'a LanguageModel>);

impl<'a> Model<'a> {
    /// The model; a step asks only where [`Batches::needs_model`] promised it would.
    pub fn get(self) -> &'a LanguageModel {
        self.0
            .expect("the model is loaded for every batch when the step needs one")
    }
}

/// Compute the missing batches that `ctx` computes here (all of them; a worker's shard; none
/// when they go to other processes, which then load the model themselves), without reading the
/// items back.
pub fn compute<B: Batches>(
    work: &B,
    inputs: &StepInputs,
    ctx: &StepContext,
) -> Result<(), StepError> {
    let total = work.count();
    let done = ctx.items().indices()?.len() as u64;
    let model = if done < total && work.needs_model() && !ctx.delegates() {
        let model = lm::load(inputs, "model", ctx)?;
        if let Some(w) = work.weights() {
            lm::hold_weights(&model, w, B::NAME)?;
        }
        // Set either way: the setting belongs to this step's key, never to an earlier user.
        let attention = work
            .prompt_attention()
            .unwrap_or(lm::PromptAttention::Batched);
        model.set_prompt_attention(attention.model());
        Some(model)
    } else {
        None
    };
    ctx.progress().set_message(work.message());
    ctx.for_each_batch(total, work.batch_size(), |idx| {
        let items = work.compute(Model(model.as_ref()), idx, ctx)?;
        if items.len() != idx.len() {
            return Err(StepError::Invalid(format!(
                "{}: a batch of {} items computed {}",
                B::NAME,
                idx.len(),
                items.len()
            )));
        }
        Ok(items
            .iter()
            .map(|r| serde_json::to_vec(r).expect("item serializes"))
            .collect())
    })
}

/// Compute what is missing of `work` with the model under the inputs `model.*`, and return
/// every item in index order.
pub fn run<B: Batches>(
    work: &B,
    inputs: &StepInputs,
    ctx: &StepContext,
) -> Result<Vec<B::Item>, StepError> {
    let total = work.count();
    compute(work, inputs, ctx)?;
    let mut rows = Vec::with_capacity(total as usize);
    for (i, b) in ctx.items().all()? {
        rows.push(decode_item(&b, B::NAME, i)?);
    }
    Ok(rows)
}
