//! Batched generation with a preallocated KV cache.
//!
//! Prompts are left-padded to the longest in their batch; each row has its own rope positions
//! (starting at 0 at its first real token) and a mask hiding its padding, so a row computes the
//! same thing alone or in a batch up to float summation order. Each request carries its own
//! seed and its own ChaCha RNG, drawn once per sampled token, so its tokens do not depend on
//! which other requests share the batch. Requests are sorted by prompt length (less padding).
//!
//! At most `batch_size` rows decode together. With more requests than that, the batch is
//! refilled (continuous batching): once a quarter of its rows have finished, the next waiting
//! requests are prefilled together and copied into the free rows, their prompts ending at the
//! batch's current slot, and decode on with the others. A full cache drops the slots before
//! every live row's start. With no request waiting, finished rows are dropped from the cache
//! once a quarter of the batch is done. Every decision depends on the requests and the tokens
//! they produce only, so the outputs are a function of the requests and `batch_size`.

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::llama::{attention_mask, KvCache, Rope, Weights};
use super::{LanguageModel, ModelError};

/// How the next token is chosen.
#[derive(Clone, Debug, PartialEq)]
pub enum Sampling {
    /// Arg-max (lowest id on ties).
    Greedy,
    /// Softmax sampling at `temperature` (<= 0 means greedy), optionally restricted to the `top_k`
    /// most likely tokens and then to the smallest set whose probability reaches `top_p`.
    Sample {
        temperature: f64,
        top_p: Option<f64>,
        top_k: Option<usize>,
    },
}

/// One generation request. `seed` fully determines the sampling randomness: derive it from
/// (prompt, sample index) so results do not depend on batch composition.
#[derive(Clone, Debug)]
pub struct GenRequest {
    pub prompt_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    pub seed: u64,
}

/// Why generation of a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token (end of turn / eos) was produced; it is not included in the output.
    EndOfTurn,
    /// `max_new_tokens` tokens were produced without a stop token.
    MaxTokens,
}

/// A generated continuation: tokens (stop token excluded) and their text (specials skipped).
#[derive(Clone, Debug, PartialEq)]
pub struct GenOutput {
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finished: FinishReason,
}

/// Chooses a token from `logits` (see [`Sampling`]); consumes one `f64` from `rng` when sampling.
pub(crate) fn pick(logits: &[f32], sampling: &Sampling, rng: &mut ChaCha8Rng) -> u32 {
    let argmax = || {
        let mut best = 0usize;
        for (i, &x) in logits.iter().enumerate() {
            if x > logits[best] {
                best = i;
            }
        }
        best as u32
    };
    let (temperature, top_p, top_k) = match sampling {
        Sampling::Greedy => return argmax(),
        Sampling::Sample {
            temperature,
            top_p,
            top_k,
        } => (*temperature, *top_p, *top_k),
    };
    if temperature <= 0.0 || top_k == Some(1) {
        return argmax();
    }
    let top_p = top_p.filter(|&p| p < 1.0);
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let weight = |x: f32| ((x as f64 - max) / temperature).exp();
    let weights: Vec<f64> = logits.iter().map(|&x| weight(x)).collect();
    let total: f64 = weights.iter().sum();
    if top_p.is_none() && top_k.is_none() {
        // Plain softmax sampling: walk the vocabulary in id order, no sort needed.
        let mut u = rng.gen::<f64>() * total;
        let mut last = 0;
        for (i, &w) in weights.iter().enumerate() {
            if w > 0.0 {
                if u < w {
                    return i as u32;
                }
                u -= w;
                last = i;
            }
        }
        return last as u32;
    }
    // Candidates by decreasing probability (ties by id). Sorting 50k entries per token is slow,
    // so first try a head of clearly likely tokens: if the top-k / top-p set fits in it, it is
    // exactly the same set as with a full sort.
    let by_prob = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let p_target = top_p.unwrap_or(1.0).clamp(0.0, 1.0) * total;
    let head_threshold = 1e-6;
    let mut cands: Vec<(u32, f64)> = weights
        .iter()
        .enumerate()
        .map(|(i, &w)| (i as u32, w))
        .filter(|&(_, w)| w >= head_threshold)
        .collect();
    let head_mass: f64 = cands.iter().map(|c| c.1).sum();
    let k_fits = top_k.is_some_and(|k| k <= cands.len());
    if !(k_fits || (top_p.is_some() && head_mass >= p_target) || head_mass >= total) {
        cands = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| (i as u32, w))
            .collect();
    }
    cands.sort_by(by_prob);
    if let Some(k) = top_k {
        cands.truncate(k.max(1));
    }
    if let Some(p) = top_p {
        // As in transformers: top-p applies to the distribution renormalised after top-k.
        let base = if top_k.is_some() {
            cands.iter().map(|c| c.1).sum()
        } else {
            total
        };
        let target = p.clamp(0.0, 1.0) * base;
        let mut acc = 0.0;
        let mut keep = cands.len();
        for (i, c) in cands.iter().enumerate() {
            acc += c.1;
            if acc >= target {
                keep = i + 1;
                break;
            }
        }
        cands.truncate(keep.max(1));
    }
    let mass: f64 = cands.iter().map(|c| c.1).sum();
    let mut u = rng.gen::<f64>() * mass;
    for c in &cands {
        if u < c.1 {
            return c.0;
        }
        u -= c.1;
    }
    cands.last().map(|c| c.0).unwrap_or(0)
}

