//! Meta-Rewarding on a tiny random model: the `meta-judge` step in process on planted
//! judgements (both orders generated, seeds per order, deterministic items, resume from a
//! partial journal), and the `temporal-meta` / `meta-rewarding` workflows through the CLI (DAG
//! shape, step outputs, metrics and report, SIGKILL-and-resume giving identical digests, config
//! errors naming the key). A random model's text judge rarely parses, so the CLI runs usually
//! make no judge pairs; the judge-pair logic itself is covered by the unit tests in
//! `steps/src/judge_pairs.rs` and `steps/src/meta_judge.rs`, and a planted judge pair is run
//! through `ref-logprobs` and `dpo` in process here.

mod common;

use common::*;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use std::sync::Arc;
use tsr_engine::{ItemJournal, MemoryJournal, Progress, Step, StepContext, StepInputs, StopFlag};
use tsr_state::{BlobStore, Digest};
use tsr_steps::kinds::meta_judge::MetaJudge;
use tsr_steps::rules::judge_pairs::{decide, Comparison};
use tsr_steps::rules::meta_verdict::DEFAULT_META_PROMPT;

fn setup(dir: &Path, workflow: &str) -> PathBuf {
    let model = dir.join("tiny");
    if !model.exists() {
        tsr_model::testing::write_tiny_hf_model(&model, 5);
    }
    std::fs::write(
        dir.join("prompts.jsonl"),
        "{\"id\": \"a\", \"prompt\": \"hello there\"}\n{\"id\": \"b\", \"prompt\": \"name a colour\"}\n{\"id\": \"c\", \"prompt\": \"count to three\"}\n",
    )
    .unwrap();
    let cfg = dir.join(format!("{workflow}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "name = \"{workflow}\"\nworkflow = \"{workflow}\"\niterations = 1\n\
             [model]\nsource = \"tiny\"\n[prompts]\nfile = \"prompts.jsonl\"\n\
             [generate]\nk = 3\nmax_new_tokens = 6\nbatch_size = 4\n\
             [judge]\nmode = \"text\"\nsamples = 2\nmax_new_tokens = 6\nbatch_size = 4\n\
             length_band_per_iteration = [0.5]\n\
             [meta]\nmax_new_tokens = 6\nbatch_size = 4\n\
             [dpo]\nlr = 1e-3\nmicro_batch = 1\naccum_steps = 2\ncheckpoint_every = 1\n"
        ),
    )
    .unwrap();
    cfg
}

