//! Scoring: summed log-probabilities of response tokens given a prompt (plain numbers for
//! inference, a differentiable tensor for DPO) and mean-pooled final hidden states.
//!
//! Sequences are right-padded: with a causal mask, padding placed after a row's tokens is never
//! seen by them, and every row keeps positions 0.. as when run alone. The vocabulary projection
//! runs only on the positions that predict response tokens, in chunks that bound memory.

use candle_core::{DType, Tensor};

use super::llama::{attention_mask, Rope, Weights};
use super::{LanguageModel, ModelError};

/// Rows of the vocabulary projection computed at once (`128 x 49152` f32 = 24 MiB).
const LOGIT_CHUNK: usize = 128;

impl LanguageModel {
    fn check_ids(&self, what: &str, i: usize, ids: &[u32]) -> Result<(), ModelError> {
        let vocab = self.config.vocab_size as u32;
        match ids.iter().find(|&&t| t >= vocab) {
            Some(bad) => Err(ModelError::InvalidRequest(format!(
                "{what} {i}: token id {bad} >= vocab size {vocab}"
            ))),
            None => Ok(()),
        }
    }

    fn check_seqs(&self, seqs: &[Vec<u32>]) -> Result<(), ModelError> {
        for (i, s) in seqs.iter().enumerate() {
            if s.is_empty() {
                return Err(ModelError::InvalidRequest(format!("sequence {i}: empty")));
            }
            self.check_ids("sequence", i, s)?;
        }
        Ok(())
    }

    fn check_pairs(&self, pairs: &[(Vec<u32>, Vec<u32>)]) -> Result<(), ModelError> {
        for (i, (p, r)) in pairs.iter().enumerate() {
            if p.is_empty() {
                return Err(ModelError::InvalidRequest(format!(
                    "pair {i}: empty prompt"
                )));
            }
            self.check_ids("pair", i, p)?;
            self.check_ids("pair", i, r)?;
        }
        Ok(())
    }

    /// Right-padded forward pass: hidden states `[B, L, hidden]` after the final norm.
    fn hidden_right_padded(&self, w: &Weights, seqs: &[&[u32]]) -> Result<Tensor, ModelError> {
        let dev = &self.device;
        let b = seqs.len();
        let l = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let pad = self.tokenizer.pad_id();
        let mut ids = Vec::with_capacity(b * l);
        for s in seqs {
            ids.extend_from_slice(s);
            ids.extend(std::iter::repeat_n(pad, l - s.len()));
        }
        let pos: Vec<u32> = (0..b).flat_map(|_| 0..l as u32).collect();
        let ids = Tensor::from_vec(ids, (b, l), dev)?;
        self.config.check_context(l, "a scored sequence")?;
        let row_len: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        let rope = Rope::new(&self.config, &pos, &row_len, l, self.dtype, dev)?;
        let mask = attention_mask(&vec![0; b], l, l, 0, self.dtype, dev)?;
        Ok(w.forward(&ids, &rope, &mask, None)?)
    }