/// Per-request state while its batch runs.
struct Row<'a> {
    req: &'a GenRequest,
    rng: ChaCha8Rng,
    tokens: Vec<u32>,
    done: Option<FinishReason>,
}

impl LanguageModel {
    /// Generates a continuation for each request, at most `batch_size` sequences at a time;
    /// with more requests, rows that finish take waiting requests (continuous batching, see
    /// the module docs). Outputs are in request order.
    pub fn generate(
        &self,
        reqs: &[GenRequest],
        batch_size: usize,
    ) -> Result<Vec<GenOutput>, ModelError> {
        self.generate_with(reqs, batch_size, true, None)
    }

    /// [`Self::generate`], calling `on_done(n)` whenever the number of finished requests grows
    /// to `n` (a progress bar's view; the outputs are those of [`Self::generate`]). It is
    /// called between decode steps, on the thread that generates.
    pub fn generate_observed(
        &self,
        reqs: &[GenRequest],
        batch_size: usize,
        on_done: &(dyn Fn(usize) + Sync),
    ) -> Result<Vec<GenOutput>, ModelError> {
        self.generate_with(reqs, batch_size, true, Some(on_done))
    }

    /// [`Self::generate`] where every row makes its `max_new_tokens`, end-of-turn tokens
    /// included as ordinary tokens: for benchmarks that compare token throughput with tools
    /// that ignore the end of turn.
    pub fn generate_ignoring_end_of_turn(
        &self,
        reqs: &[GenRequest],
        batch_size: usize,
    ) -> Result<Vec<GenOutput>, ModelError> {
        self.generate_with(reqs, batch_size, false, None)
    }

    fn generate_with(
        &self,
        reqs: &[GenRequest],
        batch_size: usize,
        stop_at_end_of_turn: bool,
        on_done: Option<&(dyn Fn(usize) + Sync)>,
    ) -> Result<Vec<GenOutput>, ModelError> {
        let vocab = self.config.vocab_size as u32;
        for (i, r) in reqs.iter().enumerate() {
            if r.prompt_ids.is_empty() {
                return Err(ModelError::InvalidRequest(format!(
                    "request {i}: empty prompt"
                )));
            }
            if let Some(&bad) = r.prompt_ids.iter().find(|&&t| t >= vocab) {
                return Err(ModelError::InvalidRequest(format!(
                    "request {i}: token id {bad} >= vocab size {vocab}"
                )));
            }
            self.config.check_context(
                r.prompt_ids.len() + r.max_new_tokens,
                "a prompt plus max_new_tokens",
            )?;
        }
        let w = self.weights(false)?;
        let mut order: Vec<usize> = (0..reqs.len()).collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(reqs[i].prompt_ids.len()), i));
        let sorted: Vec<&GenRequest> = order.iter().map(|&i| &reqs[i]).collect();
        let results =
            self.generate_batch(&w, &sorted, batch_size.max(1), stop_at_end_of_turn, on_done)?;
        let mut out: Vec<Option<GenOutput>> = vec![None; reqs.len()];
        for (&i, r) in order.iter().zip(results) {
            out[i] = Some(r);
        }
        Ok(out
            .into_iter()
            .map(|o| o.expect("every request answered"))
            .collect())
    }

    fn generate_batch(
        &self,
        w: &Weights,
        reqs: &[&GenRequest],
        batch_size: usize,
        stop_at_end_of_turn: bool,
        on_done: Option<&(dyn Fn(usize) + Sync)>,
    ) -> Result<Vec<GenOutput>, ModelError> {
        let run = || {
            super::kernels::with_half_native(|| {
                Decoder::new(self, w, reqs, batch_size, stop_at_end_of_turn, on_done).run()
            })
        };
        if self.device().is_cpu() {
            // On a worker of the thread pool: the many small parallel products of a decode step
            // then start and finish without waking this thread each time.
            rayon::scope(|_| run())
        } else {
            run()
        }
    }
}

