//! Weights' gradients handed to the trainer beside candle's gradient store.
//!
//! candle's backward starts the gradient of every tracked tensor as zeros and adds each
//! contribution into it on the calling thread, the thread pool waiting: for a full DPO step of
//! SmolLM2-135M, 135 M values zeroed and added once, and the tied embedding's 28 M copied
//! whole to add the few rows its lookup touched. While a [`GradSink`] is active (see
//! [`GradSink::activate`]), the ops that compute a weight's gradient themselves (the trained
//! product of `trained.rs` and the embedding lookup here) give it to the sink instead of to
//! candle: the first contribution as it is, already the value candle's accumulation into
//! zeros gives (`0.0 + g`), each later one added into it in place, on the thread pool, in the
//! order candle's backward hands them over, which is the order it would have added them in.
//! The trainer then takes each weight's gradient from the sink, or from candle's store for the
//! weights no such op touched (norm weights), and never finds both (it checks).
//!
//! A sink is active on one thread (the one building the graph) while it is set; the ops keep
//! the slot they were built with, so the backward may run anywhere.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::TensorId;
use candle_core::{CpuStorage, CustomOp1, DType, InplaceOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::fused::{slice, slice_mut};

/// Elements per task of the in-place passes.
const CHUNK: usize = 1 << 16;

/// One weight's gradient of the current backward pass.
#[derive(Default)]
pub(crate) struct Slot {
    grad: Mutex<Option<Tensor>>,
}

impl Slot {
    /// Adds a contribution `g` (a tensor of the weight's shape that only this slot holds):
    /// the first one is kept as it is, a later one is added into the kept one in place.
    /// `g` must already be the value candle's accumulation into zeros gives (`0.0 + g`).
    pub(crate) fn put(&self, g: Tensor) -> Result<()> {
        let mut kept = self.grad.lock().expect("gradient slot");
        match kept.as_ref() {
            None => *kept = Some(g),
            Some(k) => add_into(k, &g)?,
        }
        Ok(())
    }

    /// Adds the rows `src[i]` into rows `ids[i]` of the kept gradient, in `i`'s order (candle's
    /// `index_add` along the first dim), starting from zeros of `shape` when nothing is kept.
    fn index_add(&self, ids: &[u32], src: &Tensor, shape: &Shape) -> Result<()> {
        let mut kept = self.grad.lock().expect("gradient slot");
        if kept.is_none() {
            *kept = Some(Tensor::zeros(shape.clone(), DType::F32, src.device())?);
        }
        let k = kept.as_ref().expect("just set");
        k.inplace_op2(&src.contiguous()?, &IndexAddRows { ids })
    }

    fn take(&self) -> Option<Tensor> {
        self.grad.lock().expect("gradient slot").take()
    }
}

/// Gradients of the weights whose ops give them here, one slot per weight (by tensor id).
#[derive(Default)]
pub struct GradSink {
    slots: Mutex<HashMap<TensorId, Arc<Slot>>>,
}

impl std::fmt::Debug for GradSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.slots.lock().map(|s| s.len()).unwrap_or(0);
        f.debug_struct("GradSink").field("weights", &n).finish()
    }
}

thread_local! {
    static ACTIVE: RefCell<Option<Arc<GradSink>>> = const { RefCell::new(None) };
}

/// While alive, the sink it came from is the active one on this thread.
pub struct ActiveSink {
    previous: Option<Arc<GradSink>>,
}

impl Drop for ActiveSink {
    fn drop(&mut self) {
        let previous = self.previous.take();
        ACTIVE.with(|a| *a.borrow_mut() = previous);
    }
}

impl GradSink {
    /// An empty sink.
    pub fn new() -> Arc<GradSink> {
        Arc::new(GradSink::default())
    }

    /// Makes this sink the one the ops built on this thread give weights' gradients to, until
    /// the guard is dropped. Gradients left from an earlier pass are dropped first.
    pub fn activate(self: &Arc<Self>) -> ActiveSink {
        for slot in self.slots.lock().expect("gradient sink").values() {
            slot.take();
        }
        let previous = ACTIVE.with(|a| a.borrow_mut().replace(self.clone()));
        ActiveSink { previous }
    }

    /// The gradient the last backward pass gave here for `weight`, taken out of the sink.
    pub fn take(&self, weight: &Tensor) -> Option<Tensor> {
        let slots = self.slots.lock().expect("gradient sink");
        slots.get(&weight.id()).and_then(|s| s.take())
    }

    fn slot(&self, weight: &Tensor) -> Arc<Slot> {
        let mut slots = self.slots.lock().expect("gradient sink");
        slots.entry(weight.id()).or_default().clone()
    }
}

