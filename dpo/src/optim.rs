//! AdamW whose complete state is visible, serialisable and restorable.
//!
//! `candle_nn::AdamW` keeps its moments and step count private (so a resumed run cannot
//! continue exactly) and decays every parameter. This one keeps, per parameter (sorted by
//! name, because `VarMap` iteration order differs per process), the first and second moments
//! `m` and `v` as f32 tensors, plus one global step count, and saves them as safetensors bytes.
//!
//! The update mirrors PyTorch's single-tensor `torch.optim.AdamW` (amsgrad off, not maximising),
//! in PyTorch's order:
//!
//! ```text
//! step += 1
//! param.mul_(1 - lr * weight_decay)                  # decoupled decay, before the Adam update
//! exp_avg.lerp_(grad, 1 - beta1)                      # m += (g - m) * (1 - beta1)
//! exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
//! bias_correction1 = 1 - beta1 ** step
//! bias_correction2 = 1 - beta2 ** step
//! step_size = lr / bias_correction1
//! denom = (exp_avg_sq.sqrt() / sqrt(bias_correction2)).add_(eps)
//! param.addcdiv_(exp_avg, denom, value=-step_size)
//! ```
//!
//! Scalars (`step_size`, bias corrections) are computed in f64 like Python floats; tensor math
//! is f32 (parameters of another dtype are updated in f32 and cast back). On CPU with
//! contiguous f32 tensors a fused in-place kernel ([`super::fused`]) computes the same values
//! in three passes instead of about fourteen allocating ones. A parameter without a
//! gradient is an error, not a skip: in this project it means a fused candle op cut the graph.
//!
//! Saved state: tensors `m.<param>` and `v.<param>` (f32) and one metadata entry `tsr.adamw`
//! holding a JSON header (format version, step count, hyperparameters as JSON text). One
//! metadata entry, not
//! several, because safetensors writes its metadata map in `HashMap` order: with one key the
//! bytes are deterministic.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::{fused, DpoError};
use tsr_model::{write_f32_le, GradSink};

/// Version of the optimizer-state encoding written by [`AdamW::save_state`].
pub const ADAMW_STATE_VERSION: u32 = 1;
const METADATA_KEY: &str = "tsr.adamw";

/// Which parameters are excluded from weight decay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoDecayRule {
    /// A parameter whose name contains any of these substrings is not decayed.
    pub name_substrings: Vec<String>,
    /// Parameters of rank <= 1 (norm gains, biases) are not decayed.
    pub one_dimensional: bool,
}

impl Default for NoDecayRule {
    /// Norms, embeddings and biases (by name), and every 1-D tensor.
    fn default() -> Self {
        Self {
            name_substrings: vec!["norm".into(), "embed_tokens".into(), "bias".into()],
            one_dimensional: true,
        }
    }
}

impl NoDecayRule {
    /// Decay every parameter (what `candle_nn::AdamW` does).
    pub fn decay_all() -> Self {
        Self {
            name_substrings: Vec::new(),
            one_dimensional: false,
        }
    }

    /// Whether a parameter of this name and rank is decayed.
    pub fn decays(&self, name: &str, rank: usize) -> bool {
        let small = self.one_dimensional && rank <= 1;
        let named = self
            .name_substrings
            .iter()
            .any(|s| name.contains(s.as_str()));
        !small && !named
    }
}

/// AdamW hyperparameters except the learning rate, which each step receives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// First-moment decay, in [0, 1).
    pub beta1: f64,
    /// Second-moment decay, in [0, 1).
    pub beta2: f64,
    /// Added to the denominator, > 0.
    pub eps: f64,
    /// Decoupled weight decay for the parameters [`NoDecayRule`] does not exclude.
    pub weight_decay: f64,
    /// Which parameters get no weight decay.
    pub no_decay: NoDecayRule,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults (betas 0.9 / 0.999, eps 1e-8, weight decay 0.01) with norms,
    /// embeddings and biases excluded from decay.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            no_decay: NoDecayRule::default(),
        }
    }
}