/// The fewest tokens a batch's prompts must share before [`LanguageModel::first_token_logits`]
/// computes them once for the batch: below it the one forward of the whole prompts is kept.
const MIN_SHARED_PREFIX: usize = 16;

/// How many leading tokens all `prompts` share, leaving each at least one token of its own.
fn shared_prefix(prompts: &[&[u32]]) -> usize {
    let Some((first, rest)) = prompts.split_first() else {
        return 0;
    };
    let mut n = first.len();
    for p in rest {
        n = n.min(
            first
                .iter()
                .zip(p.iter())
                .take_while(|(a, b)| a == b)
                .count(),
        );
    }
    let shortest = prompts.iter().map(|p| p.len()).min().unwrap_or(0);
    n.min(shortest.saturating_sub(1))
}

impl LanguageModel {
    /// The logits of each prompt's first new token with the model's prompt attention, as
    /// generation computes a prompt's before it picks: `prompts` (longest first) prefilled
    /// together. With the fused prompt attention, tokens that every prompt of the batch starts
    /// with (at least [`MIN_SHARED_PREFIX`], as a judge's rubric) are computed once, and each
    /// prompt's own tokens continue from them (see [`Self::logits_after_shared_prefix`]).
    pub(crate) fn first_token_logits(
        &self,
        w: &Weights,
        prompts: &[&[u32]],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        self.config.check_context(longest, "a scored sequence")?;
        let shared = shared_prefix(prompts);
        let share = prompts.len() > 1
            && shared >= MIN_SHARED_PREFIX
            && self.prompt_attention() == crate::PromptAttention::Fused
            && !self.config.rope.depends_on_length();
        let run = || {
            super::kernels::with_half_native(|| {
                if share {
                    return self.logits_after_shared_prefix(w, prompts, shared);
                }
                let reqs: Vec<GenRequest> = prompts
                    .iter()
                    .map(|p| GenRequest {
                        prompt_ids: p.to_vec(),
                        max_new_tokens: 1,
                        sampling: Sampling::Greedy,
                        seed: 0,
                    })
                    .collect();
                let refs: Vec<&GenRequest> = reqs.iter().collect();
                debug_assert!(prompts.first().is_none_or(|p| p.len() == longest));
                let d = Decoder::new(self, w, &refs, refs.len(), false, None);
                d.prefill(&(0..refs.len()).collect::<Vec<_>>(), longest)
                    .map(|(_, logits)| logits)
            })
        };
        if self.device().is_cpu() {
            // On a worker of the thread pool, as generation runs (see `generate_batch`).
            rayon::scope(|_| run())
        } else {
            run()
        }
    }

