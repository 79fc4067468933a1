//! Loading a Hugging Face model directory: `config.json`, one or more `*.safetensors` files
//! (sharded through `model.safetensors.index.json`), `tokenizer.json` and
//! `tokenizer_config.json`. The safetensors header is parsed here so a truncated or corrupt file
//! is reported with the file and the first tensor that does not fit.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::{ChatTokenizer, Config, LanguageModel, ModelError};

pub(crate) fn load(dir: &Path, device: &Device, dtype: DType) -> Result<LanguageModel, ModelError> {
    load_opts(dir, device, dtype, false)
}

/// [`load`], keeping half-precision weight matrices in their precision with `keep_half`.
pub(crate) fn load_opts(
    dir: &Path,
    device: &Device,
    dtype: DType,
    keep_half: bool,
) -> Result<LanguageModel, ModelError> {
    let config = config_of(dir)?;
    let tokenizer = ChatTokenizer::from_hf_dir(
        dir,
        config.eos_token_ids.first().copied(),
        &config.eos_token_ids,
    )?;
    let files = weight_files(dir)?;
    let mut tensors = HashMap::new();
    let mut origin: HashMap<String, PathBuf> = HashMap::new();
    for f in &files {
        for (name, t) in read_safetensors(f)? {
            origin.insert(name.clone(), f.clone());
            tensors.insert(name, t);
        }
    }
    // Errors about a tensor name the shard it came from (or the directory when it is missing).
    let path = if files.len() == 1 {
        files[0].clone()
    } else {
        dir.to_path_buf()
    };
    LanguageModel::from_tensors_opts(config, tokenizer, tensors, &path, device, dtype, keep_half)
        .map_err(|e| match e {
            ModelError::ShapeMismatch {
                tensor,
                got,
                expected,
                ..
            } => ModelError::ShapeMismatch {
                path: origin.get(&tensor).cloned().unwrap_or(path.clone()),
                tensor,
                got,
                expected,
            },
            ModelError::UnsupportedDtype { tensor, dtype, .. } => ModelError::UnsupportedDtype {
                path: origin.get(&tensor).cloned().unwrap_or(path.clone()),
                tensor,
                dtype,
            },
            e => e,
        })
}

/// The safetensors files of a model directory: the shards named by the index, else
/// `model.safetensors`, else every `*.safetensors` file (sorted).
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::BadWeights {
            path: index.clone(),
            tensor: None,
            msg: e.to_string(),
        })?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| ModelError::BadWeights {
                path: index.clone(),
                tensor: None,
                msg: "no weight_map".into(),
            })?;
        let files: BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::MissingTensor {
            path: dir.to_path_buf(),
            tensor: "(no *.safetensors file)".into(),
        });
    }
    Ok(files)
}

fn safetensors_dtype(s: &str) -> Option<DType> {
    Some(match s {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        _ => return None,
    })
}

/// Reads every tensor of one safetensors file onto the CPU.
pub(crate) fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>, ModelError> {
    use std::io::{Read, Seek, SeekFrom};
    // Tensor by tensor: the file is never held whole besides the tensors built from it.
    let mut file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| ModelError::io(path, e))?.len() as usize;
    let bad = |tensor: Option<String>, msg: String| ModelError::BadWeights {
        path: path.to_path_buf(),
        tensor,
        msg,
    };
    if file_len < 8 {
        return Err(bad(
            None,
            format!("file is {file_len} bytes, too short for a header"),
        ));
    }
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| ModelError::io(path, e))?;
    let n = u64::from_le_bytes(len) as usize;
    if n > file_len - 8 {
        return Err(bad(
            None,
            format!(
                "truncated header: {n} bytes declared, {} available",
                file_len - 8
            ),
        ));
    }
    let mut head = vec![0u8; n];
    file.read_exact(&mut head)
        .map_err(|e| ModelError::io(path, e))?;
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&head).map_err(|e| bad(None, format!("bad header: {e}")))?;
    let data_len = file_len - 8 - n;
    let mut out = Vec::with_capacity(header.len());
    let mut names: Vec<&String> = header.keys().filter(|k| *k != "__metadata__").collect();
    names.sort();
    for name in names {
        let info = &header[name];
        let dt = info.get("dtype").and_then(Value::as_str).unwrap_or("?");
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_u64)
                    .map(|x| x as usize)
                    .collect()
            })
            .ok_or_else(|| bad(Some(name.clone()), "no shape".into()))?;
        let offs: Vec<usize> = info
            .get("data_offsets")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_u64)
                    .map(|x| x as usize)
                    .collect()
            })
            .unwrap_or_default();
        let dtype = match safetensors_dtype(dt) {
            Some(d) => d,
            None => {
                // Non-float tensors that are not parameters (none in supported models) are an error:
                // say which one.
                return Err(ModelError::UnsupportedDtype {
                    path: path.to_path_buf(),
                    tensor: name.clone(),
                    dtype: dt.to_string(),
                });
            }
        };
        let [start, end] = offs[..] else {
            return Err(bad(Some(name.clone()), "no data_offsets".into()));
        };
        let want = shape.iter().product::<usize>() * dtype.size_in_bytes();
        if end < start || end - start != want {
            return Err(bad(
                Some(name.clone()),
                format!("data_offsets {start}..{end} do not match shape {shape:?} {dt}"),
            ));
        }
        if end > data_len {
            return Err(bad(
                Some(name.clone()),
                format!(
                    "truncated file: tensor data ends at byte {end} but only {data_len} data bytes exist"
                ),
            ));
        }
        let mut buf = vec![0u8; end - start];
        file.seek(SeekFrom::Start((8 + n + start) as u64))
            .and_then(|_| file.read_exact(&mut buf))
            .map_err(|e| ModelError::io(path, e))?;
        let t = Tensor::from_raw_buffer(&buf, dtype, &shape, &Device::Cpu)?;
        drop(buf);
        out.push((name.clone(), t));
    }
    Ok(out)
}

/// The hyper-parameters of the Hugging Face folder `dir` and the total size of its weight files.
pub(crate) fn read_config(dir: &Path) -> Result<(Config, u64), ModelError> {
    let config = config_of(dir)?;
    let mut bytes = 0;
    for f in weight_files(dir)? {
        bytes += std::fs::metadata(&f)
            .map_err(|e| ModelError::io(&f, e))?
            .len();
    }
    Ok((config, bytes))
}

/// `dir/config.json` read and checked.
fn config_of(dir: &Path) -> Result<Config, ModelError> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: cfg_path.clone(),
        msg: e.to_string(),
    })?;
    Config::from_hf_json(&v, &cfg_path)
}