fn nodes(v: &serde_json::Value) -> Vec<String> {
    v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn temporal_meta_iteration_dag_outputs_metrics_and_report() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cfg = setup(dir.path(), "temporal-meta");
    let o = tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &store);
    assert!(o.status.success(), "{}", text(&o));
    let v = status(&store, "temporal-meta");
    let ns = nodes(&v);
    for want in [
        "iter1/gen-current",
        "iter1/judge-current",
        "iter1/gen-anchor",
        "iter1/judge-anchor",
        "iter1/meta-judge",
        "iter1/select-1",
        "iter1/dpo-future",
        "iter1/gen-future",
        "iter1/judge-future",
        "iter1/select-2",
        "iter1/ref-next",
        "iter1/dpo-next",
        "iter1/metrics",
    ] {
        assert!(
            ns.iter().any(|n| n == want),
            "missing node {want} in {ns:?}"
        );
    }
    let summary: serde_json::Value =
        serde_json::from_slice(&blob(&store, &output_of(&v, "iter1/meta-judge", "summary")))
            .unwrap();
    assert_eq!(summary["responses"], 9, "3 prompts x k = 3");
    let pairs =
        String::from_utf8(blob(&store, &output_of(&v, "iter1/meta-judge", "pairs"))).unwrap();
    assert_eq!(
        pairs.lines().count() as u64,
        summary["pairs"].as_u64().unwrap()
    );
    let comparisons = String::from_utf8(blob(
        &store,
        &output_of(&v, "iter1/meta-judge", "comparisons"),
    ))
    .unwrap();
    assert_eq!(
        comparisons.lines().count() as u64,
        summary["compared"].as_u64().unwrap()
    );
    // Judge pairs are mixed into phase 2 only (the phase that trains Mi+1), under the cap.
    let s2: serde_json::Value =
        serde_json::from_slice(&blob(&store, &output_of(&v, "iter1/select-2", "summary"))).unwrap();
    assert_eq!(s2["judge_pairs_offered"], summary["pairs"]);
    let kept = s2["judge_pairs_kept"].as_u64().unwrap();
    let actor = s2["pairs"].as_u64().unwrap();
    assert!(
        kept as f64 <= 0.15 * (actor + kept) as f64 + 1e-9,
        "{kept} judge pairs beside {actor}"
    );
    let s1: serde_json::Value =
        serde_json::from_slice(&blob(&store, &output_of(&v, "iter1/select-1", "summary"))).unwrap();
    assert!(
        s1.get("judge_pairs_offered").is_none(),
        "phase 1 trains on actor pairs only: {s1}"
    );
    let mixed = String::from_utf8(blob(&store, &output_of(&v, "iter1/select-2", "pairs"))).unwrap();
    assert_eq!(mixed.lines().count() as u64, actor + kept);
    // Metrics carry the judge-side diagnostics; the report shows them.
    let m: serde_json::Value =
        serde_json::from_slice(&blob(&store, &output_of(&v, "iter1/metrics", "metrics"))).unwrap();
    assert_eq!(m["meta"]["responses"], 9);
    assert_eq!(m["meta"]["judgements"], 18);
    assert_eq!(m["meta"]["score_histogram"].as_array().unwrap().len(), 6);
    assert!(m["meta"]["mean_response_tokens"].as_f64().unwrap() > 0.0);
    let out = dir.path().join("report");
    let o = tsr(
        &["report", "temporal-meta", "--out", out.to_str().unwrap()],
        &store,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("AGREE"), "{}", text(&o));
    assert_eq!(
        text(&o)
            .lines()
            .filter(|l| l.starts_with("temporal-meta"))
            .count(),
        3,
        "2 phase rows + 1 judge row: {}",
        text(&o)
    );
    assert!(tsr(&["verify"], &store).status.success());
}

#[test]
fn meta_rewarding_mixes_into_its_only_phase() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cfg = setup(dir.path(), "meta-rewarding");
    let o = tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &store);
    assert!(o.status.success(), "{}", text(&o));
    let v = status(&store, "meta-rewarding");
    let ns = nodes(&v);
    for want in ["iter1/meta-judge", "iter1/select-1", "iter1/dpo-next"] {
        assert!(ns.iter().any(|n| n == want), "missing {want} in {ns:?}");
    }
    for absent in ["iter1/gen-anchor", "iter1/gen-future", "iter1/select-2"] {
        assert!(!ns.iter().any(|n| n == absent), "{absent} in {ns:?}");
    }
    let s1: serde_json::Value =
        serde_json::from_slice(&blob(&store, &output_of(&v, "iter1/select-1", "summary"))).unwrap();
    assert!(s1["judge_pairs_offered"].is_u64(), "{s1}");
}

#[test]
fn sigkill_and_resume_of_temporal_meta_gives_identical_digests() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), "temporal-meta");
    assert_kills_change_nothing(&cfg, dir.path(), "temporal-meta", 1, 5);
}

#[test]
fn meta_configs_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), "temporal-meta");
    let base = std::fs::read_to_string(&cfg).unwrap();
    for (from, to, want) in [
        ("mode = \"text\"", "mode = \"logprob\"", "judge.mode"),
        ("samples = 2", "samples = 1", "judge.samples"),
        (
            "[meta]\n",
            "[meta]\njudge_pair_share = 1.5\n",
            "meta.judge_pair_share",
        ),
        ("[meta]\n", "[meta]\nbogus = 1\n", "bogus"),
        (
            "[meta]\n",
            "[meta]\ncommit_batches = 0\n",
            "meta.commit_batches",
        ),
        (
            "[meta]\n",
            "[meta]\ntemplate = \"missing.txt\"\n",
            "meta.template",
        ),
        ("[judge]\n", "[judge]\nmodel = \"tiny\"\n", "judge.model"),
        (
            "length_band_per_iteration = [0.5]",
            "length_band_per_iteration = [-1.0]",
            "judge.length_band_per_iteration",
        ),
    ] {
        let p = dir.path().join("bad.toml");
        std::fs::write(&p, base.replace(from, to)).unwrap();
        let o = tsr(
            &["run", p.to_str().unwrap(), "--quiet"],
            &dir.path().join("s"),
        );
        assert_eq!(o.status.code(), Some(1), "{to}: {}", text(&o));
        assert!(
            text(&o).contains(want),
            "{to}: expected `{want}` in {}",
            text(&o)
        );
    }
    let t = dir.path().join("meta.txt");
    std::fs::write(&t, "{judge_prompt} {judgement_a}").unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(
        &p,
        base.replace("[meta]\n", "[meta]\ntemplate = \"meta.txt\"\n"),
    )
    .unwrap();
    let o = tsr(
        &["run", p.to_str().unwrap(), "--quiet"],
        &dir.path().join("s"),
    );
    assert!(text(&o).contains("{judgement_b}"), "{}", text(&o));
    // Several batches per commit: the plan counts the refilled cache (4 rows, 2 requests per
    // response, 3 batches: 6 responses, 12 meta-judgements).
    std::fs::write(&p, base.replace("[meta]\n", "[meta]\ncommit_batches = 3\n")).unwrap();
    let o = tsr(&["plan", p.to_str().unwrap()], &dir.path().join("s"));
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("12 meta-judgements per commit, rows refilled"),
        "{}",
        text(&o)
    );
}