    /// [`Self::first_token_logits`] for prompts that share their first `shared` tokens: those
    /// are prefilled once, as one row, into a cache that every prompt's row then starts from;
    /// the prompts' own tokens follow in one forward, right-padded to the longest (each row's
    /// real tokens precede its pads, so no real token sees one). With the fused prompt
    /// attention a token's attention has the arithmetic it has in one prefill of its whole
    /// prompt; the products of the shared tokens are computed with other rows around them, so
    /// the logits may differ from that prefill's in their last bits (they are the same for the
    /// same batch every time).
    fn logits_after_shared_prefix(
        &self,
        w: &Weights,
        prompts: &[&[u32]],
        shared: usize,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let dev = &self.device;
        let (dtype, cfg) = (self.dtype, &self.config);
        let b = prompts.len();
        let own: Vec<usize> = prompts.iter().map(|p| p.len() - shared).collect();
        let longest = own.iter().copied().max().unwrap_or(0);
        let mut cache = KvCache::new(cfg, 1, shared + longest, dtype, dev)?;
        cache.fused_prompts = self.prompt_attention() == crate::PromptAttention::Fused;
        cache.skip_masked_prefix = cache.fused_prompts;
        let ids = Tensor::from_vec(prompts[0][..shared].to_vec(), (1, shared), dev)?;
        let pos: Vec<u32> = (0..shared as u32).collect();
        let rope = Rope::new(cfg, &pos, &[shared], shared, dtype, dev)?;
        let mask = attention_mask(&[0], shared, shared, 0, dtype, dev)?;
        w.forward(&ids, &rope, &mask, Some(&mut cache))?;
        for t in cache.k.iter_mut().chain(cache.v.iter_mut()) {
            *t = t.repeat((b, 1, 1, 1))?;
        }
        let pad = self.tokenizer.pad_id();
        let mut ids = Vec::with_capacity(b * longest);
        for (p, &n) in prompts.iter().zip(&own) {
            ids.extend_from_slice(&p[shared..]);
            ids.extend(std::iter::repeat_n(pad, longest - n));
        }
        let pos: Vec<u32> = (0..b)
            .flat_map(|_| (shared..shared + longest).map(|j| j as u32))
            .collect();
        let row_len: Vec<usize> = own.iter().map(|n| shared + n).collect();
        let ids = Tensor::from_vec(ids, (b, longest), dev)?;
        let rope = Rope::new(cfg, &pos, &row_len, longest, dtype, dev)?;
        let mask = attention_mask(&vec![0; b], longest, shared + longest, shared, dtype, dev)?;
        let h = w.forward(&ids, &rope, &mask, Some(&mut cache))?;
        let hidden = h.dim(2)?;
        let rows: Vec<u32> = own
            .iter()
            .enumerate()
            .map(|(r, &n)| (r * longest + n - 1) as u32)
            .collect();
        let last = h
            .reshape((b * longest, hidden))?
            .index_select(&Tensor::new(rows.as_slice(), dev)?, 0)?;
        Ok(w.logits(&last)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec2::<f32>()?)
    }
}

/// The state of one generation run: up to `batch_size` cache rows decode together; rows whose
/// requests finished take the next waiting requests (see the module docs).
struct Decoder<'a> {
    model: &'a LanguageModel,
    w: &'a Weights,
    stops: &'a [u32],
    pad_id: u32,
    rows: Vec<Row<'a>>,
    /// Requests not yet admitted, in order (longest prompts first).
    waiting: std::ops::Range<usize>,
    /// Cache row -> request index (`None`: never filled).
    occupant: Vec<Option<usize>>,
    /// Cache row -> the slot where its sequence starts (slots before it are masked).
    pads: Vec<usize>,
    /// Cache row -> the logits of its occupant's next token, where one is to be picked.
    logits: Vec<Option<Vec<f32>>>,
    cache: Option<KvCache>,
    /// Told how many requests have finished, when that grows.
    on_done: Option<&'a (dyn Fn(usize) + Sync)>,
    reported: usize,
}

impl<'a> Decoder<'a> {
    fn new(
        model: &'a LanguageModel,
        w: &'a Weights,
        reqs: &[&'a GenRequest],
        batch_size: usize,
        stop_at_end_of_turn: bool,
        on_done: Option<&'a (dyn Fn(usize) + Sync)>,
    ) -> Self {
        let rows = reqs
            .iter()
            .map(|r| Row {
                req: r,
                rng: ChaCha8Rng::seed_from_u64(r.seed),
                tokens: Vec::with_capacity(r.max_new_tokens),
                done: (r.max_new_tokens == 0).then_some(FinishReason::MaxTokens),
            })
            .collect();
        let b = batch_size.min(reqs.len());
        Decoder {
            model,
            w,
            stops: if stop_at_end_of_turn {
                model.tokenizer.stop_ids()
            } else {
                &[]
            },
            pad_id: model.tokenizer.pad_id(),
            rows,
            waiting: 0..reqs.len(),
            occupant: vec![None; b],
            pads: vec![0; b],
            logits: vec![None; b],
            cache: None,
            on_done,
            reported: 0,
        }
    }

    /// Tells the observer how many requests have finished, when that grew.
    fn report(&mut self) {
        if let Some(f) = self.on_done {
            let n = self.rows.iter().filter(|r| r.done.is_some()).count();
            if n > self.reported {
                self.reported = n;
                f(n);
            }
        }
    }

    fn run(mut self) -> Result<Vec<GenOutput>, ModelError> {
        let n = self.rows.len();
        let first: Vec<usize> = if n <= self.occupant.len() {
            // One batch: every request takes a row, as without continuous batching.
            self.waiting = n..n;
            (0..n).collect()
        } else {
            // Requests that make no tokens never take a row.
            self.admissible(self.occupant.len())
        };
        if first.iter().any(|&r| self.rows[r].done.is_none()) {
            self.start(&first)?;
            loop {
                self.pick();
                self.report();
                while !self.waiting.is_empty() && self.free_rows() * 4 >= self.occupant.len() {
                    let holes = self.holes();
                    let next = self.admissible(holes.len());
                    if next.is_empty() {
                        break;
                    }
                    self.admit(&holes[..next.len()], &next)?;
                    self.pick();
                    self.report();
                }
                if self
                    .occupant
                    .iter()
                    .all(|o| o.is_none_or(|r| self.rows[r].done.is_some()))
                {
                    break;
                }
                if self.waiting.is_empty() {
                    self.shrink()?;
                }
                self.step()?;
            }
        }
        let tok = &self.model.tokenizer;
        self.rows
            .into_iter()
            .map(|r| {
                Ok(GenOutput {
                    text: tok.decode(&r.tokens)?,
                    token_ids: r.tokens,
                    finished: r.done.unwrap_or(FinishReason::MaxTokens),
                })
            })
            .collect()
    }

    /// The next up to `n` waiting requests that make tokens (those that make none are done).
    fn admissible(&mut self, n: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let Some(i) = self.waiting.next() else { break };
            if self.rows[i].done.is_none() {
                out.push(i);
            }
        }
        out
    }