impl AdamWConfig {
    fn validate(&self) -> Result<(), DpoError> {
        let ok = (0.0..1.0).contains(&self.beta1)
            && (0.0..1.0).contains(&self.beta2)
            && self.eps.is_finite()
            && self.eps > 0.0
            && self.weight_decay.is_finite()
            && self.weight_decay >= 0.0;
        if ok {
            Ok(())
        } else {
            Err(DpoError::InvalidConfig(format!(
                "AdamW hyperparameters {self:?}"
            )))
        }
    }
}

/// Gradients of an optimizer's parameters, f32, in the optimizer's (name-sorted) order.
#[derive(Debug, Clone)]
pub struct ParamGrads {
    grads: Vec<Tensor>,
}

impl ParamGrads {
    /// The gradients, one per parameter, in [`AdamW::names`] order.
    pub fn tensors(&self) -> &[Tensor] {
        &self.grads
    }

    /// Multiplies every gradient by `s`.
    pub fn scale(&mut self, s: f64) -> Result<(), DpoError> {
        for g in &mut self.grads {
            *g = g.affine(s, 0.0)?;
        }
        Ok(())
    }

    /// [`Self::scale`] in each gradient's own storage where it is contiguous f32 on the CPU
    /// (on the thread pool; the bits of candle's `affine`). Only for gradients that share their
    /// storage with no other tensor: those collected from a store that is gone.
    pub(crate) fn scale_owned(&mut self, s: f64) -> Result<(), DpoError> {
        for g in &mut self.grads {
            match fused::in_place(g) {
                true => fused::affine(g, s, 0.0)?,
                false => *g = g.affine(s, 0.0)?,
            }
        }
        Ok(())
    }

    /// [`Self::add_assign`] into each gradient's own storage where both are contiguous f32 on
    /// the CPU (on the thread pool; the bits of candle's `add`). Only for gradients of `self`
    /// that share their storage with no other tensor.
    pub(crate) fn add_assign_owned(&mut self, other: &ParamGrads) -> Result<(), DpoError> {
        if other.grads.len() != self.grads.len() {
            return Err(DpoError::InvalidConfig(
                "adding gradients of different parameter sets".into(),
            ));
        }
        for (g, o) in self.grads.iter_mut().zip(&other.grads) {
            let fits = g.dims() == o.dims();
            match fits && fused::in_place(g) && fused::in_place(o) {
                true => fused::add_into(g, o)?,
                false => *g = (&*g + o)?,
            }
        }
        Ok(())
    }

    /// Adds `other` elementwise (gradient accumulation over micro-batches).
    pub fn add_assign(&mut self, other: &ParamGrads) -> Result<(), DpoError> {
        if other.grads.len() != self.grads.len() {
            return Err(DpoError::InvalidConfig(
                "adding gradients of different parameter sets".into(),
            ));
        }
        for (g, o) in self.grads.iter_mut().zip(&other.grads) {
            *g = (&*g + o)?;
        }
        Ok(())
    }
}

struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

/// The header stored in the `tsr.adamw` metadata entry. The config is kept as its JSON text
/// and compared as text: parsing floats back (serde_json's default parser is not always
/// correctly rounded) could turn an equal config into a spurious mismatch.
#[derive(Serialize, Deserialize)]
struct StateHeader {
    format_version: u32,
    step: u64,
    config: String,
}

/// AdamW with explicit, checkpointable state. See the module docs for the exact update.
pub struct AdamW {
    cfg: AdamWConfig,
    step: u64,
    slots: Vec<Slot>,
    fused_cpu: bool,
}