    /// Summed response log-probs `[B]` for one batch (differentiable iff `w` is).
    fn score_batch(
        &self,
        w: &Weights,
        pairs: &[&(Vec<u32>, Vec<u32>)],
    ) -> Result<Tensor, ModelError> {
        let dev = &self.device;
        let seqs: Vec<Vec<u32>> = pairs
            .iter()
            .map(|(p, r)| [p.as_slice(), r.as_slice()].concat())
            .collect();
        let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
        let h = self.hidden_right_padded(w, &refs)?;
        let (b, l, hidden) = h.dims3()?;
        let h = h.reshape((b * l, hidden))?;
        // Position p+i-1 predicts response token i.
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        let mut owner = Vec::new();
        for (bi, (p, r)) in pairs.iter().enumerate() {
            for (i, &t) in r.iter().enumerate() {
                rows.push((bi * l + p.len() - 1 + i) as u32);
                targets.push(t);
                owner.push(bi);
            }
        }
        let n = rows.len();
        // Log-softmax in f32 at least (f64 models stay f64 for gradient checks).
        let sdt = if self.dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        if n == 0 {
            return Ok(Tensor::zeros(b, sdt, dev)?);
        }
        let mut parts = Vec::new();
        for start in (0..n).step_by(LOGIT_CHUNK) {
            let len = LOGIT_CHUNK.min(n - start);
            let idx = Tensor::new(&rows[start..start + len], dev)?;
            // Row-major logits: the softmax reductions below run along contiguous rows.
            let hs = h.index_select(&idx, 0)?;
            let logits = if w.frozen_base {
                super::kernels::frozen_matmul_wt(&hs, &w.lm_head)?
            } else if let Some(y) = super::trained::x_wt(&hs, &w.lm_head)? {
                // A trained head: `hs @ lm_head^T` as one node, in this orientation (its bits).
                y
            } else {
                hs.matmul(&w.lm_head.to_dtype(hs.dtype())?.t()?)?
            }
            .to_dtype(sdt)?;
            let tg = &targets[start..start + len];
            parts.push(match super::logprob::target_logprob(&logits, tg)? {
                Some(lp) => lp,
                None => {
                    let tgt = Tensor::new(tg, dev)?.unsqueeze(1)?;
                    super::logprob::target_logprob_by_ops(&logits, &tgt)?
                }
            });
        }
        let lp = Tensor::cat(&parts, 0)?; // [N, 1]
                                          // Sum per pair with a constant 0/1 matrix: differentiable and one op.
        let mut sel = vec![0f32; b * n];
        for (j, &bi) in owner.iter().enumerate() {
            sel[bi * n + j] = 1.0;
        }
        let sel = Tensor::from_vec(sel, (b, n), dev)?.to_dtype(sdt)?;
        Ok(sel.matmul(&lp)?.squeeze(1)?)
    }

