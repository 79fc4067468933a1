//! Saving in Hugging Face layout and the model digest.
//!
//! The canonical weight bytes are one safetensors file: tensors sorted by name, all f32
//! little-endian, header keys sorted, `{"format": "pt"}` metadata, header padded with spaces to
//! a multiple of 8. A tied `lm_head` is not written (HF convention). The digest is the blake3 hex
//! of exactly these bytes, so two models with equal weights have equal digests whatever their
//! source (GGUF or HF) or compute dtype.
//!
//! Durability: each file is written to a temporary name in the target directory, fsynced and
//! renamed over the final name, then the directory is fsynced. If `save_hf` returns `Ok`, all
//! four files are complete on disk.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use candle_core::DType;
use serde_json::{json, Value};

use super::{LanguageModel, ModelError};
use tsr_base::fsio;

/// Writes to two sinks at once (file + hasher).
struct Tee<'a, A: Write + ?Sized, B: Write>(&'a mut A, &'a mut B);

impl<A: Write + ?Sized, B: Write> Write for Tee<'_, A, B> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write_all(buf)?;
        self.1.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()?;
        self.1.flush()
    }
}

/// Writes the values of `t` as f32 little-endian bytes into `w`, through `buf` (reused across
/// calls; 1 MiB at most). A contiguous f32 CPU tensor is read in place (no copy: a copy of the
/// embedding alone is 113 MB of fresh pages); anything else is converted first. `io` turns a
/// write error into the caller's error type.
pub fn write_f32_le<E: From<candle_core::Error>>(
    t: &candle_core::Tensor,
    w: &mut (impl Write + ?Sized),
    buf: &mut Vec<u8>,
    io: impl Fn(std::io::Error) -> E,
) -> Result<(), E> {
    const CHUNK: usize = 1 << 18;
    let mut put = |chunk: &[f32]| -> Result<(), E> {
        buf.clear();
        for x in chunk {
            buf.extend_from_slice(&x.to_le_bytes());
        }
        w.write_all(buf).map_err(&io)
    };
    if t.dtype() == DType::F32 && t.device().is_cpu() {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            for chunk in cpu.as_slice::<f32>()?[a..b].chunks(CHUNK) {
                put(chunk)?;
            }
            return Ok(());
        }
    }
    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    for chunk in values.chunks(CHUNK) {
        put(chunk)?;
    }
    Ok(())
}

impl LanguageModel {
    /// Names and f32 values of the tensors that make up the canonical file, sorted by name.
    fn canonical_tensors(&self) -> Vec<(String, candle_core::Var)> {
        self.vars()
            .into_iter()
            .filter(|(n, _)| !(self.config.tie_word_embeddings && n == "lm_head.weight"))
            .collect()
    }

    /// Streams the canonical safetensors bytes into `w`.
    pub(crate) fn write_canonical(&self, w: &mut impl Write) -> Result<(), ModelError> {
        if self.lora().is_some() {
            // The model's weights are the base with its factors merged in.
            return self.merged()?.write_canonical(w);
        }
        write_vars(&self.canonical_tensors(), w)
    }

    /// Streams the trainable parameters (the LoRA factors, or every weight) as safetensors
    /// bytes, sorted by name: what a training checkpoint holds.
    pub fn write_trainable(&self, w: &mut impl Write) -> Result<(), ModelError> {
        if self.lora().is_none() {
            return self.write_canonical(w);
        }
        write_vars(&self.trainable_vars(), w)
    }
}

/// `tensors` (sorted by name) as f32 safetensors bytes.
fn write_vars(
    tensors: &[(String, candle_core::Var)],
    w: &mut impl Write,
) -> Result<(), ModelError> {
    let named: Vec<(String, &candle_core::Tensor)> = tensors
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor()))
        .collect();
    write_safetensors_f32(&named, &BTreeMap::new(), w)
}

/// The values of a bf16 or f16 tensor as little-endian bytes, a row block at a time.
fn write_half_le(
    t: &candle_core::Tensor,
    w: &mut (impl Write + ?Sized),
    io: impl Fn(std::io::Error) -> ModelError,
) -> Result<(), ModelError> {
    let flat = t.flatten_all()?;
    let n = flat.elem_count();
    let mut start = 0;
    while start < n {
        let len = (n - start).min(1 << 22);
        let part = flat.narrow(0, start, len)?;
        let bytes: Vec<u8> = match t.dtype() {
            DType::BF16 => part
                .to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
            _ => part
                .to_vec1::<half::f16>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        };
        w.write_all(&bytes).map_err(&io)?;
        start += len;
    }
    Ok(())
}