/// The blob store under `dir` and the step inputs `model.*` for a tiny random model (written
/// to `dir/tiny` once): (blobs, input digests, external paths, model folder).
fn tiny_model_inputs(
    dir: &Path,
) -> (
    BlobStore,
    BTreeMap<String, Digest>,
    BTreeMap<String, PathBuf>,
    PathBuf,
) {
    let model = dir.join("tiny");
    if !model.exists() {
        tsr_model::testing::write_tiny_hf_model(&model, 5);
    }
    let blobs = BlobStore::open(dir.join("blobs"), dir.join("tmp")).unwrap();
    let mut digests = BTreeMap::new();
    let mut externals = BTreeMap::new();
    for (suffix, file) in tsr_steps::lm::MODEL_FILES {
        let path = model.join(file);
        digests.insert(
            format!("model.{suffix}"),
            tsr_state::fingerprint(&path).unwrap(),
        );
        externals.insert(format!("model.{suffix}"), path);
    }
    (blobs, digests, externals, model)
}

/// A journal that counts its commits: the step's units.
struct Counting {
    inner: Arc<MemoryJournal>,
    commits: std::sync::Mutex<Vec<Vec<u64>>>,
}

impl ItemJournal for Counting {
    fn get(&self, index: u64) -> Result<Option<Vec<u8>>, tsr_engine::StepError> {
        self.inner.get(index)
    }
    fn indices(&self) -> Result<Vec<u64>, tsr_engine::StepError> {
        self.inner.indices()
    }
    fn commit(&self, items: &[(u64, Vec<u8>)]) -> Result<(), tsr_engine::StepError> {
        self.commits
            .lock()
            .unwrap()
            .push(items.iter().map(|(i, _)| *i).collect());
        self.inner.commit(items)
    }
    fn all(&self) -> Result<Vec<(u64, Vec<u8>)>, tsr_engine::StepError> {
        self.inner.all()
    }
    fn set_total(&self, total: u64) -> Result<(), tsr_engine::StepError> {
        self.inner.set_total(total)
    }
    fn save_checkpoint(
        &self,
        files: BTreeMap<String, tsr_engine::OutputData>,
        cursor: Vec<u8>,
    ) -> Result<(), tsr_engine::StepError> {
        self.inner.save_checkpoint(files, cursor)
    }
    fn load_checkpoint(&self) -> Result<Option<tsr_engine::Checkpoint>, tsr_engine::StepError> {
        self.inner.load_checkpoint()
    }
    fn blob_writer(&self) -> Result<tsr_state::BlobWriter, tsr_engine::StepError> {
        self.inner.blob_writer()
    }
}

