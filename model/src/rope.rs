//! Rotary position embedding settings in every form the ecosystem writes, and the inverse
//! frequencies they define.
//!
//! Forms read from `config.json`:
//! - transformers 5: `"rope_parameters": {"rope_theta", "rope_type", ...the type's keys}`;
//! - older files: a top-level `rope_theta` and a `rope_scaling` object whose type is spelled
//!   `rope_type` or `type`.
//!
//! Types: `default`, `linear`, `dynamic` (NTK), `llama3` and `yarn`, computed as transformers
//! 5.23 computes them (`modeling_rope_utils.py`). Any other type, a key a type does not know,
//! a partial rotary factor, or two sources that disagree is an error that names the key and the
//! file: a setting that changes the math is never replaced by a default.
//!
//! The stored form ([`Rope::write_hf_json`]) is the older one (top-level `rope_theta` plus
//! `rope_scaling` with `rope_type`), which transformers 4.x and 5.x both read.

use std::path::Path;

use serde_json::{json, Map, Value};

use super::ModelError;

/// The scaling variant and its parameters, as written in the config (optional keys stay
/// optional so the config can be written back unchanged).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Dynamic NTK: the base grows with the sequence length once it passes
    /// `max_position_embeddings`.
    Dynamic { factor: f64 },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// YaRN: interpolation blended with extrapolation by a linear ramp, and an attention factor
    /// that scales cos and sin.
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        attention_factor: Option<f64>,
        beta_fast: Option<f64>,
        beta_slow: Option<f64>,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        truncate: Option<bool>,
    },
}

/// Everything that determines the rotary tables of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// Inverse frequencies (length `head_dim / 2`) and the factor applied to cos and sin.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeFrequencies {
    pub inv_freq: Vec<f32>,
    pub attention_scaling: f32,
}

/// The RoPE types this crate computes.
pub const SUPPORTED_TYPES: &str = "default, linear, dynamic, llama3, yarn";

const COMMON_KEYS: [&str; 3] = ["rope_type", "type", "rope_theta"];

fn keys_of(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "default" => &[],
        "linear" | "dynamic" => &["factor"],
        "llama3" => &[
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ],
        "yarn" => &[
            "factor",
            "original_max_position_embeddings",
            "attention_factor",
            "beta_fast",
            "beta_slow",
            "mscale",
            "mscale_all_dim",
            "truncate",
        ],
        _ => return None,
    })
}

impl Rope {
    /// Plain RoPE with base `theta`.
    pub fn plain(theta: f64) -> Self {
        Rope {
            theta,
            scaling: RopeScaling::Default,
        }
    }

