//! Batched generation with a preallocated KV cache.
//!
//! Prompts are left-padded to the longest in their batch; each row has its own rope positions
//! (starting at 0 at its first real token) and a mask hiding its padding, so a row computes the
//! same thing alone or in a batch up to float summation order. Each request carries its own
//! seed and its own ChaCha RNG, drawn once per sampled token, so its tokens do not depend on
//! which other requests share the batch. Requests are sorted by prompt length before batching
//! (less padding); finished rows are dropped from the cache once a quarter of a batch is done.

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
    /// Generates a continuation for each request, `batch_size` sequences at a time.
    /// Outputs are in request order.
    pub fn generate(
        &self,
        reqs: &[GenRequest],
        batch_size: usize,
    ) -> Result<Vec<GenOutput>, ModelError> {
        self.generate_with(reqs, batch_size, true)
    }

    /// [`Self::generate`] where every row makes its `max_new_tokens`, end-of-turn tokens
    /// included as ordinary tokens: for benchmarks that compare token throughput with tools
    /// that ignore the end of turn.
    pub fn generate_ignoring_end_of_turn(
        &self,
        reqs: &[GenRequest],
        batch_size: usize,
    ) -> Result<Vec<GenOutput>, ModelError> {
        self.generate_with(reqs, batch_size, false)
    }

    fn generate_with(
        &self,
        reqs: &[GenRequest],
        batch_size: usize,
        stop_at_end_of_turn: bool,
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
        }
        let w = self.weights(false)?;
        let mut order: Vec<usize> = (0..reqs.len()).collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(reqs[i].prompt_ids.len()), i));
        let mut out: Vec<Option<GenOutput>> = vec![None; reqs.len()];
        for chunk in order.chunks(batch_size.max(1)) {
            let batch: Vec<&GenRequest> = chunk.iter().map(|&i| &reqs[i]).collect();
            let results = self.generate_batch(&w, &batch, stop_at_end_of_turn)?;
            for (&i, r) in chunk.iter().zip(results) {
                out[i] = Some(r);
            }
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
        stop_at_end_of_turn: bool,
    ) -> Result<Vec<GenOutput>, ModelError> {
        let run = || {
            super::kernels::with_half_native(|| {
                self.generate_batch_inner(w, reqs, stop_at_end_of_turn)
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

    fn generate_batch_inner(
        &self,
        w: &Weights,
        reqs: &[&GenRequest],
        stop_at_end_of_turn: bool,
    ) -> Result<Vec<GenOutput>, ModelError> {
        let dev = &self.device;
        let dtype = self.dtype;
        let stops: &[u32] = if stop_at_end_of_turn {
            self.tokenizer.stop_ids()
        } else {
            &[]
        };
        let pad_id = self.tokenizer.pad_id();
        let mut rows: Vec<Row> = reqs
            .iter()
            .map(|r| Row {
                req: r,
                rng: ChaCha8Rng::seed_from_u64(r.seed),
                tokens: Vec::with_capacity(r.max_new_tokens),
                done: (r.max_new_tokens == 0).then_some(FinishReason::MaxTokens),
            })
            .collect();
        let max_prompt = reqs.iter().map(|r| r.prompt_ids.len()).max().unwrap_or(0);
        let max_new = reqs.iter().map(|r| r.max_new_tokens).max().unwrap_or(0);
        for r in reqs {
            self.config.check_context(
                r.prompt_ids.len() + r.max_new_tokens,
                "a prompt plus max_new_tokens",
            )?;
        }
        if max_new > 0 {
            // Cache rows map to request rows through `live`; padding per cache row in `pads`.
            let mut live: Vec<usize> = (0..rows.len()).collect();
            let mut pads: Vec<usize> = reqs
                .iter()
                .map(|r| max_prompt - r.prompt_ids.len())
                .collect();
            let mut cache =
                KvCache::new(&self.config, rows.len(), max_prompt + max_new, dtype, dev)?;
            let mut ids = Vec::with_capacity(rows.len() * max_prompt);
            let mut pos = Vec::with_capacity(rows.len() * max_prompt);
            for (r, &pad) in reqs.iter().zip(&pads) {
                ids.extend(std::iter::repeat_n(pad_id, pad));
                ids.extend_from_slice(&r.prompt_ids);
                pos.extend((0..max_prompt).map(|j| j.saturating_sub(pad) as u32));
            }
            let b = rows.len();
            let ids_t = Tensor::from_vec(ids, (b, max_prompt), dev)?;
            let row_len: Vec<usize> = reqs.iter().map(|r| r.prompt_ids.len()).collect();
            let rope = Rope::new(&self.config, &pos, &row_len, max_prompt, dtype, dev)?;
            let mask = attention_mask(&pads, max_prompt, max_prompt, 0, dtype, dev)?;
            let h = w.forward(&ids_t, &rope, &mask, Some(&mut cache))?;
            let last = h.narrow(1, max_prompt - 1, 1)?.squeeze(1)?;
            let mut logits = w
                .logits(&last)?
                .to_dtype(candle_core::DType::F32)?
                .to_vec2::<f32>()?;
            loop {
                // Each live row picks its next token from its own logits with its own
                // generator, so the rows pick in parallel. `live` is in increasing order.
                let mut active: Vec<(&mut Row, &[f32])> = Vec::with_capacity(live.len());
                let mut next = live.iter().zip(&logits).peekable();
                for (ri, row) in rows.iter_mut().enumerate() {
                    if let Some((_, lg)) = next.next_if(|(&l, _)| l == ri) {
                        active.push((row, lg));
                    }
                }
                debug_assert!(next.peek().is_none(), "live rows are in order");
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
                drop(active);
                let still: Vec<usize> = (0..live.len())
                    .filter(|&ci| rows[live[ci]].done.is_none())
                    .collect();
                if still.is_empty() {
                    break;
                }
                // Drop finished rows from the cache when enough of the batch is idle.
                if (live.len() - still.len()) * 4 >= live.len() {
                    let idx: Vec<u32> = still.iter().map(|&c| c as u32).collect();
                    cache.retain_rows(&Tensor::new(idx.as_slice(), dev)?)?;
                    live = still.iter().map(|&c| live[c]).collect();
                    pads = still.iter().map(|&c| pads[c]).collect();
                }
                let nb = live.len();
                let slot = cache.len;
                let next: Vec<u32> = live
                    .iter()
                    .map(|&ri| {
                        if rows[ri].done.is_none() {
                            *rows[ri].tokens.last().expect("token")
                        } else {
                            pad_id
                        }
                    })
                    .collect();
                let pos: Vec<u32> = pads.iter().map(|&p| (slot - p) as u32).collect();
                let ids_t = Tensor::from_vec(next, (nb, 1), dev)?;
                let row_len: Vec<usize> = pos.iter().map(|&p| p as usize + 1).collect();
                let rope = Rope::new(&self.config, &pos, &row_len, 1, dtype, dev)?;
                let mask = attention_mask(&pads, 1, slot + 1, slot, dtype, dev)?;
                let h = w.forward(&ids_t, &rope, &mask, Some(&mut cache))?;
                logits = w
                    .logits(&h.squeeze(1)?)?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec2::<f32>()?;
            }
        }
        rows.into_iter()
            .map(|r| {
                Ok(GenOutput {
                    text: self.tokenizer.decode(&r.tokens)?,
                    token_ids: r.tokens,
                    finished: r.done.unwrap_or(FinishReason::MaxTokens),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
