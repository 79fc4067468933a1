//! `tsr report RUN [RUN...]`: the per-iteration, per-phase metrics table of each run, and PNG
//! plots (score gap, chosen/rejected similarity, response length over iterations), one line per
//! run, so that e.g. standard Self-Rewarding and Temporal can be compared side by side. Runs of
//! the Meta-Rewarding workflows add a judge table (score distribution, meta-judge agreement,
//! judge pairs) and a plot of the share of top judge scores.

use crate::store_read::open_store;
use anyhow::Context;
use clap::Args;
use plotters::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tsr_steps::kinds::metrics::IterationMetrics;
use tsr_workflows::lineage::{self, evals::EvalResult};

#[derive(Args)]
pub struct ReportArgs {
    /// One or more runs of the store.
    #[arg(required = true)]
    pub runs: Vec<String>,
    /// Folder for the PNG plots (default: <store>/reports/<first run>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// One plotted line: x = the index of an (iteration, phase) slot named in the plot's x labels.
struct Series {
    run: String,
    points: Vec<(f64, f64)>,
    /// Intervals drawn as vertical bars: (x, low, high).
    bars: Vec<(f64, f64, f64)>,
}

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/Library/Fonts/Arial.ttf",
];

/// Register a system font for chart text; `None` (plots without text) when none is found.
fn register_font() -> Option<()> {
    let path = std::env::var("TSR_FONT")
        .ok()
        .into_iter()
        .chain(FONT_PATHS.iter().map(|s| s.to_string()))
        .find(|p| Path::new(p).is_file())?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(path).ok()?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).ok()
}

/// A run's report folder name: the run name, with anything but letters, digits and `._-`
/// replaced (runs recorded before names were restricted may hold `/` or `..`).
fn folder_name(run: &str) -> String {
    let s: String = run
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    match s.trim_start_matches('.') {
        "" => "_".into(),
        t if t.len() < s.len() => format!("_{t}"),
        _ => s,
    }
}

/// The y range drawn for values from `y0` to `y1`: 10% margins, and for a flat line a range of
/// a tenth of its value (at least 0.1) on each side, not a sliver that makes rounding noise
/// look like a trend.
fn y_range(y0: f64, y1: f64) -> (f64, f64) {
    let span = y1 - y0;
    if span <= 1e-9 * y0.abs().max(y1.abs()).max(1.0) {
        let pad = (y0.abs() * 0.1).max(0.1);
        (y0 - pad, y1 + pad)
    } else {
        (y0 - span * 0.1, y1 + span * 0.1)
    }
}