impl AdamW {
    /// An optimizer over `params` with zero moments and step count 0. Parameters are sorted
    /// by name; a name given twice is an error.
    pub fn new(
        params: impl IntoIterator<Item = (String, Var)>,
        cfg: AdamWConfig,
    ) -> Result<Self, DpoError> {
        cfg.validate()?;
        let mut sorted: BTreeMap<String, Var> = BTreeMap::new();
        for (name, var) in params {
            if sorted.contains_key(&name) {
                return Err(DpoError::DuplicateParam { name });
            }
            sorted.insert(name, var);
        }
        let mut slots = Vec::with_capacity(sorted.len());
        for (name, var) in sorted {
            // Two allocations: the fused kernel updates m and v in place.
            let m = Tensor::zeros(var.shape(), DType::F32, var.device())?;
            let v = Tensor::zeros(var.shape(), DType::F32, var.device())?;
            let decay = cfg.no_decay.decays(&name, var.rank());
            slots.push(Slot {
                name,
                m,
                v,
                var,
                decay,
            });
        }
        Ok(Self {
            cfg,
            step: 0,
            slots,
            fused_cpu: true,
        })
    }

    /// Turns the fused in-place CPU kernel on or off (on by default; results are equal either
    /// way, this exists to test that and to rule it out when debugging).
    pub fn with_fused_cpu(mut self, on: bool) -> Self {
        self.fused_cpu = on;
        self
    }

