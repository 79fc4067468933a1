//! Model commands: `tsr generate` (one prompt), `tsr logprobs` (score a JSONL file of
//! prompt/response pairs) and `tsr export-model` (write Hugging Face layout). Thin wrappers over
//! `tsr_model`; `--model` takes a model directory, a `.gguf` file or an `Org/Name` hub id.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;
use tsr_model::{tune_allocator, GenRequest, LanguageModel, Sampling};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model: Hugging Face directory, .gguf file, or Org/Name in the local HF cache.
    #[arg(long)]
    pub model: String,
    /// A LoRA adapter folder as PEFT saves it (adapter_config.json + adapter_model.safetensors),
    /// merged into the model's weights.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The user message; the model's chat template is applied.
    #[arg(long)]
    pub prompt: String,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 256)]
    pub max_new: usize,
    /// Greedy decoding (the default when no --temperature is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "top_k"])]
    pub greedy: bool,
    /// Sampling temperature (enables sampling).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Nucleus sampling threshold (with --temperature).
    #[arg(long, requires = "temperature")]
    pub top_p: Option<f64>,
    /// Keep only the K most likely tokens (with --temperature).
    #[arg(long, requires = "temperature")]
    pub top_k: Option<usize>,
    /// Seed of the sampling RNG (same seed, same output).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// "cpu" or "cuda:N".
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Hold the model's weight matrices in bf16 or f16 (half the memory; computed in f32).
    #[arg(long)]
    pub base_dtype: Option<String>,
    /// Print {prompt_token_ids, generated_token_ids, text, finished} as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct LogprobsArgs {
    #[arg(long)]
    pub model: String,
    /// A LoRA adapter folder as PEFT saves it (adapter_config.json + adapter_model.safetensors),
    /// merged into the model's weights.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// JSONL file, one {"prompt": ..., "response": ...} object per line.
    #[arg(long)]
    pub pairs: PathBuf,
    /// Pairs scored per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Hold the model's weight matrices in bf16 or f16 (half the memory; computed in f32).
    #[arg(long)]
    pub base_dtype: Option<String>,
    /// One JSON object per input line instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ExportModelArgs {
    #[arg(long)]
    pub model: String,
    /// Output folder (created whole, or not at all).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Replace the output folder when it already holds files.
    #[arg(long)]
    pub force: bool,
}

/// Loads `spec` on `device`; with `base_dtype` (`bf16`, `f16`) its weight matrices are held in
/// that precision (those stored so are never widened), as a run with `[model] dtype` does.
pub fn load_model(
    spec: &str,
    device: &str,
    base_dtype: Option<&str>,
) -> anyhow::Result<LanguageModel> {
    use tsr_model::{parse_device, DType, ModelSource};
    let half = match base_dtype {
        None | Some("f32") => None,
        Some("bf16") => Some(DType::BF16),
        Some("f16") => Some(DType::F16),
        Some(other) => anyhow::bail!("--base-dtype `{other}`: use f32, bf16 or f16"),
    };
    let Some(dt) = half else {
        return LanguageModel::load_str(spec, device)
            .with_context(|| format!("loading model {spec}"));
    };
    let dev = parse_device(device)?;
    let m = LanguageModel::load_keep_half(&ModelSource::parse(spec)?, &dev, DType::F32)
        .with_context(|| format!("loading model {spec}"))?;
    m.to_half_base(dt)?;
    Ok(m)
}

fn load(
    model: &str,
    adapter: Option<&Path>,
    device: &str,
    base_dtype: Option<&str>,
) -> anyhow::Result<LanguageModel> {
    tune_allocator();
    let m = load_model(model, device, base_dtype)?;
    if let Some(dir) = adapter {
        let a = tsr_model::LoraAdapter::load(dir, m.device())?;
        m.merge_lora(&a)?;
    }
    Ok(m)
}

fn sampling(a: &GenerateArgs) -> Sampling {
    match a.temperature {
        Some(t) if !a.greedy => Sampling::Sample {
            temperature: t,
            top_p: a.top_p,
            top_k: a.top_k,
        },
        _ => Sampling::Greedy,
    }
}

/// `tsr generate`.
pub fn run_generate(a: GenerateArgs) -> anyhow::Result<()> {
    let m = load(
        &a.model,
        a.adapter.as_deref(),
        &a.device,
        a.base_dtype.as_deref(),
    )?;
    let prompt_ids = m.tokenizer().encode_prompt(&a.prompt)?;
    let req = GenRequest {
        prompt_ids: prompt_ids.clone(),
        max_new_tokens: a.max_new,
        sampling: sampling(&a),
        seed: a.seed,
    };
    let out = m.generate(&[req], 1)?.remove(0);
    if a.json {
        let finished = match out.finished {
            tsr_model::FinishReason::EndOfTurn => "end_of_turn",
            tsr_model::FinishReason::MaxTokens => "max_tokens",
        };
        println!(
            "{}",
            json!({"prompt_token_ids": prompt_ids, "generated_token_ids": out.token_ids, "text": out.text, "finished": finished})
        );
    } else {
        println!("{}", out.text);
    }
    Ok(())
}

/// One scored line of a pairs file.
#[derive(Debug, PartialEq)]
pub struct PairLine {
    pub line: usize,
    pub prompt: String,
    pub response: String,
}

