//! LoRA adapters as PEFT saves them (`adapter_config.json` + `adapter_model.safetensors`),
//! applied to a loaded model by merging: `W += (lora_alpha / r) * B @ A` for every targeted
//! projection, which is what PEFT's forward computes (`x A^T B^T * scale` added to `x W^T`).
//!
//! Only plain LoRA is applied. Every adapter setting that changes the computation and is not
//! plain LoRA (DoRA, rsLoRA, bias training, other target modules, per-layer ranks, ...) is an
//! error naming the setting, never ignored. Settings that only shape training or
//! initialisation (`lora_dropout`, `init_lora_weights`, `loftq_config`, ...) are accepted.

use super::projection::Proj;
use super::ModelError;
use candle_core::{DType, Device, Tensor, Var};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tsr_base::fsio;

/// Settings with no effect on a saved adapter's computation.
const NEUTRAL: [&str; 16] = [
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "init_lora_weights",
    "lora_dropout",
    "task_type",
    "peft_version",
    "auto_mapping",
    "megatron_core",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "qalora_group_size",
    "layers_pattern",
    "target_modules",
];

/// A LoRA adapter read from a PEFT folder.
#[derive(Debug)]
pub struct LoraAdapter {
    pub dir: PathBuf,
    pub r: usize,
    pub alpha: f64,
    /// Targeted projections (`q_proj`, ...).
    pub targets: Vec<String>,
    /// Base weight name (`model.layers.0.self_attn.q_proj.weight`) -> (A [r, in], B [out, r]).
    pub factors: BTreeMap<String, (Tensor, Tensor)>,
}

impl LoraAdapter {
    /// Checks that the factors of `name` fit a weight of `dims` (`[out, in]`), or that there is
    /// no such weight (`None`), naming the adapter and the tensor.
    fn check_fits(&self, name: &str, dims: Option<&[usize]>) -> Result<(), ModelError> {
        let bad = |msg: String| ModelError::Adapter {
            path: self.dir.clone(),
            msg,
        };
        let Some(&[out, inp]) = dims else {
            return Err(bad(format!(
                "adapts {name}, which this model does not have (an adapter for another model?)"
            )));
        };
        let (a, b) = &self.factors[name];
        if a.dims() != [self.r, inp] || b.dims() != [out, self.r] {
            return Err(bad(format!(
                "{name}: lora_A {:?} and lora_B {:?} do not fit the weight [{out}, {inp}] (an adapter for another model?)",
                a.dims(),
                b.dims()
            )));
        }
        Ok(())
    }

