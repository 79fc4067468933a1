//! `tsr eval`: one model against a baseline model or a reference outputs file on held-out
//! prompts, judged pairwise in both orders by a fixed judge: the evaluation steps of the
//! workflows, run on their own (a run of the `eval` workflow in the store, so it resumes and
//! reuses work like any run).

use anyhow::{bail, Context};
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args)]
pub struct EvalArgs {
    /// The model to evaluate (GGUF, Hugging Face folder or Org/Name from the local cache).
    #[arg(long)]
    pub model: String,
    /// The baseline model whose answers it is compared with.
    #[arg(
        long,
        required_unless_present = "reference",
        conflicts_with = "reference"
    )]
    pub baseline: Option<String>,
    /// Or a reference outputs file in AlpacaEval's format (a JSON list of
    /// {"instruction", "output", "generator"}), one output per prompt.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Held-out prompts: JSONL, one {"id", "prompt", "answer"?} per line.
    #[arg(long)]
    pub prompts: PathBuf,
    /// The judge model (default: the baseline model, else the evaluated model); with
    /// --judge-url, the model name the server serves.
    #[arg(long)]
    pub judge: Option<String>,
    /// Judge with AlpacaEval 2.0's annotator through this OpenAI-compatible server (e.g.
    /// https://api.openai.com/v1) instead of a local model; needs --judge and --template.
    #[arg(long)]
    pub judge_url: Option<String>,
    /// With --judge-url: `weighted_alpaca_eval_gpt4_turbo` (AlpacaEval 2.0's annotator, needs
    /// --template) or `tsr_pairwise` (tsr's own judgement in both orders, --mode text).
    #[arg(
        long,
        requires = "judge_url",
        default_value = "weighted_alpaca_eval_gpt4_turbo"
    )]
    pub annotator: String,
    /// With --judge-url: the environment variable holding the key.
    #[arg(long, requires = "judge_url")]
    pub api_key_env: Option<String>,
    /// With --judge-url: requests in flight at once.
    #[arg(long, requires = "judge_url", default_value_t = 4)]
    pub max_concurrency: usize,
    /// With --judge-url: tokens (in and out) the evaluation may spend; it stops there (exit 3)
    /// and the same command with a higher limit continues.
    #[arg(long, requires = "judge_url")]
    pub max_cost_tokens: Option<u64>,
    /// With --judge-url: also compute AlpacaEval 2.0's length-controlled win rate from this
    /// folder (df_gamed.csv and alpaca_eval_gpt4_baseline.json from the model hub's dataset
    /// tatsu-lab/alpaca_eval); --prompts must then be that instructions file.
    #[arg(long, requires = "judge_url")]
    pub lc_data: Option<PathBuf>,
    /// `text` (the judge writes `Better: A|B`) or `logprob` (compares P(A) and P(B)).
    #[arg(long, default_value = "text")]
    pub mode: String,
    /// A judge template file with {instruction}, {output_a} and {output_b}.
    #[arg(long)]
    pub template: Option<PathBuf>,
    /// Most new tokens per answer.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Use only the first N prompts (0: all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// The run's name in the store (default: derived from the arguments and the files' content,
    /// so the same command continues the same evaluation).
    #[arg(long)]
    pub name: Option<String>,
    /// Also write AlpacaEval's files here (model_outputs.json, annotations.json, ...).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace --out when it holds an earlier evaluation export.
    #[arg(long)]
    pub force: bool,
    /// Print the metrics as JSON.
    #[arg(long)]
    pub json: bool,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// No progress bars or step log.
    #[arg(long)]
    pub quiet: bool,
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn path_str(p: &Path) -> String {
    toml_str(&p.display().to_string())
}