    /// Cache rows free for a new request: never filled, or their request finished.
    fn holes(&self) -> Vec<usize> {
        (0..self.occupant.len())
            .filter(|&c| self.occupant[c].is_none_or(|r| self.rows[r].done.is_some()))
            .collect()
    }

    fn fused_prompts(&self) -> bool {
        self.model.prompt_attention() == crate::PromptAttention::Fused
    }

    fn free_rows(&self) -> usize {
        self.holes().len()
    }

    /// Prefills `reqs` (longest prompt first) together, left-padded to the longest:
    /// their cache (slots `0..longest`) and the logits of each one's first new token.
    fn prefill(
        &self,
        reqs: &[usize],
        capacity: usize,
    ) -> Result<(KvCache, Vec<Vec<f32>>), ModelError> {
        let dev = &self.model.device;
        let dtype = self.model.dtype;
        let cfg = &self.model.config;
        let longest = reqs
            .iter()
            .map(|&r| self.rows[r].req.prompt_ids.len())
            .max()
            .unwrap_or(0);
        let pads: Vec<usize> = reqs
            .iter()
            .map(|&r| longest - self.rows[r].req.prompt_ids.len())
            .collect();
        let mut cache = KvCache::new(cfg, reqs.len(), capacity, dtype, dev)?;
        cache.fused_prompts = self.fused_prompts();
        let mut ids = Vec::with_capacity(reqs.len() * longest);
        let mut pos = Vec::with_capacity(reqs.len() * longest);
        for (&r, &pad) in reqs.iter().zip(&pads) {
            ids.extend(std::iter::repeat_n(self.pad_id, pad));
            ids.extend_from_slice(&self.rows[r].req.prompt_ids);
            pos.extend((0..longest).map(|j| j.saturating_sub(pad) as u32));
        }
        let ids_t = Tensor::from_vec(ids, (reqs.len(), longest), dev)?;
        let row_len: Vec<usize> = reqs
            .iter()
            .map(|&r| self.rows[r].req.prompt_ids.len())
            .collect();
        let rope = Rope::new(cfg, &pos, &row_len, longest, dtype, dev)?;
        let mask = attention_mask(&pads, longest, longest, 0, dtype, dev)?;
        let h = self.w.forward(&ids_t, &rope, &mask, Some(&mut cache))?;
        let last = h.narrow(1, longest - 1, 1)?.squeeze(1)?;
        let logits = self
            .w
            .logits(&last)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec2::<f32>()?;
        Ok((cache, logits))
    }