/// The slot for `weight` in the sink active on this thread, if one is, `weight` is tracked, and
/// it is f32 on the CPU (where the ops that use a slot apply).
pub(crate) fn slot_for(weight: &Tensor) -> Option<Arc<Slot>> {
    if !(weight.track_op() && weight.device().is_cpu() && weight.dtype() == DType::F32) {
        return None;
    }
    ACTIVE.with(|a| a.borrow().as_ref().map(|s| s.slot(weight)))
}

/// `a + b` into `a`'s own storage, on the thread pool in fixed chunks: candle's `add`, for
/// contiguous f32 tensors of the same size on the CPU (an error otherwise). Only for an `a`
/// whose storage no other tensor shares.
pub fn add_into(a: &Tensor, b: &Tensor) -> Result<()> {
    a.inplace_op2(b, &AddInto)
}

/// `a = a + b` in place: candle's `add`.
struct AddInto;

impl InplaceOp2 for AddInto {
    fn name(&self) -> &'static str {
        "sink-add"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let b = slice(s2, l2, self.name())?;
        let a = slice_mut(s1, l1, self.name())?;
        if a.len() != b.len() {
            candle_core::bail!("sink-add: gradients {:?} and {:?}", l1.dims(), l2.dims());
        }
        a.par_chunks_mut(CHUNK)
            .zip(b.par_chunks(CHUNK))
            .for_each(|(a, b)| {
                for (a, &b) in a.iter_mut().zip(b) {
                    *a += b;
                }
            });
        Ok(())
    }
}

/// Rows of `src` added into rows `ids` of the gradient, in `ids`' order; columns split among
/// tasks (each value still receives its additions in that order).
struct IndexAddRows<'a> {
    ids: &'a [u32],
}

impl InplaceOp2 for IndexAddRows<'_> {
    fn name(&self) -> &'static str {
        "sink-index-add"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let src = slice(s2, l2, self.name())?;
        let dst = slice_mut(s1, l1, self.name())?;
        let (rows, cols) = l1.shape().dims2()?;
        if src.len() != self.ids.len() * cols {
            candle_core::bail!(
                "sink-index-add: {} ids for rows {:?} into {:?}",
                self.ids.len(),
                l2.dims(),
                l1.dims()
            );
        }
        if let Some(bad) = self.ids.iter().find(|&&i| i as usize >= rows) {
            candle_core::bail!("sink-index-add: row {bad} of {rows}");
        }
        for (i, &id) in self.ids.iter().enumerate() {
            let d = &mut dst[id as usize * cols..(id as usize + 1) * cols];
            for (d, &s) in d.iter_mut().zip(&src[i * cols..(i + 1) * cols]) {
                *d += s;
            }
        }
        Ok(())
    }
}

/// The rows `ids` of an embedding `[vocab, hidden]`, whose backward adds its gradient's rows
/// into the weight's slot.
struct EmbeddingRows {
    ids: Vec<u32>,
    slot: Arc<Slot>,
}

impl CustomOp1 for EmbeddingRows {
    fn name(&self) -> &'static str {
        "sink-embedding"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let w = slice(s, l, self.name())?;
        let (rows, cols) = l.shape().dims2()?;
        if let Some(bad) = self.ids.iter().find(|&&i| i as usize >= rows) {
            candle_core::bail!("sink-embedding: token {bad} of a vocabulary of {rows}");
        }
        let mut out = Vec::with_capacity(self.ids.len() * cols);
        for &i in &self.ids {
            out.extend_from_slice(&w[i as usize * cols..(i as usize + 1) * cols]);
        }
        Ok((CpuStorage::F32(out), Shape::from((self.ids.len(), cols))))
    }

    fn bwd(&self, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        self.slot.index_add(&self.ids, grad, w.shape())?;
        Ok(None)
    }
}

/// `w.index_select(ids, 0)` for an embedding whose gradient goes to the active sink: `None`
/// when no sink takes `w` (the caller then uses candle's `index_select`).
pub(crate) fn embedding(w: &Tensor, ids: &Tensor) -> Result<Option<Tensor>> {
    let Some(slot) = slot_for(w) else {
        return Ok(None);
    };
    if w.rank() != 2 || !w.is_contiguous() || ids.rank() != 1 {
        return Ok(None);
    }
    let ids = ids.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    w.apply_op1(EmbeddingRows { ids, slot }).map(Some)
}

/// `t`, each value added to `0.0`, in place (a gradient handed over without that addition).
pub(crate) fn plus_zero(t: &Tensor) -> Result<()> {
    t.inplace_op1(&PlusZero)
}

struct PlusZero;