/// `tensors` (in the order given; callers sort by name) as f32 safetensors bytes, with
/// `{"format": "pt"}` and `metadata` in the header. Header keys are sorted and the bytes depend
/// on nothing but the arguments.
pub(crate) fn write_safetensors_f32(
    tensors: &[(String, &candle_core::Tensor)],
    metadata: &BTreeMap<String, String>,
    w: &mut (impl Write + ?Sized),
) -> Result<(), ModelError> {
    {
        let mut header: BTreeMap<String, Value> = BTreeMap::new();
        let mut meta: BTreeMap<String, String> = metadata.clone();
        meta.insert("format".into(), "pt".into());
        header.insert("__metadata__".into(), json!(meta));
        let mut off = 0usize;
        for (name, var) in tensors {
            // Half-precision tensors (a frozen base held in bf16 or f16) keep their precision;
            // everything else is f32.
            let (tag, size) = match var.dtype() {
                DType::BF16 => ("BF16", 2),
                DType::F16 => ("F16", 2),
                _ => ("F32", 4),
            };
            let n = var.elem_count() * size;
            header.insert(
                name.clone(),
                json!({"dtype": tag, "shape": var.dims(), "data_offsets": [off, off + n]}),
            );
            off += n;
        }
        let mut h = serde_json::to_vec(&header).expect("json header");
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        let io = |e: std::io::Error| ModelError::io("<safetensors stream>", e);
        w.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
        w.write_all(&h).map_err(io)?;
        let mut buf = Vec::with_capacity(1 << 20);
        for (_, t) in tensors {
            match t.dtype() {
                DType::BF16 | DType::F16 => write_half_le(t, w, io)?,
                _ => write_f32_le(t, w, &mut buf, io)?,
            }
        }
        Ok(())
    }
}

impl LanguageModel {
    /// The model's identity: blake3 hex digest of its canonical safetensors bytes (see module doc).
    pub fn digest(&self) -> Result<String, ModelError> {
        let mut hasher = blake3::Hasher::new();
        self.write_canonical(&mut hasher)?;
        Ok(hasher.finalize().to_hex().to_string())
    }

    /// Writes the model as a Hugging Face folder for other tools (transformers, vLLM, PEFT):
    /// see [`super::export`]. A folder that holds files is refused unless `force`.
    pub fn export_hf(&self, out: &Path, force: bool) -> Result<(), ModelError> {
        let files = super::export::ExportFiles::new(&self.config, &self.tokenizer);
        super::export::export_hf_folder(&files, out, force, |w| {
            let mut w = w;
            self.write_canonical(&mut w)
        })
    }

    /// Writes the stored (canonical) form: `config.json`, `model.safetensors`, `tokenizer.json`
    /// and `tokenizer_config.json` (with `chat_template`) into `dir` (created if needed), each
    /// atomically. [`export_hf`](Self::export_hf) is the form for other tools.
    pub fn save_hf(&self, dir: &Path) -> Result<(), ModelError> {
        self.save_hf_with_digest(dir).map(|_| ())
    }

    /// [`save_hf`](Self::save_hf), returning the digest of the weights written (computed while
    /// writing, so it costs no second pass).
    pub fn save_hf_with_digest(&self, dir: &Path) -> Result<String, ModelError> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let mut hasher = blake3::Hasher::new();
        let mut inner_err = None;
        fsio::write_atomic_with(&dir.join("model.safetensors"), |w| {
            let mut tee = Tee(w, &mut hasher);
            self.write_canonical(&mut tee).map_err(|e| {
                let msg = e.to_string();
                inner_err = Some(e);
                std::io::Error::other(msg)
            })
        })
        .map_err(|e| inner_err.take().unwrap_or_else(|| e.into()))?;
        let cfg = serde_json::to_vec_pretty(&self.config.to_hf_json()).expect("json");
        fsio::write_atomic(&dir.join("config.json"), &cfg)?;
        fsio::write_atomic(
            &dir.join("tokenizer.json"),
            self.tokenizer.tokenizer_json().as_bytes(),
        )?;
        let mut tc = self.tokenizer.tokenizer_config().clone();
        tc["chat_template"] = json!(self.tokenizer.chat_template());
        if tc.get("eos_token").is_none() {
            tc["eos_token"] = json!(self.tokenizer.eot_token());
        }
        let tc = serde_json::to_vec_pretty(&tc).expect("json");
        fsio::write_atomic(&dir.join("tokenizer_config.json"), &tc)?;
        Ok(hasher.finalize().to_hex().to_string())
    }
}