    /// The first rows: prefilled together into the batch's cache.
    fn start(&mut self, reqs: &[usize]) -> Result<(), ModelError> {
        let longest = self.rows[reqs[0]].req.prompt_ids.len();
        let budget = |r: &usize| self.rows[*r].req.max_new_tokens;
        let capacity = if self.waiting.is_empty() {
            longest + reqs.iter().map(budget).max().unwrap_or(0)
        } else {
            // Room for any row to finish after the cache is compacted (see `step`): a live
            // row spans at most the longest prompt plus the largest budget.
            longest + 2 * (0..self.rows.len()).map(|r| budget(&r)).max().unwrap_or(0)
        };
        let (mut cache, logits) = self.prefill(reqs, capacity)?;
        // Rows that join later start far into the cache, and a prompt's fused attention sees
        // only its visible slots; otherwise a single batch keeps its arithmetic.
        cache.skip_masked_prefix = self.fused_prompts() || !self.waiting.is_empty();
        self.occupant = reqs.iter().map(|&r| Some(r)).collect();
        self.pads = reqs
            .iter()
            .map(|&r| longest - self.rows[r].req.prompt_ids.len())
            .collect();
        self.logits = logits.into_iter().map(Some).collect();
        self.cache = Some(cache);
        Ok(())
    }

    /// Prefills `reqs` and moves them into the cache rows `into`: each prompt ends at the
    /// batch's current slot, so it decodes in step with the other rows.
    fn admit(&mut self, into: &[usize], reqs: &[usize]) -> Result<(), ModelError> {
        let longest = self.rows[reqs[0]].req.prompt_ids.len();
        let (group, logits) = self.prefill(reqs, longest)?;
        let cache = self.cache.as_mut().expect("started");
        let slot = cache.len;
        for (j, ((&c, &r), lg)) in into.iter().zip(reqs).zip(logits).enumerate() {
            let p = self.rows[r].req.prompt_ids.len();
            // Requests come longest first, so every prompt fits before the current slot.
            debug_assert!(p <= slot);
            cache.place_row(c, &group, j, longest - p, p, slot - p)?;
            self.occupant[c] = Some(r);
            self.pads[c] = slot - p;
            self.logits[c] = Some(lg);
        }
        Ok(())
    }

    /// Each row with fresh logits picks its next token with its own generator, in parallel.
    fn pick(&mut self) {
        let stops = self.stops;
        let mut active: Vec<(&mut Row, Vec<f32>)> = Vec::new();
        let mut by_req: Vec<Option<Vec<f32>>> = (0..self.rows.len()).map(|_| None).collect();
        for (c, lg) in self.logits.iter_mut().enumerate() {
            if let (Some(r), Some(lg)) = (self.occupant[c], lg.take()) {
                by_req[r] = Some(lg);
            }
        }
        for (row, lg) in self.rows.iter_mut().zip(by_req) {
            if let Some(lg) = lg {
                active.push((row, lg));
            }
        }
        active.par_iter_mut().for_each(|(row, lg)| {
            if row.done.is_some() {
                return;
            }
            let t = pick(lg, &row.req.sampling, &mut row.rng);
            if stops.contains(&t) {
                row.done = Some(FinishReason::EndOfTurn);
                return;
            }
            row.tokens.push(t);
            if row.tokens.len() >= row.req.max_new_tokens {
                row.done = Some(FinishReason::MaxTokens);
            }
        });
    }

    /// With no request waiting, drops finished rows from the cache once a quarter of the
    /// batch is idle.
    fn shrink(&mut self) -> Result<(), ModelError> {
        let n = self.occupant.len();
        let still: Vec<usize> = (0..n)
            .filter(|&c| self.occupant[c].is_some_and(|r| self.rows[r].done.is_none()))
            .collect();
        if (n - still.len()) * 4 >= n {
            let cache = self.cache.as_mut().expect("started");
            let idx: Vec<u32> = still.iter().map(|&c| c as u32).collect();
            cache.retain_rows(&Tensor::new(idx.as_slice(), &self.model.device)?)?;
            self.occupant = still.iter().map(|&c| self.occupant[c]).collect();
            self.pads = still.iter().map(|&c| self.pads[c]).collect();
            self.logits = vec![None; still.len()];
        }
        Ok(())
    }