/// The step in process, on planted text judgements: (a, 0) and (a, 1) have differing scores,
/// (b, 0) is unanimous and (b, 1) has one parsed score, so exactly two responses are compared.
/// At 2 rows, one response (both orders) per batch; `commit_batches` batches per commit.
/// Returns the comparisons and the indices of each commit.
fn run_meta_step_units(
    dir: &Path,
    journal: Arc<MemoryJournal>,
    commit_batches: usize,
) -> (Vec<Comparison>, Vec<Vec<u64>>) {
    let (blobs, mut digests, mut externals, model) = tiny_model_inputs(dir);
    let mut put = |name: &str, bytes: String| {
        digests.insert(name.to_string(), blobs.put_bytes(bytes.as_bytes()).unwrap());
    };
    put(
        "prompts",
        "{\"id\":\"a\",\"prompt\":\"hello there\"}\n{\"id\":\"b\",\"prompt\":\"name a colour\"}\n"
            .into(),
    );
    let mut responses = String::new();
    for (p, s) in [("a", 0), ("a", 1), ("b", 0), ("b", 1)] {
        responses += &format!("{{\"prompt_id\":\"{p}\",\"sample\":{s},\"seed\":1,\"text\":\"reply {p}{s}\",\"tokens\":2,\"finish\":\"eot\"}}\n");
    }
    put("responses", responses);
    let j = |p: &str, s: u32, v: &[&str]| {
        let texts: Vec<String> = v
            .iter()
            .enumerate()
            .map(|(i, x)| format!("judgement {i}. {x}"))
            .collect();
        let verdicts: Vec<serde_json::Value> = v
            .iter()
            .map(|x| match x.strip_prefix("Score: ") {
                Some(n) => serde_json::json!({"Score": n.parse::<u8>().unwrap()}),
                None => serde_json::json!({"Unscored": "no `Score: N` line"}),
            })
            .collect();
        serde_json::json!({"prompt_id": p, "sample": s, "texts": texts, "verdicts": verdicts, "probs": null, "score": null}).to_string() + "\n"
    };
    put(
        "judgements",
        j("a", 0, &["Score: 5", "Score: 1", "Score: 3"])
            + &j("a", 1, &["Score: 2", "nothing", "Score: 4"])
            + &j("b", 0, &["Score: 4", "Score: 4", "Score: 4"])
            + &j("b", 1, &["Score: 4", "nothing", "nothing"]),
    );
    for prefix in ["generator", "judge"] {
        digests.insert(format!("{prefix}.weights"), digests["model.weights"]);
        externals.insert(format!("{prefix}.weights"), model.join("model.safetensors"));
    }
    let step = MetaJudge {
        iteration: 1,
        max_responses: 0,
        response_share: 1.0,
        max_per_prompt: 0,
        max_new_tokens: 8,
        temperature: 0.7,
        top_p: 0.9,
        batch_size: 2,
        commit_batches,
        template: DEFAULT_META_PROMPT.into(),
        judge_template: tsr_steps::rules::verdict::DEFAULT_RUBRIC.into(),
        prompt_attention: None,
    };
    let scratch = dir.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let counting = Arc::new(Counting {
        inner: journal.clone(),
        commits: Default::default(),
    });
    let ctx = StepContext::new(
        "meta",
        Digest::of(b"a step key"),
        scratch,
        "cpu",
        StopFlag::new(),
        counting.clone(),
        Progress::hidden(),
    );
    let inputs = StepInputs::new(blobs, digests, externals);
    let out = step.run(&inputs, &ctx).unwrap();
    assert_eq!(
        out.names().collect::<Vec<_>>(),
        vec!["comparisons", "pairs", "summary"]
    );
    let items = journal
        .all()
        .unwrap()
        .into_iter()
        .map(|(_, b)| serde_json::from_slice(&b).unwrap())
        .collect();
    let commits = counting.commits.lock().unwrap().clone();
    (items, commits)
}

fn run_meta_step(dir: &Path, journal: Arc<MemoryJournal>) -> Vec<Comparison> {
    let (items, commits) = run_meta_step_units(dir, journal, 1);
    assert!(commits.iter().all(|c| c.len() == 1), "{commits:?}");
    items
}

