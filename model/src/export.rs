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
//! fsynced, and swapped into place. A folder that already holds files is refused unless
//! `force`, and even then only a model folder is replaced (never merged into).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::{ChatTokenizer, Config, ModelError};
use tsr_base::fsio;

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

/// Names a model folder holds (Hugging Face layout, as tsr, transformers, PEFT or the hub write
/// them). `--force` replaces only a folder made of these, never a folder of other files.
fn is_model_file(name: &str) -> bool {
    const NAMES: [&str; 14] = [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
        "model.safetensors.index.json",
        "adapter_config.json",
        "README.md",
        ".gitattributes",
    ];
    NAMES.contains(&name)
        || (name.ends_with(".safetensors") && !name.contains('/'))
        || (name.starts_with("pytorch_model") && name.ends_with(".bin"))
}

/// Removes hidden work folders (`.NAME.partial-PID`) that a killed export of the same folder
/// left behind; those of a live process are kept.
fn sweep_stale(parent: &Path, name: &str) {
    let prefix = format!(".{name}.partial-");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = file.strip_prefix(&prefix) else {
            continue;
        };
        let alive = pid
            .parse::<u32>()
            .map(|p| Path::new(&format!("/proc/{p}")).exists())
            .unwrap_or(true);
        if !alive {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Writes a complete folder at `out`: the files of `files` and `model.safetensors` from
/// `weights` (which streams the safetensors bytes).
///
/// `out` must not exist, be an empty folder, or (with `force`) be a model folder: one holding
/// only files a model folder holds (never a folder of other files, the current folder or one
/// above it). The new folder is written beside `out` and swapped in with one atomic exchange,
/// so `out` is at every moment the old folder or the complete new one; the old one is then
/// removed. Where the filesystem cannot exchange, an empty `out` is replaced by a rename.
pub fn export_hf_folder(
    files: &ExportFiles,
    out: &Path,
    force: bool,
    weights: impl FnOnce(&mut dyn Write) -> Result<(), ModelError>,
) -> Result<(), ModelError> {
    write_folder_whole(out, force, "model folder", &is_model_file, |tmp| {
        write_files(files, tmp, weights)
    })
}

/// Writes a complete folder at `out` with `write` (which fills the empty folder it is given).
///
/// `out` must not exist, be an empty folder, or (with `force`) be a `kind` folder: one holding
/// only entries `replaceable` accepts (never a folder of other files, the current folder or one
/// above it). The new folder is written beside `out` and swapped in with one atomic exchange,
/// so `out` is at every moment the old folder or the complete new one; the old one is then
/// removed. Where the filesystem cannot exchange, an empty `out` is replaced by a rename.
pub fn write_folder_whole(
    out: &Path,
    force: bool,
    kind: &str,
    replaceable: &dyn Fn(&str) -> bool,
    write: impl FnOnce(&Path) -> Result<(), ModelError>,
) -> Result<(), ModelError> {
    let refuse = |msg: String| ModelError::Export {
        path: out.to_path_buf(),
        msg,
    };
    let existing: Option<Vec<String>> = match std::fs::symlink_metadata(out) {
        Ok(m) if m.is_dir() => Some(list(out)?),
        Ok(_) => return Err(refuse("exists and is not a folder".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(ModelError::io(out, e)),
    };
    if let Some(names) = &existing {
        if !names.is_empty() && !force {
            return Err(refuse(format!(
                "the folder already holds {} entries; choose an empty or new folder, or pass --force to replace a {kind}",
                names.len()
            )));
        }
        let foreign: Vec<&String> = names.iter().filter(|n| !replaceable(n)).collect();
        if !foreign.is_empty() {
            return Err(refuse(format!(
                "the folder holds files that are not part of a {kind} ({}); --force replaces only a {kind}: choose another folder",
                foreign.iter().take(5).map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            )));
        }
        let here = std::env::current_dir().and_then(|d| d.canonicalize()).ok();
        let target = out.canonicalize().map_err(|e| ModelError::io(out, e))?;
        if here.is_some_and(|h| h.starts_with(&target)) {
            return Err(refuse(
                "is the current folder or one above it; choose another folder".into(),
            ));
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
    sweep_stale(&parent, &name);
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    if let Err(e) = write(&tmp).and_then(|()| {
        // The new folder's entries are durable before it is swapped in.
        Ok(fsio::sync_dir(&tmp)?)
    }) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // Until the swap, `tmp` is the new export and nothing of the user's has moved: any
    // failure up to there removes `tmp` and leaves `out` as it was.
    let fail = |e: ModelError| {
        let _ = std::fs::remove_dir_all(&tmp);
        Err(e)
    };
    let fsync_parent = || -> Result<(), ModelError> { Ok(fsio::sync_dir(&parent)?) };
    match &existing {
        None => {
            if let Err(e) = std::fs::rename(&tmp, out) {
                return fail(ModelError::io(out, e));
            }
        }
        Some(names) => {
            // What was checked is what gets replaced: a file that appeared in `out` while the
            // weights were written is not deleted with it.
            let now = match list(out) {
                Ok(n) => n,
                Err(e) => return fail(e),
            };
            if &now != names {
                return fail(refuse(
                    "the folder changed while the export was written; nothing was replaced".into(),
                ));
            }
            match fsio::exchange(&tmp, out) {
                // `tmp` now holds the replaced folder, which --force asked to replace.
                Ok(true) => {
                    let _ = std::fs::remove_dir_all(&tmp);
                }
                Ok(false) if names.is_empty() => {
                    if let Err(e) = std::fs::remove_dir(out).and_then(|()| std::fs::rename(&tmp, out)) {
                        return fail(ModelError::io(out, e));
                    }
                }
                Ok(false) => {
                    return fail(refuse(
                        format!("this filesystem cannot swap folders atomically, so a {kind} is not replaced in place; remove it or choose another folder"),
                    ))
                }
                Err(e) => return fail(ModelError::io(out, e)),
            }
        }
    }
    // The new folder is in place; this makes the rename itself durable.
    fsync_parent()
}

/// The sorted entry names of a folder.
fn list(dir: &Path) -> Result<Vec<String>, ModelError> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))? {
        let e = e.map_err(|e| ModelError::io(dir, e))?;
        names.push(e.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

fn write_files(
    files: &ExportFiles,
    dir: &Path,
    weights: impl FnOnce(&mut dyn Write) -> Result<(), ModelError>,
) -> Result<(), ModelError> {
    let pretty = |v: &Value| serde_json::to_vec_pretty(v).expect("json value serializes");
    fsio::write_atomic(&dir.join("config.json"), &pretty(&files.config))?;
    fsio::write_atomic(
        &dir.join("generation_config.json"),
        &pretty(&files.generation_config),
    )?;
    fsio::write_atomic(&dir.join("tokenizer.json"), files.tokenizer_json.as_bytes())?;
    fsio::write_atomic(
        &dir.join("tokenizer_config.json"),
        &pretty(&files.tokenizer_config),
    )?;
    fsio::write_atomic(
        &dir.join("chat_template.jinja"),
        files.chat_template.as_bytes(),
    )?;
    fsio::create_synced(&dir.join("model.safetensors"), weights)?;
    Ok(fsio::sync_dir(dir)?)
}