    /// Number of updates applied so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The hyperparameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Parameter names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(|s| s.name.as_str())
    }

    /// Parameters, sorted by name.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.slots.iter().map(|s| (s.name.as_str(), &s.var))
    }

    /// Whether the named parameter gets weight decay (`None`: no such parameter).
    pub fn decays(&self, name: &str) -> Option<bool> {
        self.slots.iter().find(|s| s.name == name).map(|s| s.decay)
    }

    /// The first and second moments of the named parameter.
    pub fn moments(&self, name: &str) -> Option<(&Tensor, &Tensor)> {
        self.slots
            .iter()
            .find(|s| s.name == name)
            .map(|s| (&s.m, &s.v))
    }

    /// Takes this optimizer's gradients out of a backward pass, as detached f32 tensors.
    /// A parameter without a gradient is [`DpoError::MissingGrad`].
    pub fn collect_grads(&self, store: &GradStore) -> Result<ParamGrads, DpoError> {
        self.collect_grads_with(store, None)
    }

    /// [`Self::collect_grads`], each parameter's gradient taken from `sink` where the backward
    /// put it there (the ops that compute a weight's gradient themselves), else from `store`.
    /// A parameter with a gradient in both is an error: its contributions were split.
    pub fn collect_grads_with(
        &self,
        store: &GradStore,
        sink: Option<&GradSink>,
    ) -> Result<ParamGrads, DpoError> {
        let mut grads = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let sunk = sink.and_then(|k| k.take(s.var.as_tensor()));
            let g = match (sunk, store.get(s.var.as_tensor())) {
                (Some(g), None) => g,
                (None, Some(g)) => g.detach(),
                (Some(_), Some(_)) => {
                    return Err(DpoError::SplitGrad {
                        name: s.name.clone(),
                    })
                }
                (None, None) => {
                    return Err(DpoError::MissingGrad {
                        name: s.name.clone(),
                    })
                }
            };
            grads.push(g.to_dtype(DType::F32)?);
        }
        Ok(ParamGrads { grads })
    }

    /// One AdamW update from a backward pass's gradients.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<(), DpoError> {
        let grads = self.collect_grads(grads)?;
        self.step_with(&grads, lr)
    }

    /// One AdamW update from collected (possibly accumulated and clipped) gradients.
    pub fn step_with(&mut self, grads: &ParamGrads, lr: f64) -> Result<(), DpoError> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(DpoError::InvalidConfig(format!("learning rate {lr}")));
        }
        if grads.grads.len() != self.slots.len() {
            return Err(DpoError::InvalidConfig(format!(
                "{} gradients for {} parameters",
                grads.grads.len(),
                self.slots.len()
            )));
        }
        let t = (self.step + 1) as f64;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let step_size = lr / (1.0 - b1.powf(t));
        let bc2_sqrt = (1.0 - b2.powf(t)).sqrt();
        for (s, g) in self.slots.iter_mut().zip(&grads.grads) {
            if g.dims() != s.var.dims() {
                return Err(DpoError::StateMismatch {
                    tensor: s.name.clone(),
                    detail: format!(
                        "gradient shape {:?}, parameter {:?}",
                        g.dims(),
                        s.var.dims()
                    ),
                });
            }
            let decay = s.decay && self.cfg.weight_decay != 0.0;
            if self.fused_cpu && fused::applies(s.var.as_tensor(), &s.m, &s.v, g) {
                let scalars = fused::Scalars {
                    w1: (1.0 - b1) as f32,
                    b2: b2 as f32,
                    w2: (1.0 - b2) as f32,
                    decay: decay.then_some((1.0 - lr * self.cfg.weight_decay) as f32),
                    inv_bc2_sqrt: (1.0 / bc2_sqrt) as f32,
                    eps: self.cfg.eps as f32,
                    neg_step_size: (-step_size) as f32,
                };
                fused::update(s.var.as_tensor(), &s.m, &s.v, g, scalars)?;
                continue;
            }
            let mut theta = s.var.as_tensor().detach().to_dtype(DType::F32)?;
            if decay {
                theta = theta.affine(1.0 - lr * self.cfg.weight_decay, 0.0)?;
            }
            s.m = ((g - &s.m)?.affine(1.0 - b1, 0.0)? + &s.m)?;
            s.v = (s.v.affine(b2, 0.0)? + g.sqr()?.affine(1.0 - b2, 0.0)?)?;
            // (sqrt(v) / bc2_sqrt) + eps as one affine pass: x * (1 / bc2_sqrt) + eps.
            let denom = s.v.sqrt()?.affine(1.0 / bc2_sqrt, self.cfg.eps)?;
            theta = (theta + (&s.m / denom)?.affine(-step_size, 0.0)?)?;
            s.var.set(&theta.to_dtype(s.var.dtype())?)?;
        }
        self.step += 1;
        Ok(())
    }

    /// The complete optimizer state as safetensors bytes (deterministic for equal state).
    pub fn save_state(&self) -> Result<Vec<u8>, DpoError> {
        let mut out = Vec::with_capacity(self.state_len()?);
        self.write_state(&mut out)?;
        Ok(out)
    }

    /// The safetensors header (8-byte length, then JSON padded with spaces to a multiple of
    /// 8) and the data length. Tensors `m.<param>`, `v.<param>` are laid out in parameter
    /// (name) order; header keys are sorted; any reader sorts entries by offset.
    fn state_header(&self) -> Result<(Vec<u8>, usize), DpoError> {
        let header = StateHeader {
            format_version: ADAMW_STATE_VERSION,
            step: self.step,
            config: serde_json::to_string(&self.cfg)?,
        };
        let mut map: BTreeMap<String, serde_json::Value> = BTreeMap::new();
        map.insert(
            "__metadata__".into(),
            serde_json::json!({ METADATA_KEY: serde_json::to_string(&header)? }),
        );
        let mut off = 0usize;
        for s in &self.slots {
            for (prefix, t) in [("m", &s.m), ("v", &s.v)] {
                let n = t.elem_count() * 4;
                map.insert(
                    format!("{prefix}.{}", s.name),
                    serde_json::json!({"dtype": "F32", "shape": t.dims(), "data_offsets": [off, off + n]}),
                );
                off += n;
            }
        }
        let mut json = serde_json::to_vec(&map)?;
        while json.len() % 8 != 0 {
            json.push(b' ');
        }
        let mut out = Vec::with_capacity(8 + json.len());
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(&json);
        Ok((out, off))
    }

    /// Length in bytes of [`AdamW::save_state`]'s output.
    pub fn state_len(&self) -> Result<usize, DpoError> {
        let (header, data) = self.state_header()?;
        Ok(header.len() + data)
    }

    /// Streams [`AdamW::save_state`]'s bytes into `w` without building them in memory (the
    /// moments of a 135 M-parameter model are about 1 GB).
    pub fn write_state(&self, w: &mut dyn std::io::Write) -> Result<(), DpoError> {
        let io = |e: std::io::Error| DpoError::Io {
            what: "optimizer state",
            source: e,
        };
        let (header, _) = self.state_header()?;
        w.write_all(&header).map_err(io)?;
        let mut buf = Vec::with_capacity(1 << 20);
        for s in &self.slots {
            for t in [&s.m, &s.v] {
                write_f32_le(t, w, &mut buf, io)?;
            }
        }
        Ok(())
    }

    /// Restores state written by [`AdamW::save_state`]. Names, shapes, dtypes, the format
    /// version and the hyperparameters must all match; on any error nothing is changed.
    pub fn load_state(&mut self, bytes: &[u8]) -> Result<(), DpoError> {
        let st = safetensors::SafeTensors::deserialize(bytes)?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)?;
        let raw = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(METADATA_KEY))
            .ok_or(DpoError::Corrupt {
                what: "optimizer state",
                reason: format!("no `{METADATA_KEY}` metadata entry"),
            })?;
        let version: serde_json::Value = serde_json::from_str(raw)?;
        let found = version
            .get("format_version")
            .and_then(|v| v.as_u64())
            .ok_or(DpoError::Corrupt {
                what: "optimizer state",
                reason: "header has no format_version".into(),
            })?;
        if found != ADAMW_STATE_VERSION as u64 {
            return Err(DpoError::UnsupportedVersion {
                what: "optimizer state",
                found: found.min(u32::MAX as u64) as u32,
                supported: ADAMW_STATE_VERSION,
            });
        }
        let header: StateHeader = serde_json::from_str(raw)?;
        let current = serde_json::to_string(&self.cfg)?;
        if header.config != current {
            return Err(DpoError::ConfigMismatch {
                saved: header.config,
                current,
            });
        }
        let mut expected: BTreeMap<String, ()> = BTreeMap::new();
        let mut loaded = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let mut pair = Vec::with_capacity(2);
            for prefix in ["m", "v"] {
                let name = format!("{prefix}.{}", s.name);
                let view = st.tensor(&name).map_err(|_| DpoError::StateMismatch {
                    tensor: name.clone(),
                    detail: "missing from the saved state".into(),
                })?;
                if view.dtype() != safetensors::Dtype::F32 {
                    return Err(DpoError::StateMismatch {
                        tensor: name,
                        detail: format!("dtype {:?}, expected F32", view.dtype()),
                    });
                }
                if view.shape() != s.var.dims() {
                    return Err(DpoError::StateMismatch {
                        tensor: name,
                        detail: format!(
                            "saved shape {:?}, parameter shape {:?}",
                            view.shape(),
                            s.var.dims()
                        ),
                    });
                }
                let values: Vec<f32> = view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                pair.push(Tensor::from_vec(values, s.var.shape(), s.var.device())?);
                expected.insert(name, ());
            }
            loaded.push(pair);
        }
        let mut names: Vec<String> = st.names().into_iter().cloned().collect();
        names.sort();
        if let Some(extra) = names.into_iter().find(|n| !expected.contains_key(n)) {
            return Err(DpoError::StateMismatch {
                tensor: extra,
                detail: "saved state has a tensor for no current parameter".into(),
            });
        }
        for (s, mut pair) in self.slots.iter_mut().zip(loaded) {
            s.v = pair.pop().expect("two tensors per parameter");
            s.m = pair.pop().expect("two tensors per parameter");
        }
        self.step = header.step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(values: &[f32], shape: &[usize]) -> Var {
        Var::from_tensor(&Tensor::from_slice(values, shape, &Device::Cpu).unwrap()).unwrap()
    }

    fn params() -> Vec<(String, Var)> {
        vec![
            (
                "model.layers.0.mlp.up_proj.weight".into(),
                var(&[0.5, -1.0, 2.0, 0.25], &[2, 2]),
            ),
            (
                "model.embed_tokens.weight".into(),
                var(&[1.0, 2.0, 3.0, 4.0], &[2, 2]),
            ),
            (
                "model.layers.0.input_layernorm.weight".into(),
                var(&[1.0, 1.0], &[2]),
            ),
            ("model.norm.weight".into(), var(&[1.0, 1.0], &[2])),
            ("lm_head.weight".into(), var(&[0.1, 0.2, 0.3, 0.4], &[2, 2])),
            ("proj.bias".into(), var(&[0.1, 0.2], &[2])),
            ("scale".into(), var(&[3.0], &[1])),
        ]
    }

    #[test]
    fn weight_decay_excludes_norms_embeddings_biases_and_1d() {
        let opt = AdamW::new(params(), AdamWConfig::default()).unwrap();
        assert_eq!(opt.decays("model.layers.0.mlp.up_proj.weight"), Some(true));
        assert_eq!(opt.decays("lm_head.weight"), Some(true));
        assert_eq!(opt.decays("model.embed_tokens.weight"), Some(false));
        assert_eq!(
            opt.decays("model.layers.0.input_layernorm.weight"),
            Some(false)
        );
        assert_eq!(opt.decays("model.norm.weight"), Some(false));
        assert_eq!(opt.decays("proj.bias"), Some(false));
        assert_eq!(opt.decays("scale"), Some(false));
        assert_eq!(opt.decays("nope"), None);
        let names: Vec<&str> = opt.names().collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);

        let all = AdamWConfig {
            no_decay: NoDecayRule::decay_all(),
            ..Default::default()
        };
        let opt = AdamW::new(params(), all).unwrap();
        assert!(opt.names().all(|n| opt.decays(n) == Some(true)));
    }

    #[test]
    fn zero_gradient_step_only_decays_the_decayed_parameters() {
        let mut opt = AdamW::new(params(), AdamWConfig::default()).unwrap();
        let grads = ParamGrads {
            grads: opt
                .vars()
                .map(|(_, v)| v.as_tensor().zeros_like().unwrap())
                .collect(),
        };
        let before: Vec<Vec<f32>> = opt
            .vars()
            .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        opt.step_with(&grads, 0.5).unwrap();
        for ((name, v), b) in opt.vars().zip(before) {
            let after: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let factor = if opt.decays(name).unwrap() {
                1.0 - 0.5 * 0.01
            } else {
                1.0
            };
            for (a, b) in after.iter().zip(&b) {
                assert_eq!(*a, b * factor as f32, "{name}");
            }
        }
        assert_eq!(opt.step_count(), 1);
    }

    #[test]
    fn fused_cpu_kernel_equals_the_portable_path() {
        let copy = |p: &[(String, Var)]| -> Vec<(String, Var)> {
            p.iter()
                .map(|(n, v)| {
                    (
                        n.clone(),
                        Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap(),
                    )
                })
                .collect()
        };
        // One parameter spans several of the fused kernel's parallel chunks, with a short last.
        let mut base = params();
        let n = 3 * (1 << 16) + 17;
        let big: Vec<f32> = (0..n)
            .map(|k| ((k * 13) % 29) as f32 * 0.05 - 0.7)
            .collect();
        base.push((
            "model.layers.1.mlp.down_proj.weight".into(),
            var(&big, &[125, 1573]),
        ));
        let mut fused = AdamW::new(copy(&base), AdamWConfig::default()).unwrap();
        let mut plain = AdamW::new(copy(&base), AdamWConfig::default())
            .unwrap()
            .with_fused_cpu(false);
        for step in 0..5 {
            let grads: Vec<Tensor> = fused
                .vars()
                .enumerate()
                .map(|(i, (_, v))| {
                    let n = v.elem_count();
                    let g: Vec<f32> = (0..n)
                        .map(|k| ((k * 7 + i * 3 + step * 5) % 11) as f32 * 0.37 - 1.8)
                        .collect();
                    Tensor::from_vec(g, v.shape(), &Device::Cpu).unwrap()
                })
                .collect();
            let grads = ParamGrads { grads };
            fused.step_with(&grads, 0.05).unwrap();
            plain.step_with(&grads, 0.05).unwrap();
        }
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for ((name, a), (_, b)) in fused.vars().zip(plain.vars()) {
            assert_eq!(flat(a.as_tensor()), flat(b.as_tensor()), "{name}");
            let (ma, va) = fused.moments(name).unwrap();
            let (mb, vb) = plain.moments(name).unwrap();
            assert_eq!(flat(ma), flat(mb), "m of {name}");
            assert_eq!(flat(va), flat(vb), "v of {name}");
        }
    }

    #[test]
    fn missing_gradient_and_duplicate_names_are_errors() {
        let p = params();
        let x = p[0].1.as_tensor().sum_all().unwrap();
        let store = x.backward().unwrap();
        let mut opt = AdamW::new(p.clone(), AdamWConfig::default()).unwrap();
        match opt.step(&store, 1e-3) {
            Err(DpoError::MissingGrad { name }) => assert_eq!(name, "lm_head.weight"),
            other => panic!("{other:?}"),
        }
        let mut dup = p.clone();
        dup.push(p[0].clone());
        assert!(matches!(
            AdamW::new(dup, AdamWConfig::default()),
            Err(DpoError::DuplicateParam { .. })
        ));
    }

    #[test]
    fn load_rejects_mismatched_state_naming_the_tensor() {
        let opt = AdamW::new(params(), AdamWConfig::default()).unwrap();
        let bytes = opt.save_state().unwrap();
        assert_eq!(bytes, opt.save_state().unwrap(), "deterministic bytes");

        // A parameter with another shape.
        let mut p = params();
        p[4].1 = var(&[0.0; 6], &[2, 3]);
        let mut other = AdamW::new(p, AdamWConfig::default()).unwrap();
        let err = other.load_state(&bytes).unwrap_err().to_string();
        assert!(
            err.contains("m.lm_head.weight") && err.contains("[2, 3]"),
            "{err}"
        );

        // A parameter the state does not know.
        let mut p = params();
        p.push(("extra.weight".into(), var(&[0.0; 4], &[2, 2])));
        let mut other = AdamW::new(p, AdamWConfig::default()).unwrap();
        let err = other.load_state(&bytes).unwrap_err().to_string();
        assert!(
            err.contains("m.extra.weight") && err.contains("missing"),
            "{err}"
        );

        // A state tensor no parameter wants.
        let mut p = params();
        p.pop();
        let mut other = AdamW::new(p, AdamWConfig::default()).unwrap();
        let err = other.load_state(&bytes).unwrap_err().to_string();
        assert!(err.contains("m.scale"), "{err}");

        // Other hyperparameters.
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut other = AdamW::new(params(), cfg).unwrap();
        assert!(matches!(
            other.load_state(&bytes),
            Err(DpoError::ConfigMismatch { .. })
        ));

        // Awkward floats survive the round trip exactly (no spurious config mismatch).
        let odd = AdamWConfig {
            beta2: 0.987_654_321_012_345_7,
            eps: 1.1e-8,
            weight_decay: 0.1 + 0.2,
            ..Default::default()
        };
        let saved = AdamW::new(params(), odd.clone())
            .unwrap()
            .save_state()
            .unwrap();
        AdamW::new(params(), odd)
            .unwrap()
            .load_state(&saved)
            .unwrap();

        // Garbage.
        let mut other = AdamW::new(params(), AdamWConfig::default()).unwrap();
        assert!(other.load_state(b"not safetensors").is_err());
    }
}