impl candle_core::InplaceOp1 for PlusZero {
    fn name(&self) -> &'static str {
        "sink-plus-zero"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        slice_mut(s, l, self.name())?
            .par_chunks_mut(CHUNK)
            .for_each(|c| {
                for x in c {
                    // `x + 0.0` would be the same value; written as candle's accumulation reads.
                    #[allow(clippy::assign_op_pattern)]
                    {
                        *x = 0.0 + *x;
                    }
                }
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::bits;
    use crate::testing::tiny_model;
    use crate::LanguageModel;

    /// Every trainable weight's gradient of a scoring loss, from candle's store alone or from
    /// the sink and the store, with the number of weights the sink gave.
    fn gradients(
        model: &LanguageModel,
        pairs: &[(Vec<u32>, Vec<u32>)],
        with_sink: bool,
    ) -> (Vec<(String, Vec<u32>)>, usize) {
        let sink = GradSink::new();
        let lp = {
            let _active = with_sink.then(|| sink.activate());
            model.response_logprobs_tensor(pairs).unwrap()
        };
        // Signed weights (one exactly -0.0) on the pairs' log-probs.
        let w: Vec<f32> = (0..pairs.len())
            .map(|i| [0.75, -0.0, -1.5][i % 3])
            .collect();
        let w = Tensor::new(w.as_slice(), lp.device()).unwrap();
        let store = (&lp * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let mut sunk = 0;
        let grads = model
            .trainable_vars()
            .into_iter()
            .map(|(name, v)| {
                let g = match (sink.take(v.as_tensor()), store.get(v.as_tensor())) {
                    (Some(g), None) => {
                        sunk += 1;
                        g
                    }
                    (None, Some(g)) => g.clone(),
                    (a, b) => panic!(
                        "{name}: in the sink {}, in the store {}",
                        a.is_some(),
                        b.is_some()
                    ),
                };
                (name, bits(&g))
            })
            .collect();
        (grads, sunk)
    }

    fn ids(n: usize, seed: u32, vocab: u32) -> Vec<u32> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 7) % vocab)
            .collect()
    }

    /// With the sink, every weight's gradient has candle's bits: the tied embedding (the head's
    /// chunks and the lookup's rows, a token repeated), the projections at both product
    /// orientations (more and fewer than 128 rows), and for a LoRA adapter its factors; the
    /// norm weights stay in candle's store.
    #[test]
    fn the_sink_gives_candles_gradients_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let full = tiny_model(dir.path(), 5);
        let vocab = full.config().vocab_size as u32;
        let lora = full
            .clone_weights()
            .unwrap()
            .with_new_lora(&"r=4,alpha=8".parse().unwrap(), 3)
            .unwrap();
        let long = vec![
            (ids(70, 1, vocab), ids(90, 2, vocab)),
            (ids(40, 3, vocab), ids(61, 4, vocab)),
        ];
        let short = vec![
            (ids(9, 5, vocab), ids(7, 6, vocab)),
            (vec![7; 5], vec![7; 6]),
        ];
        for (what, model) in [("full", &full), ("lora", &lora)] {
            for pairs in [&long, &short] {
                let (theirs, none) = gradients(model, pairs, false);
                let (ours, sunk) = gradients(model, pairs, true);
                assert_eq!(none, 0);
                // The norm weights stay in candle's store; a LoRA adapter's factors go through
                // the trained product above 128 rows only.
                let (n, long_pairs) = (ours.len(), std::ptr::eq(pairs, &long));
                match what {
                    "full" => assert!(sunk > 0 && sunk < n, "{what}: {sunk} of {n}"),
                    _ if long_pairs => assert_eq!(sunk, n, "{what}"),
                    _ => {}
                }
                for ((name, a), (_, b)) in ours.iter().zip(&theirs) {
                    assert_eq!(a, b, "{what}, {name}, {} tokens", pairs[0].0.len());
                }
            }
        }
    }

    /// A weight used both through a sink's op and through candle's ops has a gradient in
    /// both places (what the trainer refuses); once the guard is gone, the same op gives its
    /// gradient to candle's store and nothing more reaches the sink, though it has a slot for
    /// that weight.
    #[test]
    fn a_weight_used_around_the_sink_shows_in_both() {
        let dev = candle_core::Device::Cpu;
        let w = candle_core::Var::from_tensor(&Tensor::ones((3, 4), DType::F32, &dev).unwrap())
            .unwrap();
        let x = Tensor::ones((2, 4), DType::F32, &dev).unwrap();
        let sink = GradSink::new();
        let y = {
            let _active = sink.activate();
            crate::trained::trained_matmul_wt(&x, w.as_tensor())
                .unwrap()
                .unwrap()
        };
        let z = x.matmul(&w.as_tensor().t().unwrap()).unwrap();
        let store = (y + z).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(store.get(w.as_tensor()).is_some());
        assert!(sink.take(w.as_tensor()).is_some());
        let y = crate::trained::trained_matmul_wt(&x, w.as_tensor())
            .unwrap()
            .unwrap();
        let store = y.sum_all().unwrap().backward().unwrap();
        assert!(store.get(w.as_tensor()).is_some());
        assert!(sink.take(w.as_tensor()).is_none());
    }
}
