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
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let weight = |x: f32| ((x as f64 - max) / temperature).exp();
    let total: f64 = logits.iter().map(|&x| weight(x)).sum();
    // Candidates by decreasing probability (ties by id). Sorting 50k entries per token is slow,
    // so first try a head of clearly likely tokens: if the top-k / top-p set fits in it, it is
    // exactly the same set as with a full sort.
    let by_prob = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let p_target = top_p.unwrap_or(1.0).clamp(0.0, 1.0) * total;
    let head_threshold = 1e-6;
    let mut cands: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as u32, weight(x)))
        .filter(|&(_, w)| w >= head_threshold)
        .collect();
    let head_mass: f64 = cands.iter().map(|c| c.1).sum();
    let k_fits = top_k.is_some_and(|k| k <= cands.len());
    if !(k_fits || (top_p.is_some() && head_mass >= p_target) || head_mass >= total) {
        cands = logits.iter().enumerate().map(|(i, &x)| (i as u32, weight(x))).collect();
    }
    cands.sort_by(by_prob);
    if let Some(k) = top_k {
        cands.truncate(k.max(1));
    }
    if let Some(p) = top_p {
        // As in transformers: top-p applies to the distribution renormalised after top-k.
        let base = if top_k.is_some() { cands.iter().map(|c| c.1).sum() } else { total };
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
    pub fn generate(&self, reqs: &[GenRequest], batch_size: usize) -> Result<Vec<GenOutput>, ModelError> {
        let vocab = self.config.vocab_size as u32;
        for (i, r) in reqs.iter().enumerate() {
            if r.prompt_ids.is_empty() {
                return Err(ModelError::InvalidRequest(format!("request {i}: empty prompt")));
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
            let results = self.generate_batch(&w, &batch)?;
            for (&i, r) in chunk.iter().zip(results) {
                out[i] = Some(r);
            }
        }
        Ok(out.into_iter().map(|o| o.expect("every request answered")).collect())
    }

    fn generate_batch(&self, w: &Weights, reqs: &[&GenRequest]) -> Result<Vec<GenOutput>, ModelError> {
        let dev = &self.device;
        let dtype = self.dtype;
        let inv_freq = self.config.inv_freq();
        let stops = self.tokenizer.stop_ids();
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
        if max_new > 0 {
            // Cache rows map to request rows through `live`; padding per cache row in `pads`.
            let mut live: Vec<usize> = (0..rows.len()).collect();
            let mut pads: Vec<usize> = reqs.iter().map(|r| max_prompt - r.prompt_ids.len()).collect();
            let mut cache = KvCache::new(&self.config, rows.len(), max_prompt + max_new, dtype, dev)?;
            let mut ids = Vec::with_capacity(rows.len() * max_prompt);
            let mut pos = Vec::with_capacity(rows.len() * max_prompt);
            for (r, &pad) in reqs.iter().zip(&pads) {
                ids.extend(std::iter::repeat_n(pad_id, pad));
                ids.extend_from_slice(&r.prompt_ids);
                pos.extend((0..max_prompt).map(|j| j.saturating_sub(pad) as u32));
            }
            let b = rows.len();
            let ids_t = Tensor::from_vec(ids, (b, max_prompt), dev)?;
            let rope = Rope::new(&inv_freq, &pos, b, max_prompt, dtype, dev)?;
            let mask = attention_mask(&pads, max_prompt, max_prompt, 0, dtype, dev)?;
            let h = w.forward(&ids_t, &rope, &mask, Some(&mut cache))?;
            let last = h.narrow(1, max_prompt - 1, 1)?.squeeze(1)?;
            let mut logits = w.logits(&last)?.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
            loop {
                for (ci, &ri) in live.iter().enumerate() {
                    let row = &mut rows[ri];
                    if row.done.is_some() {
                        continue;
                    }
                    let t = pick(&logits[ci], &row.req.sampling, &mut row.rng);
                    if stops.contains(&t) {
                        row.done = Some(FinishReason::EndOfTurn);
                        continue;
                    }
                    row.tokens.push(t);
                    if row.tokens.len() >= row.req.max_new_tokens {
                        row.done = Some(FinishReason::MaxTokens);
                    }
                }
                let still: Vec<usize> = (0..live.len()).filter(|&ci| rows[live[ci]].done.is_none()).collect();
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
                    .map(|&ri| if rows[ri].done.is_none() { *rows[ri].tokens.last().expect("token") } else { pad_id })
                    .collect();
                let pos: Vec<u32> = pads.iter().map(|&p| (slot - p) as u32).collect();
                let ids_t = Tensor::from_vec(next, (nb, 1), dev)?;
                let rope = Rope::new(&inv_freq, &pos, nb, 1, dtype, dev)?;
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
        let s = Sampling::Sample { temperature: 1.0, top_p: Some(0.9), top_k: Some(5) };
        let draw = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..20).map(|_| pick(&logits, &s, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        let mut top: Vec<(usize, f32)> = logits.iter().copied().enumerate().collect();
        top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let allowed: Vec<u32> = top[..5].iter().map(|x| x.0 as u32).collect();
        assert!(draw(7).iter().all(|t| allowed.contains(t)));
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(pick(&logits, &Sampling::Greedy, &mut rng), top[0].0 as u32);
    }

    #[test]
    fn top_p_head_shortcut_matches_full_sort() {
        // A flat distribution forces the full-sort path; a peaked one the head path.
        for peak in [0.0f32, 30.0] {
            let logits: Vec<f32> = (0..5000).map(|i| if i == 42 { peak } else { (i % 7) as f32 * 0.01 }).collect();
            let s = Sampling::Sample { temperature: 0.7, top_p: Some(0.95), top_k: None };
            let mut rng = ChaCha8Rng::seed_from_u64(3);
            let t = pick(&logits, &s, &mut rng);
            if peak > 0.0 {
                assert_eq!(t, 42);
            }
        }
    }
}