    /// One decode step for every cache row: the last token of each live row (padding for the
    /// others), then the logits of each live row's next token. A full cache is first
    /// compacted: the slots before every row's start are dropped.
    fn step(&mut self) -> Result<(), ModelError> {
        let dev = &self.model.device;
        let dtype = self.model.dtype;
        let cfg = &self.model.config;
        let live = |c: usize| self.occupant[c].filter(|&r| self.rows[r].done.is_none());
        let cache = self.cache.as_mut().expect("started");
        if cache.len == cache.capacity {
            let drop = (0..self.occupant.len())
                .filter(|&c| live(c).is_some())
                .map(|c| self.pads[c])
                .min()
                .unwrap_or(0);
            cache.drop_slots(drop)?;
            for p in self.pads.iter_mut() {
                *p = p.saturating_sub(drop);
            }
        }
        let slot = cache.len;
        let nb = self.occupant.len();
        let next: Vec<u32> = (0..nb)
            .map(|c| match live(c) {
                Some(r) => *self.rows[r].tokens.last().expect("token"),
                None => self.pad_id,
            })
            .collect();
        // A row without a live request decodes padding; its output is never read.
        let pads = &self.pads;
        let pos: Vec<u32> = pads.iter().map(|&p| (slot - p) as u32).collect();
        let ids_t = Tensor::from_vec(next, (nb, 1), dev)?;
        let row_len: Vec<usize> = pos.iter().map(|&p| p as usize + 1).collect();
        let rope = Rope::new(cfg, &pos, &row_len, 1, dtype, dev)?;
        let mask = attention_mask(pads, 1, slot + 1, slot, dtype, dev)?;
        let h = self.w.forward(&ids_t, &rope, &mask, Some(cache))?;
        let logits = self
            .w
            .logits(&h.squeeze(1)?)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec2::<f32>()?;
        for (c, lg) in logits.into_iter().enumerate() {
            self.logits[c] = live(c).map(|_| lg);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels;

    /// With the fused prompt attention, a prompt's prefill has the bits it has alone when a
    /// longer prompt pads it on the left (every product of these few rows is row by row).
    #[test]
    fn a_fused_prefill_does_not_depend_on_its_batch() {
        let tmp = tempfile::tempdir().unwrap();
        let m = crate::testing::tiny_model(tmp.path(), 5);
        m.set_prompt_attention(crate::PromptAttention::Fused);
        let req = |ids: std::ops::Range<u32>| GenRequest {
            prompt_ids: ids.map(|i| 3 + i * 7 % 50).collect(),
            max_new_tokens: 4,
            sampling: Sampling::Greedy,
            seed: 0,
        };
        let (long, short) = (req(0..29), req(4..13));
        // Few enough rows for the decode step's row-by-row products (`skinny::MAX_ROWS`).
        let n = long.prompt_ids.len();
        assert!(
            n > short.prompt_ids.len() + 3 && 2 * n <= crate::skinny::MAX_ROWS,
            "{n}"
        );
        let w = m.weights(false).unwrap();
        let logits = |reqs: &[&GenRequest]| {
            kernels::with_half_native(|| {
                let d = Decoder::new(&m, &w, reqs, reqs.len(), false, None);
                let (cache, logits) = d.prefill(&(0..reqs.len()).collect::<Vec<_>>(), n).unwrap();
                assert!(cache.fused_prompts);
                logits
            })
        };
        let alone = logits(&[&short]);
        let padded = logits(&[&long, &short]);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&padded[1]), bits(&alone[0]));
    }

    #[test]
    fn shared_prefix_leaves_every_prompt_a_token_of_its_own() {
        let (a, b, c) = ([1u32, 2, 3, 4, 5], [1u32, 2, 3, 9], [1u32, 2, 3]);
        assert_eq!(shared_prefix(&[&a, &b]), 3);
        // The shortest prompt keeps its last token.
        assert_eq!(shared_prefix(&[&a, &c]), 2);
        assert_eq!(shared_prefix(&[&a, &a]), 4);
        assert_eq!(shared_prefix(&[&a]), 4);
        assert_eq!(shared_prefix(&[&a, &[7u32, 1][..]]), 0);
        assert_eq!(shared_prefix(&[]), 0);
    }