#[test]
fn the_meta_judge_step_compares_both_orders_deterministically_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = || {
        Arc::new(MemoryJournal::new(
            BlobStore::open(dir.path().join("jb"), dir.path().join("jt")).unwrap(),
        ))
    };
    let first = run_meta_step(dir.path(), fresh());
    let ids: Vec<(&str, u32)> = first
        .iter()
        .map(|c| (c.prompt_id.as_str(), c.sample))
        .collect();
    // Variance: (a, 0) of {5, 1, 3} = 8/3 > (a, 1) of {2, 4} = 1.
    assert_eq!(ids, vec![("a", 0), ("a", 1)]);
    assert_eq!((first[0].a, first[0].b, first[0].scores), (0, 1, [5, 1]));
    assert_eq!((first[1].a, first[1].b, first[1].scores), (0, 2, [2, 4]));
    for c in &first {
        assert_ne!(
            c.meta_seeds[0], c.meta_seeds[1],
            "each order has its own seed"
        );
        assert_eq!(
            c.decision,
            decide(&c.meta_verdicts[0], &c.meta_verdicts[1], c.a, c.b)
        );
        assert!(c.tokens.iter().all(|&t| t > 0));
    }
    assert_ne!(first[0].meta_seeds, first[1].meta_seeds);
    // Deterministic: a second run with a fresh journal makes the same items.
    assert_eq!(run_meta_step(dir.path(), fresh()), first);
    // Resume: with item 0 already committed, only item 1 is generated, and the result is equal.
    let partial = fresh();
    partial
        .commit(&[(0, serde_json::to_vec(&first[0]).unwrap())])
        .unwrap();
    assert_eq!(run_meta_step(dir.path(), partial), first);
}

/// `[meta] commit_batches`: both compared responses (4 requests on 2 rows) go to the model in
/// one commit, a row that ends taking the next request; each comparison is whole (both orders,
/// the decision its verdicts give), equal to the batch-at-a-time step's under the same key, and
/// a second run makes the same bytes.
#[test]
fn the_meta_judge_step_commits_several_batches_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = || {
        Arc::new(MemoryJournal::new(
            BlobStore::open(dir.path().join("jb"), dir.path().join("jt")).unwrap(),
        ))
    };
    let (one, units) = run_meta_step_units(dir.path(), fresh(), 1);
    assert_eq!(units, vec![vec![0], vec![1]]);
    let (two, units) = run_meta_step_units(dir.path(), fresh(), 2);
    assert_eq!(units, vec![vec![0, 1]], "one commit of two batches");
    assert_eq!(two.len(), 2);
    // Under the same key, the same comparisons: seeds come from the key and the item, and a
    // request generates what it would alone, whichever row it takes.
    assert_eq!(one, two);
    for c in &two {
        assert_ne!(c.meta_seeds[0], c.meta_seeds[1]);
        assert_eq!(
            c.decision,
            decide(&c.meta_verdicts[0], &c.meta_verdicts[1], c.a, c.b)
        );
        assert!(c.tokens.iter().all(|&t| t > 0), "{c:?}");
    }
    assert_eq!(
        run_meta_step_units(dir.path(), fresh(), 2),
        (two, vec![vec![0, 1]])
    );
}

/// Runs `step` in process against a fresh in-memory journal; `inputs` are byte blobs, plus the
/// tiny model's four files under `model.*`. Returns each output's bytes.
fn run_step(
    dir: &Path,
    step: &dyn Step,
    inputs: &[(&str, Vec<u8>)],
    label: &str,
) -> BTreeMap<String, Vec<u8>> {
    let (blobs, mut digests, externals, _) = tiny_model_inputs(dir);
    for (name, bytes) in inputs {
        digests.insert(name.to_string(), blobs.put_bytes(bytes).unwrap());
    }
    let scratch = dir.join(format!("scratch-{label}"));
    std::fs::create_dir_all(&scratch).unwrap();
    let ctx = StepContext::new(
        label,
        Digest::of(label.as_bytes()),
        scratch,
        "cpu",
        StopFlag::new(),
        Arc::new(MemoryJournal::new(blobs.clone())),
        Progress::hidden(),
    );
    let out = step
        .run(&StepInputs::new(blobs, digests, externals), &ctx)
        .unwrap();
    out.names()
        .map(|n| {
            let bytes = match out.data(n).unwrap() {
                tsr_engine::OutputData::Bytes(b) => b.clone(),
                tsr_engine::OutputData::File(p) => std::fs::read(p).unwrap(),
                tsr_engine::OutputData::Blob(_) => panic!("unexpected blob output {n}"),
            };
            (n.to_string(), bytes)
        })
        .collect()
}