    /// `alpha / r`: PEFT's scale for plain LoRA.
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
        let weights = dir.join("adapter_model.safetensors");
        if !weights.is_file() {
            return Err(ModelError::Adapter {
                path: dir.to_path_buf(),
                msg: "adapter_model.safetensors is missing (adapter_model.bin, PyTorch's pickle format, is not read: save with safe_serialization)".into(),
            });
        }
        Self::from_parts(dir, &text, &weights, device)
    }

    /// An adapter from the text of its `adapter_config.json` and its safetensors file; `dir`
    /// names it in errors.
    pub fn from_parts(
        dir: &Path,
        text: &str,
        weights: &Path,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let bad = |msg: String| ModelError::Adapter {
            path: dir.to_path_buf(),
            msg,
        };
        let cfg: serde_json::Map<String, Value> = serde_json::from_str(text)
            .map_err(|e| bad(format!("adapter_config.json is not a JSON object: {e}")))?;
        match cfg.get("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            other => {
                return Err(bad(format!(
                    "peft_type is {}; tsr applies LoRA adapters (\"LORA\") only",
                    other.map(|s| format!("{s:?}")).unwrap_or("missing".into())
                )))
            }
        }
        let r = cfg
            .get("r")
            .and_then(Value::as_u64)
            .filter(|r| *r > 0)
            .ok_or_else(|| bad("`r` must be a positive integer".into()))? as usize;
        let alpha = cfg
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| bad("`lora_alpha` must be a number".into()))?;
        for (key, value) in &cfg {
            if NEUTRAL.contains(&key.as_str())
                || ["peft_type", "r", "lora_alpha"].contains(&key.as_str())
            {
                continue;
            }
            let plain = match (key.as_str(), value) {
                ("bias", Value::String(s)) => s == "none",
                (_, Value::Null | Value::Bool(false)) => true,
                (_, Value::Object(o)) => o.is_empty(),
                (_, Value::Array(a)) => a.is_empty(),
                _ => false,
            };
            if !plain {
                let what = match key.as_str() {
                    "use_dora" => " (DoRA)".to_string(),
                    "use_rslora" => " (rank-stabilised LoRA scales by alpha / sqrt(r))".into(),
                    "bias" | "lora_bias" => " (trained biases)".into(),
                    "modules_to_save" => " (fully trained extra modules)".into(),
                    "rank_pattern" | "alpha_pattern" => " (per-layer ranks or alphas)".into(),
                    "layers_to_transform" => " (only some layers adapted)".into(),
                    "fan_in_fan_out" => " (transposed weights)".into(),
                    _ => String::new(),
                };
                return Err(bad(format!(
                    "setting `{key}` = {value}{what} is not supported; tsr applies plain LoRA (W + lora_alpha / r * B A) to {}",
                    Proj::names()
                )));
            }
        }
        let targets: Vec<String> = match cfg.get("target_modules") {
            Some(Value::Array(list)) => list
                .iter()
                .map(|v| {
                    let name = v.as_str().unwrap_or_default();
                    if Proj::named(name).is_some() {
                        Ok(name.to_string())
                    } else {
                        Err(bad(format!(
                            "target module {v} is not supported; tsr adapts {}",
                            Proj::names()
                        )))
                    }
                })
                .collect::<Result<_, _>>()?,
            Some(Value::String(s)) if s == "all-linear" => {
                Proj::ALL.iter().map(|p| p.name().to_string()).collect()
            }
            Some(other) => {
                return Err(bad(format!(
                    "target_modules {other} is not supported: give a list of module names ({})",
                    Proj::names()
                )))
            }
            None => return Err(bad("target_modules is missing".into())),
        };
        let mut a_of: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut b_of: BTreeMap<String, Tensor> = BTreeMap::new();
        for (name, t) in super::load_hf::read_safetensors(weights)? {
            // PEFT names factors `base_model.model.<module>`; an adapter saved on a bare
            // `LlamaModel` (no LM head) lacks the inner `model.`.
            let module_name = name.strip_prefix("base_model.model.").map(|rest| {
                if rest.starts_with("layers.") {
                    format!("model.{rest}")
                } else {
                    rest.to_string()
                }
            });
            let parsed = module_name.as_deref().and_then(|rest| {
                for (which, suffix) in [
                    ('A', ".lora_A.weight"),
                    ('B', ".lora_B.weight"),
                    ('A', ".lora_A.default.weight"),
                    ('B', ".lora_B.default.weight"),
                ] {
                    if let Some(module) = rest.strip_suffix(suffix) {
                        return Some((which, module.to_string()));
                    }
                }
                None
            });
            let Some((which, module)) = parsed else {
                return Err(bad(format!(
                    "tensor {name:?} is not a LoRA factor (lora_A / lora_B of a projection); tsr applies plain LoRA only"
                )));
            };
            let proj = module.rsplit('.').next().unwrap_or_default();
            if !targets.iter().any(|t| t == proj) {
                return Err(bad(format!(
                    "tensor {name:?} adapts `{proj}`, which target_modules does not list"
                )));
            }
            let t = t.to_dtype(DType::F32)?.to_device(device)?;
            let base = format!("{module}.weight");
            if which == 'A' {
                a_of.insert(base, t);
            } else {
                b_of.insert(base, t);
            }
        }
        let mut factors = BTreeMap::new();
        for (base, a) in a_of {
            let b = b_of
                .remove(&base)
                .ok_or_else(|| bad(format!("{base}: lora_A has no lora_B")))?;
            if a.rank() != 2 || b.rank() != 2 || a.dims()[0] != r || b.dims()[1] != r {
                return Err(bad(format!(
                    "{base}: lora_A {:?} and lora_B {:?} do not have rank r = {r}",
                    a.dims(),
                    b.dims()
                )));
            }
            factors.insert(base, (a, b));
        }
        if let Some(base) = b_of.keys().next() {
            return Err(bad(format!("{base}: lora_B has no lora_A")));
        }
        if factors.is_empty() {
            return Err(bad("adapter_model.safetensors holds no LoRA factors".into()));
        }
        Ok(LoraAdapter {
            dir: dir.to_path_buf(),
            r,
            alpha,
            targets,
            factors,
        })
    }
}