    /// Prompts that share their first tokens: computed once for the batch, each prompt's
    /// next-token logits are those of its own prefill (close: the shared tokens' products are
    /// computed among other rows) and the same bits every time.
    #[test]
    fn a_shared_prefix_gives_each_prompt_its_own_prefills_logits() {
        let tmp = tempfile::tempdir().unwrap();
        let m = crate::testing::tiny_model(tmp.path(), 7);
        m.set_prompt_attention(crate::PromptAttention::Fused);
        let w = m.weights(false).unwrap();
        let head: Vec<u32> = (0..40).map(|i| 3 + (i * 11) % 60).collect();
        let prompts: Vec<Vec<u32>> = [vec![5u32, 9, 14, 2, 8, 30, 7], vec![6, 1], vec![5, 9, 4, 4]]
            .into_iter()
            .map(|tail| [head.clone(), tail].concat())
            .collect();
        let mut refs: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
        refs.sort_by_key(|p| std::cmp::Reverse(p.len()));
        assert_eq!(shared_prefix(&refs), head.len());
        let shared = kernels::with_half_native(|| {
            m.logits_after_shared_prefix(&w, &refs, head.len()).unwrap()
        });
        let again = m.first_token_logits(&w, &refs).unwrap();
        let bits = |v: &[Vec<f32>]| -> Vec<Vec<u32>> {
            v.iter()
                .map(|r| r.iter().map(|x| x.to_bits()).collect())
                .collect()
        };
        assert_eq!(bits(&again), bits(&shared));
        for (p, got) in refs.iter().zip(&shared) {
            let alone = m.first_token_logits(&w, &[p]).unwrap().remove(0);
            let worst = alone
                .iter()
                .zip(got)
                .map(|(a, b)| (a - b).abs() / (1.0 + a.abs()))
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "{worst}");
        }
        // The same prompt twice (two equal responses to judge): all but its last token shared.
        let p = refs[1];
        let twice = m.first_token_logits(&w, &[p, p]).unwrap();
        assert_eq!(bits(&twice[..1]), bits(&twice[1..]));
        let alone = m.first_token_logits(&w, &[p]).unwrap().remove(0);
        for (a, b) in alone.iter().zip(&twice[0]) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn pick_is_seeded_and_respects_top_k() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 / 10.0).collect();
        let s = Sampling::Sample {
            temperature: 1.0,
            top_p: Some(0.9),
            top_k: Some(5),
        };
        let draw = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..20)
                .map(|_| pick(&logits, &s, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        let mut top: Vec<(usize, f32)> = logits.iter().copied().enumerate().collect();
        top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let allowed: Vec<u32> = top[..5].iter().map(|x| x.0 as u32).collect();
        assert!(draw(7).iter().all(|t| allowed.contains(t)));
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(pick(&logits, &Sampling::Greedy, &mut rng), top[0].0 as u32);
    }

    /// The straightforward definition: full sort, top-k, renormalise, top-p, draw.
    fn pick_reference(
        logits: &[f32],
        t: f64,
        top_p: Option<f64>,
        top_k: Option<usize>,
        rng: &mut ChaCha8Rng,
    ) -> u32 {
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
        let mut c: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &x)| (i as u32, ((x as f64 - max) / t).exp()))
            .collect();
        let total: f64 = c.iter().map(|x| x.1).sum();
        c.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if let Some(k) = top_k {
            c.truncate(k);
        }
        if let Some(p) = top_p.filter(|&p| p < 1.0) {
            let base = if top_k.is_some() {
                c.iter().map(|x| x.1).sum()
            } else {
                total
            };
            let mut acc = 0.0;
            let keep = c
                .iter()
                .position(|x| {
                    acc += x.1;
                    acc >= p * base
                })
                .map(|i| i + 1)
                .unwrap_or(c.len());
            c.truncate(keep);
        }
        let mass: f64 = c.iter().map(|x| x.1).sum();
        let mut u = rng.gen::<f64>() * mass;
        for x in &c {
            if u < x.1 {
                return x.0;
            }
            u -= x.1;
        }
        c.last().unwrap().0
    }

    #[test]
    fn shortcuts_match_the_full_sort_definition() {
        // Flat, peaked and long-tailed distributions exercise the full-sort and head paths.
        let flat: Vec<f32> = (0..3000).map(|i| (i % 7) as f32 * 0.01).collect();
        let peaked: Vec<f32> = (0..3000)
            .map(|i| {
                if i % 500 == 42 {
                    12.0
                } else {
                    (i % 13) as f32 * 0.1
                }
            })
            .collect();
        let tail: Vec<f32> = (0..3000).map(|i| -((i as f32).sqrt())).collect();
        for logits in [&flat, &peaked, &tail] {
            for (t, p, k) in [
                (0.7, Some(0.95), None),
                (1.0, None, Some(40)),
                (1.3, Some(0.5), Some(2000)),
                (1.0, Some(0.9), Some(3)),
            ] {
                let s = Sampling::Sample {
                    temperature: t,
                    top_p: p,
                    top_k: k,
                };
                let mut a = ChaCha8Rng::seed_from_u64(5);
                let mut b = ChaCha8Rng::seed_from_u64(5);
                for _ in 0..50 {
                    assert_eq!(
                        pick(logits, &s, &mut a),
                        pick_reference(logits, t, p, k, &mut b),
                        "{t} {p:?} {k:?}"
                    );
                }
            }
        }
    }
}