/// A judge pair (made by `judge_pair` from an agreed comparison) mixed with an actor pair goes
/// through `ref-logprobs` and `dpo` like any pair: its reference log-probs are of the judgement
/// texts after the rendered judge prompt, and it changes the trained model.
#[test]
fn a_judge_pair_is_scored_by_the_reference_and_trained_on_by_dpo() {
    use tsr_steps::kinds::dpo::{Dpo, DpoReport};
    use tsr_steps::kinds::ref_logprobs::{RefLogps, ReferenceLogprobs};
    use tsr_steps::records::Judgement;
    use tsr_steps::records::MetaVerdict;
    use tsr_steps::records::Pair;
    use tsr_steps::rules::judge_pairs::{judge_pair, mix, Decision, JudgePairContext};

    let dir = tempfile::tempdir().unwrap();
    let judge_prompt = tsr_steps::rules::verdict::DEFAULT_RUBRIC
        .replace("{prompt}", "Name a colour.")
        .replace("{response}", "Blue.");
    let judgement = Judgement {
        prompt_id: "p1".into(),
        sample: 0,
        texts: vec![
            "The response names a colour. Score: 5".into(),
            "Off topic. Score: 1".into(),
        ],
        verdicts: vec![],
        probs: None,
        score: Some(3.0),
    };
    let comparison = Comparison {
        prompt_id: "p1".into(),
        sample: 0,
        variance: 4.0,
        a: 0,
        b: 1,
        scores: [5, 1],
        tokens: [9, 5],
        meta_texts: ["A".into(), "B".into()],
        meta_verdicts: [MetaVerdict::A, MetaVerdict::B],
        meta_seeds: [1, 2],
        decision: Decision::Prefer { judgement: 0 },
    };
    let ctx = JudgePairContext {
        iteration: 1,
        judge_prompt: &judge_prompt,
        response_text: "Blue.",
        generator_model: tsr_state::Digest::of(b"g"),
        judge_model: tsr_state::Digest::of(b"j"),
        judge_template_digest: "t",
        meta_model: tsr_state::Digest::of(b"m"),
        meta_template_digest: "mt",
    };
    let judge = judge_pair(&comparison, &judgement, &ctx).expect("an agreed comparison");
    assert!(judge.is_judge());
    let mut actor: Pair = judge.clone();
    actor.pair_id = "i1-p1".into();
    actor.kind = None;
    actor.meta = None;
    actor.prompt = "Name a colour.".into();
    actor.chosen.text = "Blue.".into();
    actor.rejected.text = "I like turtles very much.".into();
    let (mixed, kept) = mix(vec![actor.clone()], vec![judge.clone()], 1.0, 7);
    assert_eq!(kept, 1);

    let dpo = Dpo {
        beta: 0.1,
        loss: tsr_dpo::DpoLossKind::Sigmoid,
        lr: 1e-2,
        warmup_steps: 0,
        epochs: 2,
        micro_batch: 1,
        accum_steps: 1,
        max_grad_norm: Some(1.0),
        weight_decay: 0.0,
        checkpoint_every: 1,
        lora: None,
    };
    let train = |pairs: &[Pair], label: &str| {
        let jsonl = tsr_steps::lm::to_jsonl(pairs);
        let refs = run_step(
            dir.path(),
            &ReferenceLogprobs { batch_size: 2 },
            &[("pairs", jsonl.clone())],
            &format!("ref-{label}"),
        );
        let out = run_step(
            dir.path(),
            &dpo,
            &[("pairs", jsonl), ("ref_logps", refs["logps"].clone())],
            &format!("dpo-{label}"),
        );
        let rows: Vec<RefLogps> = tsr_steps::lm::from_jsonl(&refs["logps"], "logps").unwrap();
        let report: DpoReport = serde_json::from_slice(&out["metrics"]).unwrap();
        (rows, report, Digest::of(&out["weights"]))
    };
    let (rows, report, with_judge) = train(&mixed, "mixed");
    let (_, alone, without_judge) = train(&[actor], "actor");

    let judge_row = rows.iter().find(|r| r.pair_id == judge.pair_id).unwrap();
    assert!(
        judge_row.chosen < 0.0 && judge_row.rejected < 0.0,
        "{judge_row:?}"
    );
    assert!(
        judge_row.chosen_tokens > judge_row.rejected_tokens,
        "{judge_row:?}"
    );
    assert_eq!((report.pairs, report.steps), (2, 4), "2 pairs x 2 epochs");
    assert_eq!((alone.pairs, alone.steps), (1, 2));
    assert_ne!(
        with_judge, without_judge,
        "the judge pair changed the trained model"
    );
}