    /// Sum of log-probabilities of each response given its prompt (token ids, e.g. from
    /// [`super::ChatTokenizer::encode_prompt`] / `encode_response`), `batch_size` pairs at a time.
    /// Inference only: no autograd graph is built.
    pub fn logprobs(
        &self,
        pairs: &[(Vec<u32>, Vec<u32>)],
        batch_size: usize,
    ) -> Result<Vec<f32>, ModelError> {
        self.check_pairs(pairs)?;
        let w = self.weights(false)?;
        let mut order: Vec<usize> = (0..pairs.len()).collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(pairs[i].0.len() + pairs[i].1.len()), i));
        let mut out = vec![0f32; pairs.len()];
        for chunk in order.chunks(batch_size.max(1)) {
            let batch: Vec<&(Vec<u32>, Vec<u32>)> = chunk.iter().map(|&i| &pairs[i]).collect();
            let v = self
                .score_batch(&w, &batch)?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            for (&i, x) in chunk.iter().zip(v) {
                out[i] = x;
            }
        }
        Ok(out)
    }

    /// Differentiable summed response log-probs, shape `[B]` (f32; f64 for an f64 model), computed from the trainable
    /// `Var`s in one batch: `backward()` on a loss built from it reaches every parameter.
    pub fn response_logprobs_tensor(
        &self,
        pairs: &[(Vec<u32>, Vec<u32>)],
    ) -> Result<Tensor, ModelError> {
        self.response_logprobs(pairs, true)
    }

    /// Summed response log-probs `[B]` in one batch; `trainable` selects the differentiable
    /// path (graph through the `Var`s) or the detached inference path.
    pub fn response_logprobs(
        &self,
        pairs: &[(Vec<u32>, Vec<u32>)],
        trainable: bool,
    ) -> Result<Tensor, ModelError> {
        self.check_pairs(pairs)?;
        let w = self.weights(trainable)?;
        let refs: Vec<&(Vec<u32>, Vec<u32>)> = pairs.iter().collect();
        self.score_batch(&w, &refs)
    }

    /// Logits (f32, length vocab) of the token following each sequence (e.g. a judge's score
    /// token), `batch_size` sequences at a time, longest first. Inference only.
    ///
    /// With [`PromptAttention::Fused`](crate::PromptAttention::Fused) set, on the CPU, each
    /// batch goes through generation's prefill with its fused causal attention instead of the
    /// scoring forward (whose attention multiplies every query by every key), and the tokens
    /// its sequences all start with (a judge's rubric) are computed once (see
    /// `first_token_logits`). Otherwise the scoring forward, whose arithmetic scoring and
    /// training share.
    pub fn next_token_logits(
        &self,
        seqs: &[Vec<u32>],
        batch_size: usize,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        self.check_seqs(seqs)?;
        let w = self.weights(false)?;
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(seqs[i].len()), i));
        let mut out = vec![Vec::new(); seqs.len()];
        let prefill =
            self.prompt_attention() == crate::PromptAttention::Fused && self.device.is_cpu();
        for chunk in order.chunks(batch_size.max(1)) {
            let refs: Vec<&[u32]> = chunk.iter().map(|&i| seqs[i].as_slice()).collect();
            if prefill {
                for (&i, v) in chunk.iter().zip(self.first_token_logits(&w, &refs)?) {
                    out[i] = v;
                }
                continue;
            }
            let h = self.hidden_right_padded(&w, &refs)?;
            let (b, l, hidden) = h.dims3()?;
            let rows: Vec<u32> = refs
                .iter()
                .enumerate()
                .map(|(bi, s)| (bi * l + s.len() - 1) as u32)
                .collect();
            let last = h
                .reshape((b * l, hidden))?
                .index_select(&Tensor::new(rows.as_slice(), &self.device)?, 0)?;
            let logits = w.logits(&last)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            for (&i, v) in chunk.iter().zip(logits) {
                out[i] = v;
            }
        }
        Ok(out)
    }

    /// Mean over positions of the final hidden state (after the final norm) of each sequence.
    pub fn mean_hidden(
        &self,
        seqs: &[Vec<u32>],
        batch_size: usize,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        self.check_seqs(seqs)?;
        let w = self.weights(false)?;
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(seqs[i].len()), i));
        let mut out = vec![Vec::new(); seqs.len()];
        for chunk in order.chunks(batch_size.max(1)) {
            let refs: Vec<&[u32]> = chunk.iter().map(|&i| seqs[i].as_slice()).collect();
            let h = self.hidden_right_padded(&w, &refs)?.to_dtype(DType::F32)?;
            let (b, l, _) = h.dims3()?;
            let mut avg = vec![0f32; b * l];
            for (bi, s) in refs.iter().enumerate() {
                for j in 0..s.len() {
                    avg[bi * l + j] = 1.0 / s.len() as f32;
                }
            }
            let avg = Tensor::from_vec(avg, (b, 1, l), &self.device)?;
            let pooled = avg.matmul(&h)?.squeeze(1)?.to_vec2::<f32>()?;
            for (&i, v) in chunk.iter().zip(pooled) {
                out[i] = v;
            }
        }
        Ok(out)
    }
}

impl LanguageModel {
    /// Log-probabilities of the `candidates` tokens as the next token after each sequence
    /// (log-softmax over the whole vocabulary, then picked), `batch_size` sequences at a time.
    /// Used by the judge's `logprob` mode (the digits after `Score: `). Inference only.
    pub fn next_token_logprobs(
        &self,
        seqs: &[Vec<u32>],
        candidates: &[u32],
        batch_size: usize,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        self.check_ids("candidate list", 0, candidates)?;
        let logits = self.next_token_logits(seqs, batch_size)?;
        // log-softmax over the whole vocabulary (in f64 for the normaliser), then pick.
        Ok(logits
            .into_iter()
            .map(|row| {
                let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
                candidates
                    .iter()
                    .map(|&c| (row[c as usize] as f64 - lse) as f32)
                    .collect()
            })
            .collect())
    }
}