impl super::LanguageModel {
    /// Merges `adapter` into the weights: `W += scale * B @ A` for each adapted projection.
    /// Every factor must name a projection of this model with matching shapes.
    pub fn merge_lora(&self, adapter: &LoraAdapter) -> Result<(), ModelError> {
        let vars: BTreeMap<String, candle_core::Var> = self.vars().into_iter().collect();
        // Check everything before changing anything.
        for name in adapter.factors.keys() {
            adapter.check_fits(name, vars.get(name).map(|w| w.dims()))?;
        }
        for (name, (a, b)) in &adapter.factors {
            let w = &vars[name];
            let delta = (b.matmul(a)? * adapter.scale())?.to_dtype(w.as_tensor().dtype())?;
            w.set(&(w.as_tensor() + delta)?)?;
        }
        Ok(())
    }
}

/// Trainable LoRA factors over a frozen base (PEFT's `is_trainable`): what DPO updates when a
/// model trains an adapter.
#[derive(Debug)]
pub struct LoraState {
    pub r: usize,
    pub alpha: f64,
    pub targets: Vec<String>,
    /// Base weight name -> (A `[r, in]`, B `[out, r]`).
    pub factors: BTreeMap<String, (Var, Var)>,
    /// Dropout on the adapter's input while training (PEFT's `lora_dropout`); applied only
    /// while a mask seed is set (see [`super::LanguageModel::set_lora_dropout_seed`]).
    pub dropout: f64,
    pub(crate) dropout_seed: std::sync::Mutex<Option<u64>>,
}