/// Reads `{"prompt","response"}` lines (blank lines skipped); a bad line is an error naming
/// the file and its 1-based line number.
pub fn read_pairs(path: &Path) -> anyhow::Result<Vec<PairLine>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let n = i + 1;
        let line = line.with_context(|| format!("{}:{n}: cannot read line", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{}:{n}: not a JSON object", path.display()))?;
        let field = |k: &str| -> anyhow::Result<String> {
            match v.get(k) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(_) => bail!("{}:{n}: field {k:?} must be a string", path.display()),
                None => bail!("{}:{n}: missing field {k:?}", path.display()),
            }
        };
        out.push(PairLine {
            line: n,
            prompt: field("prompt")?,
            response: field("response")?,
        });
    }
    Ok(out)
}

/// `tsr logprobs`: per line, the summed log-probability of the response tokens (response text
/// plus the end-of-turn token) given the chat-templated prompt.
pub fn run_logprobs(a: LogprobsArgs) -> anyhow::Result<()> {
    let lines = read_pairs(&a.pairs)?;
    let m = load(
        &a.model,
        a.adapter.as_deref(),
        &a.device,
        a.base_dtype.as_deref(),
    )?;
    let t = m.tokenizer();
    let mut pairs = Vec::with_capacity(lines.len());
    for l in &lines {
        let p = t
            .encode_prompt(&l.prompt)
            .with_context(|| format!("{}:{}", a.pairs.display(), l.line))?;
        let r = t
            .encode_response(&l.response)
            .with_context(|| format!("{}:{}", a.pairs.display(), l.line))?;
        pairs.push((p, r));
    }
    let lps = m.logprobs(&pairs, a.batch_size)?;
    let stdout = std::io::stdout();
    let mut w = stdout.lock();
    for ((l, (_, r)), lp) in lines.iter().zip(&pairs).zip(lps) {
        if a.json {
            writeln!(
                w,
                "{}",
                json!({"line": l.line, "logprob": lp, "num_tokens": r.len(), "response_token_ids": r})
            )?;
        } else {
            writeln!(
                w,
                "line {}: logprob {lp:.4} over {} tokens {:?}",
                l.line,
                r.len(),
                r
            )?;
        }
    }
    Ok(())
}

/// `tsr export-model`: prints the directory and the weights' digest.
pub fn run_export_model(a: ExportModelArgs) -> anyhow::Result<()> {
    // Never replace the folder being read (or one holding it), even with --force.
    if let (Ok(src), Ok(out)) = (Path::new(&a.model).canonicalize(), a.out.canonicalize()) {
        if src.starts_with(&out) {
            bail!(
                "{}: the output folder holds the model being exported ({}); choose another folder",
                a.out.display(),
                a.model
            );
        }
    }
    let m = load(&a.model, None, &a.device, None)?;
    m.export_hf(&a.out, a.force)
        .context("exporting the model as a Hugging Face folder")?;
    println!(
        "wrote {} (Hugging Face layout; weights blake3 {})",
        a.out.display(),
        m.digest()?
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_pair_lines_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("p.jsonl");
        std::fs::write(
            &f,
            "{\"prompt\": \"a\", \"response\": \"b\"}\n\n{\"prompt\": \"a\"}\n",
        )
        .unwrap();
        let e = format!("{:#}", read_pairs(&f).unwrap_err());
        assert!(e.contains("p.jsonl:3") && e.contains("response"), "{e}");
        std::fs::write(&f, "{\"prompt\": \"a\", \"response\": \"b\"}\nnot json\n").unwrap();
        assert!(format!("{:#}", read_pairs(&f).unwrap_err()).contains("p.jsonl:2"));
        std::fs::write(&f, "{\"prompt\": \"a\", \"response\": \"b\"}\n\n").unwrap();
        assert_eq!(
            read_pairs(&f).unwrap(),
            vec![PairLine {
                line: 1,
                prompt: "a".into(),
                response: "b".into()
            }]
        );
    }

    #[test]
    fn handlers_run_on_a_tiny_model() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tsr_model::testing::write_tiny_hf_model(&tmp.path().join("m"), 1);
        let model = dir.to_str().unwrap().to_string();
        let f = tmp.path().join("p.jsonl");
        std::fs::write(&f, "{\"prompt\": \"Hi\", \"response\": \"Hello\"}\n").unwrap();
        for base_dtype in [None, Some("bf16".to_string())] {
            run_logprobs(LogprobsArgs {
                model: model.clone(),
                adapter: None,
                pairs: f.clone(),
                batch_size: 2,
                device: "cpu".into(),
                base_dtype,
                json: true,
            })
            .unwrap();
        }
        for base_dtype in [None, Some("f16".to_string())] {
            run_generate(GenerateArgs {
                model: model.clone(),
                adapter: None,
                prompt: "Hi".into(),
                max_new: 4,
                greedy: false,
                temperature: Some(0.8),
                top_p: Some(0.9),
                top_k: None,
                seed: 1,
                device: "cpu".into(),
                base_dtype,
                json: true,
            })
            .unwrap();
        }
        run_export_model(ExportModelArgs {
            model,
            out: tmp.path().join("out"),
            device: "cpu".into(),
            force: false,
        })
        .unwrap();
        assert!(tmp.path().join("out/model.safetensors").is_file());
    }
}