pub fn run(store_flag: &Option<PathBuf>, a: EvalArgs) -> anyhow::Result<ExitCode> {
    if !["text", "logprob"].contains(&a.mode.as_str()) {
        bail!("--mode `{}`: use `text` or `logprob`", a.mode);
    }
    let pairwise = a.annotator == tsr_steps::kinds::api_judge::TSR_PAIRWISE;
    if a.judge_url.is_some() && a.judge.is_none() {
        bail!("--judge-url needs --judge (the model name the server serves)");
    }
    if a.judge_url.is_some() && !pairwise && a.template.is_none() {
        bail!("--judge-url with AlpacaEval's annotator needs --template (AlpacaEval's alpaca_eval_clf.txt)");
    }
    let judge = a
        .judge
        .clone()
        .or_else(|| a.baseline.clone())
        .unwrap_or_else(|| a.model.clone());
    let mut body = format!(
        "[model]\nsource = {}\n\n[eval]\nprompts = {}\nlimit = {}\nmax_new_tokens = {}\nbatch_size = {}\n",
        toml_str(&a.model),
        path_str(&a.prompts),
        a.limit,
        a.max_new_tokens,
        a.batch_size
    );
    if let Some(b) = &a.baseline {
        body.push_str(&format!("baseline_model = {}\n", toml_str(b)));
    }
    if let Some(r) = &a.reference {
        body.push_str(&format!("reference = {}\n", path_str(r)));
    }
    if let Some(d) = &a.lc_data {
        body.push_str(&format!("lc_data = {}\n", path_str(d)));
    }
    body.push_str(&format!(
        "\n[eval.judge]\nmodel = {}\nmode = {}\nbatch_size = {}\n",
        toml_str(&judge),
        toml_str(&a.mode),
        a.batch_size
    ));
    if let Some(t) = &a.template {
        body.push_str(&format!("template = {}\n", path_str(t)));
    }
    if a.judge_url.is_some() {
        body.push_str(&format!(
            "kind = \"openai\"\nannotator = {}\n",
            toml_str(&a.annotator)
        ));
    }
    // Where and how patiently to ask is not part of the evaluation (nor of its name): another
    // server address, key variable, concurrency or budget continues it.
    let mut serving = String::new();
    if let Some(u) = &a.judge_url {
        serving.push_str(&format!(
            "base_url = {}\nmax_concurrency = {}\n",
            toml_str(u),
            a.max_concurrency
        ));
        if let Some(k) = &a.api_key_env {
            serving.push_str(&format!("api_key_env = {}\n", toml_str(k)));
        }
        if let Some(n) = a.max_cost_tokens {
            serving.push_str(&format!("max_cost_tokens = {n}\n"));
        }
    }
    let name = match &a.name {
        Some(n) => n.clone(),
        None => {
            // The arguments and the content of the small files they name: a changed prompts
            // or reference file is a new evaluation, not a refused one.
            let mut h = blake3::Hasher::new();
            h.update(body.as_bytes());
            for f in [Some(&a.prompts), a.reference.as_ref(), a.template.as_ref()]
                .into_iter()
                .flatten()
            {
                let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
                h.update(blake3::hash(&bytes).as_bytes());
            }
            format!("eval-{}", &h.finalize().to_hex()[..12])
        }
    };
    tsr_state::validate_run_name(&name).with_context(|| format!("--name `{name}`"))?;
    let text = format!(
        "name = {}\nworkflow = \"eval\"\n\n{body}{serving}",
        toml_str(&name)
    );
    let cwd = std::env::current_dir().context("reading the current folder")?;
    let config = tsr_workflows::Config::from_str_at_dir(&text, Path::new("tsr eval"), Some(&cwd))?;
    let store_dir = crate::store_dir(store_flag, None);
    let hint = "the same tsr eval command".to_string();
    let code = crate::cmd_run::drive_eval(&store_dir, &config, &a.device, a.quiet, hint)?;
    if code != ExitCode::SUCCESS {
        return Ok(code);
    }
    let store = crate::store_read::open_store(&store_dir)?;
    let nodes = tsr_workflows::lineage::nodes(&store, &name)?;
    let evals = tsr_workflows::lineage::evals::evals(&store, &nodes)?;
    let e = evals.first().with_context(|| {
        format!("run `{name}` finished without an evaluation; run `tsr verify`")
    })?;
    if let Some(out) = &a.out {
        crate::cmd_lineage::export_eval_to(&store, &name, out, a.force)?;
        eprintln!("tsr: AlpacaEval's files in {}", out.display());
    }
    let s = &e.summary;
    let hint = crate::cmd_report::undecided_hint(s, crate::cmd_report::HintFor::Flags);
    if a.json {
        say!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"run": name, "summary": s, "lc": e.lc})
            )?
        );
        if let Some(h) = hint {
            eprintln!("tsr: {h}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    match &s.win_rate {
        Some(w) => say!(
            "win rate {:.1}% (95% CI {}), length-controlled {}: {} wins, {} losses, {} ties over {} prompts",
            w.win_rate,
            s.ci95
                .map(|(lo, hi)| format!("{lo:.1}-{hi:.1}"))
                .unwrap_or_else(|| "-".into()),
            e.lc_win_rate()
                .map(|(x, glm)| format!("{x:.1}% ({glm})"))
                .unwrap_or_else(|| "-".into()),
            w.n_wins,
            w.n_wins_base,
            w.n_draws,
            w.n_total
        ),
        None => say!(
            "no win rate: none of the {} prompts got a readable verdict from both orders",
            s.prompts
        ),
    }
    if let Some(soft) = s.soft_win_rate {
        say!("judge's probability that the model is better, both orders averaged: {soft:.1}%");
    }
    if let Some(h) = hint {
        say!("{h}");
    }
    say!(
        "mean length: model {:.0} characters, baseline {:.0}",
        s.avg_chars_model,
        s.avg_chars_baseline
    );
    if let Some(m) = &s.exact_match {
        say!(
            "exact match: model {}/{} ({:.1}%), baseline {}/{} ({:.1}%)",
            m.correct,
            m.total,
            m.accuracy,
            m.baseline_correct,
            m.total,
            m.baseline_accuracy
        );
    }
    say!("lineage of one prompt: tsr lineage {name} eval ID; files: tsr export {name} eval --out DIR");
    Ok(ExitCode::SUCCESS)
}