/// Names of the x slots: "it1 anchored", "it1 future-guided", ... (phase names of every run
/// at that slot, joined with "/" when runs name it differently).
fn slot_names(slots: &BTreeMap<(u32, usize), BTreeSet<String>>) -> Vec<String> {
    slots
        .iter()
        .map(|((it, _), names)| {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            format!("it{it} {}", names.join("/"))
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn plot(
    path: &Path,
    title: &str,
    y_label: &str,
    x_desc: &str,
    x_names: &[String],
    series: &[Series],
    text: bool,
) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|s| {
            s.points
                .iter()
                .map(|p| p.1)
                .chain(s.bars.iter().flat_map(|b| [b.1, b.2]))
        })
        .collect();
    let (x0, x1) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    });
    let (y0, y1) = ys
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &y| {
            (a.min(y), b.max(y))
        });
    if !x0.is_finite() {
        return Ok(());
    }
    let (lo, hi) = y_range(y0, y1);
    let mut builder = ChartBuilder::on(&root);
    builder
        .margin(20)
        .x_label_area_size(if text { 40 } else { 5 })
        .y_label_area_size(if text { 60 } else { 5 });
    if text {
        builder.caption(title, ("sans-serif", 22));
    }
    let mut chart = builder.build_cartesian_2d((x0 - 0.4)..(x1 + 0.4), lo..hi)?;
    if text {
        // Ticks only where a slot is; each labelled with its iteration and phase.
        let name = |x: &f64| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                x_names.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .x_labels(x_names.len().max(2) * 2 + 1)
            .x_label_formatter(&name)
            .disable_x_mesh()
            .x_desc(x_desc)
            .y_desc(y_label)
            .draw()?;
    }
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let drawn = chart.draw_series(LineSeries::new(s.points.clone(), color.stroke_width(2)))?;
        if text {
            drawn
                .label(s.run.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        chart.draw_series(
            s.bars.iter().map(|&(x, lo, hi)| {
                PathElement::new(vec![(x, lo), (x, hi)], color.stroke_width(2))
            }),
        )?;
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub fn report(store_flag: &Option<PathBuf>, a: ReportArgs) -> anyhow::Result<ExitCode> {
    let dir = crate::store_dir(store_flag, None);
    let store = open_store(&dir)?;
    report_on(&store, &dir, a)
}

/// A plot of the phase metrics: its file, title, y label and the value it draws.
type Plot = (
    &'static str,
    &'static str,
    &'static str,
    Box<dyn Fn(&tsr_steps::kinds::metrics::PhaseMetrics) -> Option<f64>>,
);

/// The report of runs in an open store (`dir` is where it lives: plots go under it).
pub fn report_on(
    store: &tsr_state::Store,
    dir: &std::path::Path,
    a: ReportArgs,
) -> anyhow::Result<ExitCode> {
    let mut all: Vec<(String, Vec<IterationMetrics>)> = Vec::new();
    let mut evals: Vec<(String, Vec<EvalResult>)> = Vec::new();
    for run in &a.runs {
        let nodes = lineage::nodes(store, run)?;
        let mut its = Vec::new();
        for n in lineage::of_kind(&nodes, "metrics") {
            if let Some(d) = n.output("metrics") {
                let m: IterationMetrics = serde_json::from_slice(&lineage::read_blob(store, &d)?)
                    .with_context(|| format!("metrics of {}", n.node))?;
                its.push(m);
            }
        }
        all.push((run.clone(), its));
        evals.push((run.clone(), lineage::evals::evals(store, &nodes)?));
    }
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| dir.join("reports").join(folder_name(&a.runs[0])));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let text = register_font().is_some();
    if !text {
        eprintln!(
            "tsr: no TrueType font found (set TSR_FONT=path.ttf); plots are drawn without text"
        );
    }
    // One x slot per (iteration, phase position) of any run.
    let mut slots: BTreeMap<(u32, usize), BTreeSet<String>> = BTreeMap::new();
    for (_, its) in &all {
        for it in its {
            for (k, p) in it.phases.iter().enumerate() {
                slots
                    .entry((it.iteration, k))
                    .or_default()
                    .insert(p.phase.clone());
            }
        }
    }
    let x_names = slot_names(&slots);
    let slot_of = |it: u32, k: usize| slots.keys().position(|s| *s == (it, k)).unwrap_or(0) as f64;
    let series =
        |f: &dyn Fn(&tsr_steps::kinds::metrics::PhaseMetrics) -> Option<f64>| -> Vec<Series> {
            all.iter()
                .map(|(run, its)| Series {
                    run: run.clone(),
                    points: its
                        .iter()
                        .flat_map(|it| {
                            it.phases.iter().enumerate().filter_map(move |(k, p)| {
                                f(p).map(|y| (slot_of(it.iteration, k), y))
                            })
                        })
                        .collect(),
                    bars: vec![],
                })
                .collect()
        };
    let plots: [Plot; 4] = [
        (
            "score_gap.png",
            "Chosen - rejected judge score",
            "score gap",
            Box::new(|p| (p.pairs > 0).then_some(p.score_gap)),
        ),
        (
            "similarity.png",
            "Chosen vs rejected similarity (hidden states under Mi)",
            "cosine",
            Box::new(|p| p.cosine_similarity),
        ),
        (
            "chosen_length.png",
            "Mean chosen response length",
            "tokens",
            Box::new(|p| (p.pairs > 0).then_some(p.mean_chosen_tokens)),
        ),
        (
            "rejected_length.png",
            "Mean rejected response length",
            "tokens",
            Box::new(|p| (p.pairs > 0).then_some(p.mean_rejected_tokens)),
        ),
    ];
    for (file, title, y, f) in plots.iter() {
        plot(
            &out.join(file),
            title,
            y,
            "iteration and phase",
            &x_names,
            &series(f.as_ref()),
            text,
        )?;
    }
    let iterations: BTreeSet<u32> = all
        .iter()
        .flat_map(|(_, its)| its.iter().map(|it| it.iteration))
        .collect();
    let iteration_names: Vec<String> = iterations.iter().map(|i| format!("it{i}")).collect();
    let top: Vec<Series> = all
        .iter()
        .map(|(run, its)| Series {
            run: run.clone(),
            points: its
                .iter()
                .filter_map(|it| {
                    let x = iterations.iter().position(|i| *i == it.iteration)? as f64;
                    it.meta.as_ref()?.top_score_share.map(|y| (x, y))
                })
                .collect(),
            bars: vec![],
        })
        .filter(|s| !s.points.is_empty())
        .collect();
    if !top.is_empty() {
        plot(
            &out.join("judge_top_share.png"),
            "Share of top judge scores (judge collapse)",
            "share",
            "iteration",
            &iteration_names,
            &top,
            text,
        )?;
    }
    if evals.iter().any(|(_, e)| !e.is_empty()) {
        plot_evals(&out, &evals, text)?;
    }
    // Printed after the plots are written, so a reader that stops early (`| head`) ends
    // the command only when its files are complete.
    if a.json {
        let v: Vec<_> = all
            .iter()
            .zip(&evals)
            .map(|((r, m), (_, e))| {
                let e: Vec<_> = e
                    .iter()
                    .map(|e| serde_json::json!({"model": e.label, "node": e.node, "summary": e.summary, "lc": e.lc}))
                    .collect();
                serde_json::json!({"run": r, "iterations": m, "eval": e})
            })
            .collect();
        say!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        say!(
            "{:<16} {:<15} {:>3} {:<14} {:>5} {:>4} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>5} {:>5} {:>7} {:>5} {:>7}",
            "RUN", "WORKFLOW", "IT", "PHASE", "PAIRS", "SKIP", "CHOSEN", "REJ", "GAP", "COS", "LEN_C", "LEN_R", "ANCH", "FUT", "LOSS", "ACC", "MARGIN"
        );
        for (run, its) in &all {
            if its.is_empty() {
                say!("{run:<16} (no finished iteration yet)");
            }
            for it in its {
                for p in &it.phases {
                    let opt = |v: Option<f64>, w: usize, d: usize| {
                        v.map(|x| format!("{x:>w$.d$}"))
                            .unwrap_or_else(|| format!("{:>w$}", "-"))
                    };
                    say!(
                        "{:<16} {:<15} {:>3} {:<14} {:>5} {:>4} {:>6.3} {:>6.3} {:>6.3} {} {:>6.1} {:>6.1} {:>5.2} {:>5.2} {} {} {}",
                        run, it.workflow, it.iteration, p.phase, p.pairs, p.skipped, p.mean_chosen_score, p.mean_rejected_score,
                        p.score_gap, opt(p.cosine_similarity, 6, 3), p.mean_chosen_tokens, p.mean_rejected_tokens,
                        p.share_rejected_from_anchor, p.share_chosen_from_future,
                        opt(p.dpo_final_loss, 7, 4), opt(p.dpo_final_accuracy, 5, 2), opt(p.dpo_final_margin, 7, 4)
                    );
                }
            }
        }
    }
    if !a.json
        && all
            .iter()
            .any(|(_, its)| its.iter().any(|it| it.meta.is_some()))
    {
        print_meta_table(&all);
    }
    if !a.json && evals.iter().any(|(_, e)| !e.is_empty()) {
        print_eval_table(&evals);
    }
    // On stderr, so that it shows beside the table and under --json alike.
    for (run, e) in &evals {
        for e in e {
            if let Some(h) = undecided_hint(&e.summary, HintFor::Config) {
                eprintln!("tsr: {run} {}: {h}", e.label);
            }
        }
    }
    eprintln!("tsr: plots in {}", out.display());
    Ok(ExitCode::SUCCESS)
}

/// Where the user changes the judge: `tsr eval`'s flags or a run's `[eval.judge]` table.
#[derive(Clone, Copy, PartialEq)]
pub enum HintFor {
    Flags,
    Config,
}

/// What to do when an evaluation left prompts undecided (the judge's verdicts could not be
/// read): judge by log-probabilities, or use a stronger judge. `None` when every prompt was
/// decided.
pub fn undecided_hint(s: &tsr_steps::rules::eval::EvalSummary, to: HintFor) -> Option<String> {
    if s.undecided == 0 {
        return None;
    }
    let (mode, judge) = match to {
        HintFor::Flags => ("--mode logprob", "--judge MODEL"),
        HintFor::Config => (
            "mode = \"logprob\" under [eval.judge]",
            "model = \"...\" under [eval.judge]",
        ),
    };
    let stronger = format!(
        "a stronger judge ({judge}): an instruction-tuned model of 1B parameters or more, as a GGUF file or a Hugging Face folder (e.g. Qwen2.5-1.5B-Instruct or SmolLM2-1.7B-Instruct)"
    );
    let what = format!(
        "{} of {} prompt(s) undecided: {:.1}% of the judge's verdicts could not be read",
        s.undecided, s.prompts, s.unparsed_share
    );
    if let Some(api) = &s.api {
        return Some(format!(
            "{} of {} prompt(s) undecided by {}: {} request(s) refused by the server, the others answered without `m` or `M` among the top log-probabilities; each annotation's decision says why (tsr export RUN eval)",
            s.undecided, s.prompts, api.model, api.refused
        ));
    }
    Some(if s.mode == "text" {
        format!("{what}. Small judges rarely write the verdict line: judge by the probabilities of `A` and `B` instead ({mode}), or use {stronger}")
    } else {
        format!("{what}. Use {stronger}")
    })
}

/// The evaluated models' slots on a shared x axis: M0, Mf1, M1, Mf2, M2, ...
fn eval_slots(evals: &[(String, Vec<EvalResult>)]) -> Vec<((u32, u32), String)> {
    let slots: BTreeMap<(u32, u32), String> = evals
        .iter()
        .flat_map(|(_, e)| e.iter().map(|e| (e.slot, e.label.clone())))
        .collect();
    slots.into_iter().collect()
}

/// `win_rate.png` (win rate with its 95% interval) and `lc_win_rate.png`, one line per run.
fn plot_evals(out: &Path, evals: &[(String, Vec<EvalResult>)], text: bool) -> anyhow::Result<()> {
    let slots = eval_slots(evals);
    let names: Vec<String> = slots.iter().map(|s| s.1.clone()).collect();
    let x_of = |slot: (u32, u32)| slots.iter().position(|s| s.0 == slot).unwrap_or(0) as f64;
    let series = |f: &dyn Fn(&EvalResult) -> Option<f64>, with_bars: bool| {
        evals
            .iter()
            .filter(|(_, e)| !e.is_empty())
            .map(|(run, e)| Series {
                run: run.clone(),
                points: e
                    .iter()
                    .filter_map(|e| f(e).map(|y| (x_of(e.slot), y)))
                    .collect(),
                bars: if with_bars {
                    e.iter()
                        .filter_map(|e| e.summary.ci95.map(|(lo, hi)| (x_of(e.slot), lo, hi)))
                        .collect()
                } else {
                    vec![]
                },
            })
            .collect::<Vec<_>>()
    };
    plot(
        &out.join("win_rate.png"),
        "Win rate against the baseline (bars: 95% bootstrap interval)",
        "win rate (%)",
        "evaluated model",
        &names,
        &series(&|e| e.summary.win_rate.as_ref().map(|w| w.win_rate), true),
        text,
    )?;
    // Say which length control the plot shows (AlpacaEval 2.0's where its data was given).
    let kinds: std::collections::BTreeSet<&str> = evals
        .iter()
        .flat_map(|(_, e)| e.iter().filter_map(|e| e.lc_win_rate().map(|(_, k)| k)))
        .collect();
    let title = match kinds.len() {
        1 => format!(
            "Length-controlled win rate against the baseline ({})",
            kinds.first().expect("one")
        ),
        _ => "Length-controlled win rate against the baseline (mixed GLMs: see tsr report)".into(),
    };
    plot(
        &out.join("lc_win_rate.png"),
        &title,
        "LC win rate (%)",
        "evaluated model",
        &names,
        &series(&|e| e.lc_win_rate().map(|(x, _)| x), false),
        text,
    )
}

/// One row per evaluated model. WIN and LC are percent (AlpacaEval's win rate and the
/// length-controlled one: AlpacaEval 2.0's GLM where `eval.lc_data` was given, else the minimal
/// GLM, named under the table); CI the 95% bootstrap interval; UNDEC prompts whose verdict could not
/// be read; UNPARSED% the share of unreadable verdicts; LEN_M / LEN_B mean characters of the
/// model's and the baseline's outputs; EM exact-match accuracy where prompts have answers;
/// SOFT (logprob judges) the judge's probability that the model is better, averaged over both
/// orders.
fn print_eval_table(evals: &[(String, Vec<EvalResult>)]) {
    say!("");
    say!(
        "{:<16} {:<6} {:>6} {:>15} {:>6} {:>6} {:>4} {:>4} {:>4} {:>5} {:>9} {:>7} {:>7} {:>11}",
        "RUN",
        "MODEL",
        "WIN",
        "95% CI",
        "LC",
        "SOFT",
        "W",
        "L",
        "TIE",
        "UNDEC",
        "UNPARSED%",
        "LEN_M",
        "LEN_B",
        "EM"
    );
    for (run, e) in evals {
        for e in e {
            let s = &e.summary;
            let w = s.win_rate.as_ref();
            let num = |v: Option<f64>, w: usize| {
                v.map(|x| format!("{x:>w$.1}"))
                    .unwrap_or_else(|| format!("{:>w$}", "-"))
            };
            let ci = s
                .ci95
                .map(|(lo, hi)| format!("[{lo:.1}, {hi:.1}]"))
                .unwrap_or_else(|| "-".into());
            let em = s
                .exact_match
                .as_ref()
                .map(|m| format!("{}/{} ({:.0}%)", m.correct, m.total, m.accuracy))
                .unwrap_or_else(|| "-".into());
            say!(
                "{:<16} {:<6} {} {:>15} {} {} {:>4} {:>4} {:>4} {:>5} {:>9.1} {:>7.1} {:>7.1} {:>11}",
                run,
                e.label,
                num(w.map(|w| w.win_rate), 6),
                ci,
                num(e.lc_win_rate().map(|(x, _)| x), 6),
                num(s.soft_win_rate, 6),
                w.map_or(0, |w| w.n_wins),
                w.map_or(0, |w| w.n_wins_base),
                w.map_or(0, |w| w.n_draws),
                s.undecided,
                s.unparsed_share,
                s.avg_chars_model,
                s.avg_chars_baseline,
                em
            );
        }
    }
    // Which length control each LC is: one line when all are the minimal GLM's.
    let any_v1 = evals.iter().any(|(_, e)| e.iter().any(|e| e.lc.is_some()));
    if !any_v1 {
        say!("LC: the minimal GLM (length term only); AlpacaEval 2.0's needs eval.lc_data with the API judge");
    }
    for (run, e) in evals.iter().filter(|_| any_v1) {
        for e in e {
            match (&e.lc, e.summary.lc_win_rate) {
                (Some(lc), _) => say!(
                    "{:<16} {:<6} LC: AlpacaEval 2.0's {} GLM, {:.2}% (standard error {}; C {})",
                    run,
                    e.label,
                    lc.glm,
                    lc.length_controlled_winrate,
                    lc.lc_standard_error
                        .map(|x| format!("{x:.2}"))
                        .unwrap_or_else(|| "-".into()),
                    lc.c.map(|c| format!("{c}")).unwrap_or_else(|| "- (its own baseline)".into())
                ),
                (None, Some(_)) => say!(
                    "{:<16} {:<6} LC: the minimal GLM (length term only; AlpacaEval 2.0's needs eval.lc_data)",
                    run,
                    e.label
                ),
                (None, None) => {}
            }
        }
    }
    // What the API judges asked and spent.
    for (run, e) in evals {
        for e in e {
            if let Some(api) = &e.summary.api {
                say!(
                    "{:<16} {:<6} judged by {} ({}): {} request(s), {} refused, {} tokens in, {} out",
                    run,
                    e.label,
                    api.model,
                    e.summary.mode,
                    api.requests,
                    api.refused,
                    api.prompt_tokens,
                    api.completion_tokens
                );
            }
        }
    }
}

/// The judge-side table of Meta-Rewarding runs: one row per iteration. TOP is the share of
/// parsed judge scores at the top score (rising towards 1: the judge collapses into always
/// giving it); AGREE the share of meta-judge comparisons whose two orders agreed; HIGHER the
/// share of agreed comparisons that preferred the higher-scored judgement.
fn print_meta_table(all: &[(String, Vec<IterationMetrics>)]) {
    say!();
    say!(
        "{:<16} {:<15} {:>3} {:>6} {:>6} {:>5} {:>6} {:>6} {:>5} {:>5} {:>6} {:>6} {:>6} {:>6}",
        "RUN",
        "WORKFLOW",
        "IT",
        "JUDGED",
        "SCORED",
        "TOP",
        "MEAN_J",
        "UNCERT",
        "CMP",
        "AGREE",
        "HIGHER",
        "JPAIRS",
        "JKEPT",
        "LEN"
    );
    let opt = |v: Option<f64>, w: usize, d: usize| {
        v.map(|x| format!("{x:>w$.d$}"))
            .unwrap_or_else(|| format!("{:>w$}", "-"))
    };
    for (run, its) in all {
        for it in its {
            let Some(m) = &it.meta else { continue };
            let kept: Option<usize> = it
                .phases
                .iter()
                .filter_map(|p| p.judge_pairs)
                .reduce(|a, b| a + b);
            say!(
                "{:<16} {:<15} {:>3} {:>6} {:>6} {} {} {:>6} {:>5} {} {} {:>6} {:>6} {:>6.1}",
                run,
                it.workflow,
                it.iteration,
                m.judgements,
                m.scored_judgements,
                opt(m.top_score_share, 5, 2),
                opt(m.mean_judge_score, 6, 2),
                m.uncertain_responses,
                m.compared,
                opt(m.meta_agreement, 5, 2),
                opt(m.prefers_higher_score, 6, 2),
                m.judge_pairs,
                kept.map(|k| k.to_string()).unwrap_or_else(|| "-".into()),
                m.mean_response_tokens
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_folders_stay_inside_the_store() {
        assert_eq!(folder_name("quickstart"), "quickstart");
        let evil = folder_name("../../evil");
        assert!(!evil.contains('/') && !evil.starts_with('.'), "{evil}");
        assert!(!folder_name("..").starts_with('.'));
        assert_eq!(folder_name("a/b:c"), "a_b_c");
    }

    #[test]
    fn a_flat_line_gets_a_readable_range() {
        assert_eq!(y_range(0.0, 0.0), (-0.1, 0.1));
        let (lo, hi) = y_range(120.0, 120.0);
        assert!((lo - 108.0).abs() < 1e-9 && (hi - 132.0).abs() < 1e-9);
        let (lo, hi) = y_range(0.98, 0.98 + 1e-12);
        assert!(hi - lo > 0.19, "{lo}..{hi}");
        assert_eq!(y_range(1.0, 2.0), (0.9, 2.1));
    }

    #[test]
    fn slots_are_named_by_iteration_and_phase() {
        let mut slots: BTreeMap<(u32, usize), BTreeSet<String>> = BTreeMap::new();
        slots.entry((1, 0)).or_default().insert("anchored".into());
        slots.entry((1, 0)).or_default().insert("standard".into());
        slots
            .entry((1, 1))
            .or_default()
            .insert("future-guided".into());
        slots.entry((2, 0)).or_default().insert("anchored".into());
        assert_eq!(
            slot_names(&slots),
            ["it1 anchored/standard", "it1 future-guided", "it2 anchored"]
        );
    }
}