impl LoraState {
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// The factors as named `Var`s (`<base>.lora_A`, `<base>.lora_B`), sorted by name.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let base = |n: &str| n.strip_suffix(".weight").unwrap_or(n).to_string();
        let mut v: Vec<(String, Var)> = self
            .factors
            .iter()
            .flat_map(|(n, (a, b))| {
                [
                    (format!("{}.lora_A", base(n)), a.clone()),
                    (format!("{}.lora_B", base(n)), b.clone()),
                ]
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub(crate) fn deep_copy(&self) -> Result<Self, ModelError> {
        let mut factors = BTreeMap::new();
        for (n, (a, b)) in &self.factors {
            factors.insert(
                n.clone(),
                (
                    Var::from_tensor(&a.as_tensor().copy()?)?,
                    Var::from_tensor(&b.as_tensor().copy()?)?,
                ),
            );
        }
        Ok(LoraState {
            r: self.r,
            alpha: self.alpha,
            targets: self.targets.clone(),
            factors,
            dropout: self.dropout,
            dropout_seed: std::sync::Mutex::new(*self.dropout_seed.lock().expect("seed lock")),
        })
    }

    /// The factors as a PEFT-loadable adapter (`merge_lora` applies it).
    pub fn to_adapter(&self, dir: &Path) -> LoraAdapter {
        LoraAdapter {
            dir: dir.to_path_buf(),
            r: self.r,
            alpha: self.alpha,
            targets: self.targets.clone(),
            factors: self
                .factors
                .iter()
                .map(|(n, (a, b))| (n.clone(), (a.as_tensor().detach(), b.as_tensor().detach())))
                .collect(),
        }
    }
}

/// What `tsr dpo --lora` asks for: a new adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    pub targets: Vec<String>,
    /// Dropout on the adapter's input while training.
    pub dropout: f64,
}

impl std::str::FromStr for LoraSpec {
    type Err = String;
    /// `r=16,alpha=32[,dropout=0.05][,targets=q_proj+v_proj]` (targets default to every
    /// projection).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut r = None;
        let mut alpha = None;
        let mut dropout = 0.0;
        let mut targets: Vec<String> = Proj::ALL.iter().map(|p| p.name().to_string()).collect();
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}`: expected key=value, e.g. r=16,alpha=32"))?;
            match k.trim() {
                "r" => {
                    r = Some(
                        v.trim()
                            .parse::<usize>()
                            .ok()
                            .filter(|r| *r > 0)
                            .ok_or("r must be a positive integer")?,
                    )
                }
                "alpha" => {
                    alpha = Some(
                        v.trim()
                            .parse::<f64>()
                            .ok()
                            .filter(|a| a.is_finite() && *a > 0.0)
                            .ok_or("alpha must be a positive number")?,
                    )
                }
                "dropout" => {
                    dropout = v
                        .trim()
                        .parse::<f64>()
                        .ok()
                        .filter(|p| (0.0..1.0).contains(p))
                        .ok_or("dropout must be a number in [0, 1)")?
                }
                "targets" => {
                    targets = v.split('+').map(|t| t.trim().to_string()).collect();
                    if let Some(t) = targets.iter().find(|t| Proj::named(t).is_none()) {
                        return Err(format!(
                            "target `{t}` is not a projection tsr adapts ({})",
                            Proj::names()
                        ));
                    }
                }
                other => {
                    return Err(format!(
                        "unknown LoRA setting `{other}` (r, alpha, dropout, targets)"
                    ))
                }
            }
        }
        let r = r.ok_or("give the rank, e.g. r=16")?;
        Ok(LoraSpec {
            r,
            alpha: alpha.unwrap_or(2.0 * r as f64),
            targets,
            dropout,
        })
    }
}

impl super::LanguageModel {
    /// The same model with a new trainable adapter over its (now frozen) weights, initialised
    /// as PEFT does by default: A Kaiming-uniform (`U(-1/sqrt(in), 1/sqrt(in))`, drawn from a
    /// ChaCha8 generator seeded with `seed`), B zero, so the model computes what it did.
    pub fn with_new_lora(mut self, spec: &LoraSpec, seed: u64) -> Result<Self, ModelError> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let vars: BTreeMap<String, Var> = self.vars().into_iter().collect();
        let mut factors = BTreeMap::new();
        for layer in 0..self.config().num_hidden_layers {
            for proj in Proj::ALL {
                if !spec.targets.iter().any(|t| t == proj.name()) {
                    continue;
                }
                let name = proj.weight_name(layer);
                let (out, inp) = vars[&name].as_tensor().dims2()?;
                let bound = 1.0 / (inp as f64).sqrt();
                let a: Vec<f32> = (0..spec.r * inp)
                    .map(|_| rng.gen_range(-bound..bound) as f32)
                    .collect();
                let a = Tensor::from_vec(a, (spec.r, inp), self.device())?;
                let b = Tensor::zeros((out, spec.r), DType::F32, self.device())?;
                factors.insert(name, (Var::from_tensor(&a)?, Var::from_tensor(&b)?));
            }
        }
        self.lora = Some(LoraState {
            r: spec.r,
            alpha: spec.alpha,
            targets: spec.targets.clone(),
            factors,
            dropout: spec.dropout,
            dropout_seed: std::sync::Mutex::new(None),
        });
        Ok(self)
    }

    /// The same model training `adapter` further (PEFT's `is_trainable`): it computes what the
    /// base with the adapter computes.
    pub fn with_trainable_adapter(mut self, adapter: &LoraAdapter) -> Result<Self, ModelError> {
        let vars: BTreeMap<String, Var> = self.vars().into_iter().collect();
        let mut factors = BTreeMap::new();
        for (name, (a, b)) in &adapter.factors {
            adapter.check_fits(name, vars.get(name).map(|w| w.dims()))?;
            factors.insert(
                name.clone(),
                (Var::from_tensor(&a.copy()?)?, Var::from_tensor(&b.copy()?)?),
            );
        }
        self.lora = Some(LoraState {
            r: adapter.r,
            alpha: adapter.alpha,
            targets: adapter.targets.clone(),
            factors,
            dropout: 0.0,
            dropout_seed: std::sync::Mutex::new(None),
        });
        Ok(self)
    }

    /// Trains the adapter with dropout `p` on its input (PEFT's `lora_dropout`); masks are
    /// drawn only while a seed is set, so inference and evaluation never drop.
    pub fn with_lora_dropout(mut self, p: f64) -> Result<Self, ModelError> {
        let bad = |msg: String| ModelError::Adapter {
            path: PathBuf::from("<in-memory model>"),
            msg,
        };
        if !(0.0..1.0).contains(&p) {
            return Err(bad(format!("LoRA dropout {p} is not in [0, 1)")));
        }
        let l = self
            .lora
            .as_mut()
            .ok_or_else(|| bad("LoRA dropout needs a trainable adapter".into()))?;
        l.dropout = p;
        Ok(self)
    }

    /// The seed of the dropout masks for the next training forward passes (`None`: no
    /// dropout). Each projection of each layer draws its own mask from it, so a pass is a
    /// function of the seed alone.
    pub fn set_lora_dropout_seed(&self, seed: Option<u64>) {
        if let Some(l) = &self.lora {
            *l.dropout_seed.lock().expect("seed lock") = seed;
        }
    }

    /// A copy with the trainable factors merged into plain weights (no adapter).
    pub fn merged(&self) -> Result<Self, ModelError> {
        let mut m = self.clone_weights()?;
        if let Some(l) = m.lora.take() {
            m.merge_lora(&l.to_adapter(Path::new("<in-memory adapter>")))?;
        }
        Ok(m)
    }

    /// Writes the trainable adapter as a PEFT folder (`adapter_config.json`,
    /// `adapter_model.safetensors` with PEFT's tensor names), whole or not at all.
    pub fn save_peft_adapter(&self, out: &Path, force: bool) -> Result<(), ModelError> {
        let l = self.lora.as_ref().ok_or_else(|| ModelError::Adapter {
            path: out.to_path_buf(),
            msg: "this model has no trainable adapter to save".into(),
        })?;
        let config = serde_json::to_vec_pretty(&l.peft_config()).expect("json");
        write_peft_folder(out, force, &config, |w| {
            l.write_safetensors(w, &BTreeMap::new())
        })
    }

    /// Streams the trainable adapter as the store holds a model made by LoRA training: PEFT's
    /// `adapter_model.safetensors` whose metadata also carries the adapter's
    /// `adapter_config.json` and the digest of the base it adapts, so the digest of these bytes
    /// identifies base and adapter together.
    pub fn write_adapter_blob(
        &self,
        w: &mut (impl std::io::Write + ?Sized),
        base_digest: &str,
    ) -> Result<(), ModelError> {
        let l = self.lora.as_ref().ok_or_else(|| ModelError::Adapter {
            path: PathBuf::from("<in-memory model>"),
            msg: "this model has no trainable adapter to store".into(),
        })?;
        let meta = BTreeMap::from([
            (META_KIND.to_string(), "lora".to_string()),
            (META_VERSION.to_string(), ADAPTER_VERSION.to_string()),
            (
                META_CONFIG.to_string(),
                serde_json::to_string(&l.peft_config()).expect("json"),
            ),
            (META_BASE.to_string(), base_digest.to_string()),
        ]);
        l.write_safetensors(w, &meta)
    }
}

/// Metadata keys of a stored adapter (see [`super::LanguageModel::write_adapter_blob`]).
const META_KIND: &str = "tsr.adapter";
const META_VERSION: &str = "tsr.adapter_version";
/// The version of the stored adapter's layout this build writes and reads.
const ADAPTER_VERSION: &str = "1";
const META_CONFIG: &str = "tsr.adapter_config";
const META_BASE: &str = "tsr.base_digest";

impl LoraState {
    /// The `adapter_config.json` PEFT reads for these factors.
    fn peft_config(&self) -> Value {
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.r,
            "lora_alpha": self.alpha,
            "target_modules": self.targets,
            "lora_dropout": self.dropout,
            "bias": "none",
            "fan_in_fan_out": false,
            "use_dora": false,
            "use_rslora": false,
            "modules_to_save": null,
            "init_lora_weights": true,
            "inference_mode": true,
            "base_model_name_or_path": null,
        })
    }

    /// The factors under PEFT's tensor names (sorted), as f32 safetensors bytes.
    fn write_safetensors(
        &self,
        w: &mut (impl std::io::Write + ?Sized),
        meta: &BTreeMap<String, String>,
    ) -> Result<(), ModelError> {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (n, (a, b)) in &self.factors {
            let base = n.strip_suffix(".weight").unwrap_or(n);
            tensors.push((
                format!("base_model.model.{base}.lora_A.weight"),
                a.as_tensor().detach(),
            ));
            tensors.push((
                format!("base_model.model.{base}.lora_B.weight"),
                b.as_tensor().detach(),
            ));
        }
        tensors.sort_by(|x, y| x.0.cmp(&y.0));
        let named: Vec<(String, &Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
        super::save::write_safetensors_f32(&named, meta, w)
    }
}

/// Writes a PEFT folder (`adapter_config.json` = `config`, `adapter_model.safetensors` from
/// `weights`), whole or not at all; only a previous adapter folder is replaced (with `force`).
fn write_peft_folder(
    out: &Path,
    force: bool,
    config: &[u8],
    weights: impl FnOnce(&mut dyn std::io::Write) -> Result<(), ModelError>,
) -> Result<(), ModelError> {
    let replaceable = |n: &str| {
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            "README.md",
        ]
        .contains(&n)
    };
    super::export::write_folder_whole(out, force, "PEFT adapter folder", &replaceable, |dir| {
        let cfg_path = dir.join("adapter_config.json");
        std::fs::write(&cfg_path, config).map_err(|e| ModelError::io(&cfg_path, e))?;
        fsio::create_synced(&dir.join("adapter_model.safetensors"), weights)?;
        std::fs::File::open(&cfg_path)
            .and_then(|f| f.sync_all())
            .map_err(|e| ModelError::io(&cfg_path, e))?;
        Ok(())
    })
}

/// What the header of a stored adapter says (see
/// [`super::LanguageModel::write_adapter_blob`]).
#[derive(Clone, Debug)]
pub struct StoredAdapter {
    /// The adapter's `adapter_config.json` text.
    pub config: String,
    /// Digest of the base model's weights the adapter applies to.
    pub base_digest: String,
    /// `r` and `lora_alpha` from the config.
    pub r: u64,
    pub alpha: f64,
}

impl StoredAdapter {
    /// The base's digest shortened as tsr prints digests.
    pub fn short_base(&self) -> &str {
        &self.base_digest[..12]
    }

    /// Reads the header of the stored adapter at `path`; a file that is not one is an error
    /// naming it.
    pub fn read(path: &Path) -> Result<Self, ModelError> {
        use std::io::Read;
        let bad = |msg: String| ModelError::Adapter {
            path: path.to_path_buf(),
            msg,
        };
        let mut f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len)
            .map_err(|_| bad("too short for a safetensors header".into()))?;
        let n = u64::from_le_bytes(len);
        if n > 64 << 20 {
            return Err(bad(format!(
                "safetensors header of {n} bytes is not plausible"
            )));
        }
        let mut header = vec![0u8; n as usize];
        f.read_exact(&mut header)
            .map_err(|_| bad("safetensors header is cut short".into()))?;
        let header: Value = serde_json::from_slice(&header)
            .map_err(|e| bad(format!("safetensors header is not JSON: {e}")))?;
        let meta = header.get("__metadata__").cloned().unwrap_or(Value::Null);
        let get = |k: &str| meta.get(k).and_then(Value::as_str).map(str::to_string);
        if get(META_KIND).as_deref() != Some("lora") {
            return Err(bad(
                "is not a LoRA adapter as tsr stores them (no `tsr.adapter` metadata); the model's weights file was expected to be an adapter because the model has a base".into(),
            ));
        }
        match get(META_VERSION).as_deref() {
            Some(ADAPTER_VERSION) => {}
            Some(v) => {
                return Err(bad(format!(
                    "is a stored adapter of format version {v}; this build reads version {ADAPTER_VERSION} (a newer tsr wrote it?)"
                )))
            }
            None => return Err(bad("metadata lacks the adapter's format version".into())),
        }
        let config =
            get(META_CONFIG).ok_or_else(|| bad("metadata lacks the adapter config".into()))?;
        let base_digest =
            get(META_BASE).ok_or_else(|| bad("metadata lacks the base model's digest".into()))?;
        if base_digest.len() != 64 || !base_digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(format!(
                "the base model's digest {base_digest:?} in the metadata is not a blake3 hex digest"
            )));
        }
        let cfg: Value = serde_json::from_str(&config)
            .map_err(|e| bad(format!("adapter config in the metadata is not JSON: {e}")))?;
        Ok(StoredAdapter {
            r: cfg.get("r").and_then(Value::as_u64).unwrap_or(0),
            alpha: cfg.get("lora_alpha").and_then(Value::as_f64).unwrap_or(0.0),
            config,
            base_digest,
        })
    }

    /// The adapter at `path` (a stored adapter), checked to apply to the base whose weights
    /// digest is `base_digest`.
    pub fn load(
        path: &Path,
        base_digest: &str,
        device: &Device,
    ) -> Result<LoraAdapter, ModelError> {
        let meta = Self::read(path)?;
        if meta.base_digest != base_digest {
            return Err(ModelError::Adapter {
                path: path.to_path_buf(),
                msg: format!(
                    "adapts the base model {}, not the base {} it is given with",
                    meta.short_base(),
                    short(base_digest)
                ),
            });
        }
        LoraAdapter::from_parts(path, &meta.config, path, device)
    }

    /// Writes the stored adapter at `path` as a PEFT folder `out` (PEFT's `PeftModel.from_pretrained`
    /// loads it onto the base model).
    pub fn export(path: &Path, out: &Path, force: bool) -> Result<(), ModelError> {
        let meta = Self::read(path)?;
        let cfg: Value = serde_json::from_str(&meta.config).expect("checked by read");
        let config = serde_json::to_vec_pretty(&cfg).expect("json");
        write_peft_folder(out, force, &config, |w| {
            let mut f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
            std::io::copy(&mut f, w).map_err(|e| ModelError::io(path, e))?;
            Ok(())
        })
    }
}

fn short(d: &str) -> &str {
    d.get(..12).unwrap_or(d)
}

/// Streams the canonical weights of a base model (the canonical safetensors file `base`) with
/// `adapter` merged in (`W += scale * B A`): the model a base plus an adapter computes, as one
/// file for tools that take plain weights.
pub fn write_merged(
    base: &Path,
    adapter: &LoraAdapter,
    w: &mut (impl std::io::Write + ?Sized),
) -> Result<(), ModelError> {
    let mut tensors = super::load_hf::read_safetensors(base)?;
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    for name in adapter.factors.keys() {
        let dims = tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.dims());
        adapter.check_fits(name, dims)?;
    }
    let mut merged = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.to_dtype(DType::F32)?;
        let t = match adapter.factors.get(&name) {
            Some((a, b)) => {
                adapter.check_fits(&name, Some(t.dims()))?;
                (&t + (b.matmul(a)? * adapter.scale())?)?
            }
            None => t,
        };
        merged.push((name, t));
    }
    let named: Vec<(String, &Tensor)> = merged.iter().map(|(n, t)| (n.clone(), t)).collect();
    super::save::write_safetensors_f32(&named, &BTreeMap::new(), w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_adapter_names_its_base_and_is_refused_on_another() {
        let dir = tempfile::tempdir().unwrap();
        let spec: LoraSpec = "r=2,alpha=4,targets=q_proj+v_proj".parse().unwrap();
        let m = crate::testing::tiny_model(dir.path(), 3)
            .with_new_lora(&spec, 1)
            .unwrap();
        let base = "ab".repeat(32);
        let path = dir.path().join("adapter.safetensors");
        let mut f = std::fs::File::create(&path).unwrap();
        m.write_adapter_blob(&mut f, &base).unwrap();
        drop(f);
        let meta = StoredAdapter::read(&path).unwrap();
        assert_eq!(
            (meta.r, meta.alpha, meta.base_digest.as_str()),
            (2, 4.0, base.as_str())
        );
        let a = StoredAdapter::load(&path, &base, &Device::Cpu).unwrap();
        assert_eq!(a.factors.len(), 2 * m.config().num_hidden_layers);
        let other = "cd".repeat(32);
        let err = StoredAdapter::load(&path, &other, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("abababababab") && err.contains("cdcdcdcdcdcd"),
            "{err}"
        );
        // A plain weights file is not an adapter, and says so.
        let plain = dir.path().join("plain.safetensors");
        let mut f = std::fs::File::create(&plain).unwrap();
        m.write_canonical(&mut f).unwrap();
        drop(f);
        let err = StoredAdapter::read(&plain).unwrap_err().to_string();
        assert!(err.contains("not a LoRA adapter"), "{err}");
        // A digest that is not one is refused (and never sliced).
        let bad = dir.path().join("bad.safetensors");
        let mut f = std::fs::File::create(&bad).unwrap();
        m.write_adapter_blob(&mut f, "é").unwrap();
        drop(f);
        let err = StoredAdapter::read(&bad).unwrap_err().to_string();
        assert!(err.contains("not a blake3 hex digest"), "{err}");
        // An unknown format version is named, not guessed at.
        let mut bytes = std::fs::read(&path).unwrap();
        let key = b"\"tsr.adapter_version\":\"1\"";
        let at = bytes.windows(key.len()).position(|w| w == key).unwrap();
        bytes[at + key.len() - 2] = b'7';
        std::fs::write(&path, &bytes).unwrap();
        let err = StoredAdapter::read(&path).unwrap_err().to_string();
        assert!(err.contains("format version 7"), "{err}");
    }
}
