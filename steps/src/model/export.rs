//! Exporting a model as a Hugging Face folder that transformers (4.x and 5.x) and vLLM load
//! exactly as tsr used it.
//!
//! What differs from the stored (canonical) files:
//! - `tokenizer_config.json` names `PreTrainedTokenizerFast`, the class that uses
//!   `tokenizer.json` as written. transformers 5 rebuilds the pre-tokenizer of classes such as
//!   `GPT2Tokenizer` or `LlamaTokenizer` from their own defaults, which drops steps tsr tokenized
//!   with (SmolLM2's digit splitting), so the same text would become other tokens. Keys that
//!   only make sense for those classes and can rewrite the pipeline (`add_prefix_space`,
//!   `add_bos_token`, `add_eos_token`, `legacy`, `auto_map`) are dropped;
//! - the chat template is written both inside `tokenizer_config.json` (transformers 4.x) and as
//!   `chat_template.jinja` (transformers 5);
//! - `generation_config.json` lists every id that ends a turn for tsr (`eos_token_id`), so
//!   `generate` and vLLM stop where tsr stops;
//! - `config.json` carries the weights' dtype under both spellings (`dtype`, `torch_dtype`).
//!
//! The folder appears whole or not at all: files are written into a hidden sibling folder,
//! fsynced, and the folder is renamed into place. A folder that already holds files is refused
//! unless `force` (then it is replaced, never merged).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::save::write_atomic;
use super::{ChatTokenizer, Config, ModelError};

/// Keys of `tokenizer_config.json` that configure a specific tokenizer class and would make
/// `PreTrainedTokenizerFast` (or a later transformers) change the tokenizer.json pipeline.
const CLASS_SPECIFIC_KEYS: [&str; 6] = [
    "add_prefix_space",
    "add_bos_token",
    "add_eos_token",
    "legacy",
    "auto_map",
    "use_default_system_prompt",
];

/// The files of an exported folder, besides the weights.
pub struct ExportFiles {
    pub config: Value,
    pub generation_config: Value,
    pub tokenizer_json: String,
    pub tokenizer_config: Value,
    pub chat_template: String,
}

impl ExportFiles {
    /// What transformers and vLLM need to load `tok` and `config` as tsr uses them.
    pub fn new(config: &Config, tok: &ChatTokenizer) -> Self {
        let mut cfg = config.to_hf_json();
        cfg["dtype"] = json!("float32");
        cfg["torch_dtype"] = json!("float32");
        let mut tc = tok.tokenizer_config().clone();
        if let Some(o) = tc.as_object_mut() {
            for k in CLASS_SPECIFIC_KEYS {
                o.remove(k);
            }
        }
        tc["tokenizer_class"] = json!("PreTrainedTokenizerFast");
        tc["chat_template"] = json!(tok.chat_template());
        tc["eos_token"] = json!(tok.eot_token());
        if let Some(pad) = tok.inner().id_to_token(tok.pad_id()) {
            tc["pad_token"] = json!(pad);
        }
        let stops = tok.stop_ids();
        let mut gen = json!({
            "eos_token_id": if stops.len() == 1 { json!(stops[0]) } else { json!(stops) },
            "pad_token_id": tok.pad_id(),
        });
        if let Some(b) = config.bos_token_id {
            gen["bos_token_id"] = json!(b);
        }
        ExportFiles {
            config: cfg,
            generation_config: gen,
            tokenizer_json: tok.tokenizer_json().to_string(),
            tokenizer_config: tc,
            chat_template: tok.chat_template().to_string(),
        }
    }
}

/// Writes a complete folder at `out`: the files of `files` and `model.safetensors` from
/// `weights` (which streams the safetensors bytes).
pub fn export_hf_folder(
    files: &ExportFiles,
    out: &Path,
    force: bool,
    weights: impl FnOnce(&mut dyn Write) -> Result<(), ModelError>,
) -> Result<(), ModelError> {
    let refuse = |msg: String| ModelError::Export {
        path: out.to_path_buf(),
        msg,
    };
    let existing = match std::fs::symlink_metadata(out) {
        Ok(m) if m.is_dir() => {
            let n = std::fs::read_dir(out)
                .map_err(|e| ModelError::io(out, e))?
                .count();
            Some(n)
        }
        Ok(_) => return Err(refuse("exists and is not a folder".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(ModelError::io(out, e)),
    };
    if let Some(n) = existing {
        if n > 0 && !force {
            return Err(refuse(format!(
                "the folder already holds {n} entries; choose an empty or new folder, or pass --force to replace it"
            )));
        }
    }
    let name = out
        .file_name()
        .ok_or_else(|| refuse("needs a folder name".into()))?
        .to_string_lossy()
        .into_owned();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| ModelError::io(&parent, e))?;
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    let written = write_files(files, &tmp, weights);
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // Swap: an existing folder (empty, or replaced with --force) moves aside first, so `out` is
    // at every moment either the old folder or the complete new one.
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if existing.is_some() {
        std::fs::rename(out, &old).map_err(|e| ModelError::io(out, e))?;
    }
    if let Err(e) = std::fs::rename(&tmp, out) {
        if existing.is_some() {
            let _ = std::fs::rename(&old, out);
        }
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(ModelError::io(out, e));
    }
    if existing.is_some() {
        std::fs::remove_dir_all(&old).map_err(|e| ModelError::io(&old, e))?;
    }
    std::fs::File::open(&parent)
        .and_then(|d| d.sync_all())
        .map_err(|e| ModelError::io(&parent, e))
}

fn write_files(
    files: &ExportFiles,
    dir: &Path,
    weights: impl FnOnce(&mut dyn Write) -> Result<(), ModelError>,
) -> Result<(), ModelError> {
    let pretty = |v: &Value| serde_json::to_vec_pretty(v).expect("json value serializes");
    write_atomic(dir, "config.json", &pretty(&files.config))?;
    write_atomic(
        dir,
        "generation_config.json",
        &pretty(&files.generation_config),
    )?;
    write_atomic(dir, "tokenizer.json", files.tokenizer_json.as_bytes())?;
    write_atomic(
        dir,
        "tokenizer_config.json",
        &pretty(&files.tokenizer_config),
    )?;
    write_atomic(dir, "chat_template.jinja", files.chat_template.as_bytes())?;
    let path = dir.join("model.safetensors");
    let file = std::fs::File::create(&path).map_err(|e| ModelError::io(&path, e))?;
    {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, &file);
        weights(&mut w)?;
        w.flush().map_err(|e| ModelError::io(&path, e))?;
    }
    file.sync_all().map_err(|e| ModelError::io(&path, e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ModelError::io(dir, e))
}