    /// Reads the RoPE settings of a `config.json` value. `max_position_embeddings` is the
    /// model's (already defaulted) value; `path` is only used in error messages.
    pub fn from_hf_json(
        v: &Value,
        max_position_embeddings: usize,
        path: &Path,
    ) -> Result<Self, ModelError> {
        let err = |msg: String| ModelError::Config {
            path: path.to_path_buf(),
            msg,
        };
        let object = |key: &str| -> Result<Option<&Map<String, Value>>, ModelError> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Object(o)) => Ok(Some(o)),
                Some(other) => Err(err(format!("{key} must be an object, found {other}"))),
            }
        };
        let params = flatten_per_layer(object("rope_parameters")?, "rope_parameters", v, &err)?;
        let scaling = flatten_per_layer(object("rope_scaling")?, "rope_scaling", v, &err)?;
        // transformers lets `rope_scaling` override `rope_parameters`; two different settings
        // in one file are ambiguous, so they must agree (apart from where rope_theta lives).
        let (dict, dict_name) = match (params, scaling) {
            (Some(p), Some(s)) => {
                let strip = |m: &Map<String, Value>| {
                    let mut m = m.clone();
                    m.remove("rope_theta");
                    if let Some(t) = m.remove("type") {
                        m.entry("rope_type").or_insert(t);
                    }
                    m
                };
                if strip(&p) != strip(&s) {
                    return Err(err(format!(
                        "rope_parameters {} and rope_scaling {} disagree; keep one of them",
                        Value::Object(p.clone()),
                        Value::Object(s.clone())
                    )));
                }
                let mut merged = s.clone();
                if let Some(t) = p.get("rope_theta") {
                    merged.entry("rope_theta").or_insert(t.clone());
                }
                (merged, "rope_scaling")
            }
            (Some(p), None) => (p, "rope_parameters"),
            (None, Some(s)) => (s, "rope_scaling"),
            (None, None) => (Map::new(), "rope_parameters"),
        };
        let num =
            |m: &Map<String, Value>, key: &str, owner: &str| -> Result<Option<f64>, ModelError> {
                match m.get(key) {
                    None | Some(Value::Null) => Ok(None),
                    Some(x) => x
                        .as_f64()
                        .map(Some)
                        .ok_or_else(|| err(format!("{owner}.{key} must be a number, found {x}"))),
                }
            };
        let top = v.as_object().cloned().unwrap_or_default();
        // rope_theta: in the dict (transformers 5), else top level (older), else transformers'
        // default for these architectures.
        let theta = match (
            num(&dict, "rope_theta", dict_name)?,
            num(&top, "rope_theta", "config")?,
        ) {
            (Some(a), Some(b)) if a != b => {
                return Err(err(format!(
                    "rope_theta is {b} at the top level but {a} in {dict_name}; keep one of them"
                )))
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => 10_000.0,
        };
        if !(theta.is_finite() && theta > 1.0) {
            return Err(err(format!("rope_theta {theta} must be a number above 1")));
        }
        for (m, owner) in [(&dict, dict_name), (&top, "config")] {
            if let Some(p) = num(m, "partial_rotary_factor", owner)? {
                if p != 1.0 {
                    return Err(err(format!(
                        "{owner}.partial_rotary_factor = {p}: partial rotary embeddings are not supported (only 1.0)"
                    )));
                }
            }
        }
        let type_of = |key: &str| -> Result<Option<String>, ModelError> {
            match dict.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(err(format!(
                    "{dict_name}.{key} must be a string, found {other}"
                ))),
            }
        };
        let kind = match (type_of("rope_type")?, type_of("type")?) {
            (Some(a), Some(b)) if a != b => {
                return Err(err(format!(
                    "{dict_name} has rope_type {a:?} and type {b:?}; keep one of them"
                )))
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => "default".to_string(),
        };
        let Some(allowed) = keys_of(&kind) else {
            return Err(err(format!(
                "RoPE type {kind:?} ({dict_name}) is not supported (supported: {SUPPORTED_TYPES})"
            )));
        };
        for key in dict.keys() {
            let known = COMMON_KEYS.contains(&key.as_str())
                || key == "partial_rotary_factor"
                || allowed.contains(&key.as_str());
            if !known {
                return Err(err(format!(
                    "{dict_name}.{key} is not a setting of RoPE type {kind:?}; tsr does not know what it changes"
                )));
            }
        }
        let need = |key: &str| -> Result<f64, ModelError> {
            num(&dict, key, dict_name)?
                .ok_or_else(|| err(format!("RoPE type {kind:?} needs {dict_name}.{key}")))
        };
        let factor_at_least_1 = |f: f64| -> Result<f64, ModelError> {
            if f.is_finite() && f >= 1.0 {
                Ok(f)
            } else {
                Err(err(format!("{dict_name}.factor = {f} must be at least 1")))
            }
        };
        // transformers gives a top-level original_max_position_embeddings priority (Phi-3 style)
        // and falls back to max_position_embeddings.
        let original_max = || -> Result<usize, ModelError> {
            let top_level = num(&top, "original_max_position_embeddings", "config")?;
            let inner = num(&dict, "original_max_position_embeddings", dict_name)?;
            let x = top_level
                .or(inner)
                .unwrap_or(max_position_embeddings as f64);
            if x >= 1.0 && x.fract() == 0.0 {
                Ok(x as usize)
            } else {
                Err(err(format!(
                    "original_max_position_embeddings = {x} must be a positive integer"
                )))
            }
        };
        let scaling = match kind.as_str() {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear {
                factor: need("factor")?,
            },
            "dynamic" => RopeScaling::Dynamic {
                factor: factor_at_least_1(need("factor")?)?,
            },
            "llama3" => {
                let (low, high) = (need("low_freq_factor")?, need("high_freq_factor")?);
                if high <= low {
                    return Err(err(format!(
                        "{dict_name}: high_freq_factor {high} must be above low_freq_factor {low}"
                    )));
                }
                RopeScaling::Llama3 {
                    factor: need("factor")?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: original_max()?,
                }
            }
            "yarn" => RopeScaling::Yarn {
                factor: need("factor")?,
                original_max_position_embeddings: original_max()?,
                attention_factor: num(&dict, "attention_factor", dict_name)?,
                beta_fast: num(&dict, "beta_fast", dict_name)?,
                beta_slow: num(&dict, "beta_slow", dict_name)?,
                mscale: num(&dict, "mscale", dict_name)?,
                mscale_all_dim: num(&dict, "mscale_all_dim", dict_name)?,
                // transformers reads `.get("truncate", True)`: absent truncates, an explicit
                // null does not.
                truncate: match dict.get("truncate") {
                    None => None,
                    Some(Value::Null) => Some(false),
                    Some(Value::Bool(b)) => Some(*b),
                    Some(other) => {
                        return Err(err(format!(
                            "{dict_name}.truncate must be true or false, found {other}"
                        )))
                    }
                },
            },
            _ => unreachable!("keys_of accepted {kind}"),
        };
        Ok(Rope { theta, scaling })
    }

    /// Writes `rope_theta` and (unless plain) `rope_scaling` into a `config.json` object.
    pub fn write_hf_json(&self, obj: &mut Map<String, Value>) {
        obj.insert("rope_theta".into(), json!(self.theta));
        let scaling = match &self.scaling {
            RopeScaling::Default => return,
            RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
            RopeScaling::Dynamic { factor } => json!({"rope_type": "dynamic", "factor": factor}),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                truncate,
            } => {
                let mut m = Map::new();
                m.insert("rope_type".into(), json!("yarn"));
                m.insert("factor".into(), json!(factor));
                m.insert(
                    "original_max_position_embeddings".into(),
                    json!(original_max_position_embeddings),
                );
                for (k, x) in [
                    ("attention_factor", attention_factor),
                    ("beta_fast", beta_fast),
                    ("beta_slow", beta_slow),
                    ("mscale", mscale),
                    ("mscale_all_dim", mscale_all_dim),
                ] {
                    if let Some(x) = x {
                        m.insert(k.into(), json!(x));
                    }
                }
                if let Some(t) = truncate {
                    m.insert("truncate".into(), json!(t));
                }
                Value::Object(m)
            }
        };
        obj.insert("rope_scaling".into(), scaling);
    }

    /// Whether the frequencies depend on the sequence length (dynamic NTK).
    pub fn depends_on_length(&self) -> bool {
        matches!(self.scaling, RopeScaling::Dynamic { .. })
    }

    /// The rotary tables' parameters for a forward call whose largest position is
    /// `seq_len - 1`. Only `dynamic` depends on `seq_len` (as in transformers, which grows the
    /// base once a call passes `max_position_embeddings`).
    pub fn frequencies(
        &self,
        head_dim: usize,
        max_position_embeddings: usize,
        seq_len: usize,
    ) -> RopeFrequencies {
        let dim = head_dim as f64;
        // transformers computes `base ** (arange(0, dim, 2) / dim)` in f32; f64 here, rounded
        // once, agrees to the last bit or two.
        let plain = |base: f64| -> Vec<f64> {
            (0..head_dim / 2)
                .map(|i| 1.0 / base.powf((2 * i) as f64 / dim))
                .collect()
        };
        let (inv, scale) = match &self.scaling {
            RopeScaling::Default => (plain(self.theta), 1.0),
            RopeScaling::Linear { factor } => (
                plain(self.theta).into_iter().map(|f| f / factor).collect(),
                1.0,
            ),
            RopeScaling::Dynamic { factor } => {
                let max = max_position_embeddings as f64;
                let len = (seq_len as f64).max(max);
                let base =
                    self.theta * ((factor * len / max) - (factor - 1.0)).powf(dim / (dim - 2.0));
                (plain(base), 1.0)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                let inv = plain(self.theta)
                    .into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect();
                (inv, 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                truncate,
            } => {
                let get_mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                // Python truthiness: a zero mscale counts as absent, like None.
                let truthy = |x: &Option<f64>| x.filter(|v| *v != 0.0);
                let attention = attention_factor.unwrap_or_else(|| {
                    match (truthy(mscale), truthy(mscale_all_dim)) {
                        (Some(m), Some(a)) => get_mscale(*factor, m) / get_mscale(*factor, a),
                        _ => get_mscale(*factor, 1.0),
                    }
                });
                let beta_fast = truthy(beta_fast).unwrap_or(32.0);
                let beta_slow = truthy(beta_slow).unwrap_or(1.0);
                let orig = *original_max_position_embeddings as f64;
                let correction_dim = |rotations: f64| {
                    (dim * (orig / (rotations * 2.0 * std::f64::consts::PI)).ln())
                        / (2.0 * self.theta.ln())
                };
                let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
                if truncate.unwrap_or(true) {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let mut high = high.min(dim - 1.0);
                if low == high {
                    high += 0.001;
                }
                let inv = plain(self.theta)
                    .into_iter()
                    .enumerate()
                    .map(|(i, extrapolation)| {
                        let interpolation = extrapolation / factor;
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation_share = 1.0 - ramp;
                        interpolation * (1.0 - extrapolation_share)
                            + extrapolation * extrapolation_share
                    })
                    .collect();
                (inv, attention)
            }
        };
        RopeFrequencies {
            inv_freq: inv.into_iter().map(|f| f as f32).collect(),
            attention_scaling: scale as f32,
        }
    }
}

/// Settings nested per layer type (`{"full_attention": {...}, "sliding_attention": {...}}`)
/// are accepted only when every layer type has the same ones.
fn flatten_per_layer(
    m: Option<&Map<String, Value>>,
    name: &str,
    config: &Value,
    err: &dyn Fn(String) -> ModelError,
) -> Result<Option<Map<String, Value>>, ModelError> {
    let Some(m) = m else { return Ok(None) };
    let layer_types: Vec<&str> = config
        .get("layer_types")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let nested: Vec<&Value> = m
        .iter()
        .filter(|(k, _)| layer_types.contains(&k.as_str()))
        .map(|(_, x)| x)
        .collect();
    if nested.is_empty() {
        return Ok(Some(m.clone()));
    }
    if nested.len() != m.len() || nested.windows(2).any(|w| w[0] != w[1]) {
        return Err(err(format!(
            "{name} differs per layer type ({}); per-layer RoPE settings are not supported",
            m.keys().cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    match nested[0] {
        Value::Object(o) => Ok(Some(o.clone())),
        other => Err(err(format!(
            "{name} entries must be objects, found {other}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<Rope, String> {
        Rope::from_hf_json(&v, 2048, Path::new("/m/config.json")).map_err(|e| e.to_string())
    }

    #[test]
    fn every_spelling_of_the_same_settings_agrees() {
        let llama3 = |extra: Value| {
            let mut v = json!({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192});
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            v
        };
        let new = parse(json!({"rope_parameters": llama3(json!({"rope_type": "llama3", "rope_theta": 500000.0}))})).unwrap();
        let old = parse(
            json!({"rope_theta": 500000.0, "rope_scaling": llama3(json!({"rope_type": "llama3"}))}),
        )
        .unwrap();
        let older = parse(
            json!({"rope_theta": 500000.0, "rope_scaling": llama3(json!({"type": "llama3"}))}),
        )
        .unwrap();
        assert_eq!(new, old);
        assert_eq!(new, older);
        assert_eq!(new.theta, 500000.0);
        // Written back in the old form, read again: the same settings.
        let mut obj = Map::new();
        new.write_hf_json(&mut obj);
        assert_eq!(parse(Value::Object(obj)).unwrap(), new);
        // transformers 5's default form.
        let plain =
            parse(json!({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})).unwrap();
        assert_eq!(plain, Rope::plain(1e6));
        assert_eq!(parse(json!({})).unwrap(), Rope::plain(10_000.0));
    }

    #[test]
    fn what_changes_the_math_and_is_not_understood_is_refused() {
        for (v, want) in [
            (
                json!({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}),
                "\"longrope\"",
            ),
            (json!({"rope_scaling": {"type": "su"}}), "\"su\""),
            (
                json!({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}),
                "needs rope_parameters.factor",
            ),
            (
                json!({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "factor": 2.0}}),
                "rope_parameters.factor is not a setting",
            ),
            (
                json!({"rope_theta": 1e4, "rope_parameters": {"rope_theta": 5e5}}),
                "rope_theta is 10000",
            ),
            (
                json!({"partial_rotary_factor": 0.5}),
                "partial_rotary_factor = 0.5",
            ),
            (
                json!({"rope_parameters": {"rope_type": "linear", "factor": 2.0}, "rope_scaling": {"type": "linear", "factor": 4.0}}),
                "disagree",
            ),
            (
                json!({"rope_scaling": {"rope_type": "linear", "type": "dynamic", "factor": 2.0}}),
                "keep one",
            ),
            (
                json!({"layer_types": ["full_attention", "sliding_attention"], "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 1e4},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e6}}}),
                "differs per layer type",
            ),
        ] {
            let e = parse(v).unwrap_err();
            assert!(e.contains(want) && e.contains("/m/config.json"), "{e}");
        }
        // Nested but identical per layer type is fine.
        let r = parse(
            json!({"layer_types": ["full_attention"], "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1e6}}}),
        )
        .unwrap();
        assert_eq!(r, Rope::plain(1e6));
    }

    #[test]
    fn frequencies_follow_transformers_formulas() {
        let d = 16;
        let plain = Rope::plain(10_000.0).frequencies(d, 2048, 10);
        assert_eq!(plain.inv_freq.len(), 8);
        assert_eq!(plain.inv_freq[0], 1.0);
        assert_eq!(plain.attention_scaling, 1.0);
        let linear = Rope {
            theta: 10_000.0,
            scaling: RopeScaling::Linear { factor: 4.0 },
        }
        .frequencies(d, 2048, 10);
        for (a, b) in linear.inv_freq.iter().zip(&plain.inv_freq) {
            assert!((a * 4.0 - b).abs() < 1e-7);
        }
        // Dynamic equals plain up to max_position_embeddings, then lowers every frequency
        // but the first.
        let dynamic = Rope {
            theta: 10_000.0,
            scaling: RopeScaling::Dynamic { factor: 2.0 },
        };
        assert_eq!(dynamic.frequencies(d, 32, 32), plain);
        let long = dynamic.frequencies(d, 32, 64);
        assert_eq!(long.inv_freq[0], 1.0);
        assert!(long.inv_freq[1..]
            .iter()
            .zip(&plain.inv_freq[1..])
            .all(|(a, b)| a < b));
        // YaRN's default attention factor is 0.1 ln(factor) + 1.
        let yarn = Rope {
            theta: 10_000.0,
            scaling: RopeScaling::Yarn {
                factor: 4.0,
                original_max_position_embeddings: 32,
                attention_factor: None,
                beta_fast: None,
                beta_slow: None,
                mscale: None,
                mscale_all_dim: None,
                truncate: None,
            },
        }
        .frequencies(d, 128, 10);
        assert!((yarn.attention_scaling as f64 - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-6);
        assert_eq!(
            yarn.inv_freq[0], 1.0,
            "the fastest frequency is extrapolated"
        );
        assert!(
            (yarn.inv_freq[7] * 4.0 - plain.inv_freq[7]).abs() < 1e-9,
            "the slowest is interpolated"
        );
    }
}
