//! What a refactor must not change, recorded from the code before it: for every tiny-model
//! workflow variant, each node's kind, step key and output digests (the final model included),
//! the run's stored definition, and `tsr lineage --json` of a pair, a model, a training prompt
//! and a held-out prompt. The fixtures are in `tests/fixtures/goldens/`.
//!
//! A difference fails with the first node (or line) that differs. Step keys hash each kind's
//! version and settings, so a change there is a change of behaviour: resumed runs would redo the
//! step. Only an intended change of behaviour may rewrite the fixtures, with
//! `TSR_BLESS_GOLDENS=1 scripts/test.sh --test goldens`, in the same commit as the change and with
//! the reason in its message.
//!
//! The digests depend on the kind of CPU, named by how its gemm adds (`common::cpu_kind`: with
//! AVX-512 or AVX2 it picks other kernels, and on AVX2 another L1d sizes its depth slices
//! otherwise): AVX-512 in `tests/fixtures/goldens/`, AVX2 with a Zen 3's L1d in `avx2/`, AVX2
//! with a 48K 12-way L1d in `avx2-l1d48k/` (the same files since new runs' prompt attention is
//! fused, but not by construction). An intended change is blessed for each kind; a set blessed
//! on one kind only leaves the others stale, and the test then fails on machines of those kinds.
//! On a machine with AVX-512, `TSR_BLESS_GOLDENS=1 scripts/as-avx2.sh test --test goldens` (and
//! with `--l1d 48K:12` first) blesses the AVX2 sets under qemu-user, and the same without
//! `TSR_BLESS_GOLDENS` checks them.

mod common;

use common::*;

use std::path::{Path, PathBuf};

const PROMPTS: &str = "{\"id\": \"a\", \"prompt\": \"hello there\"}\n{\"id\": \"b\", \"prompt\": \"name a colour\"}\n{\"id\": \"c\", \"prompt\": \"count to three\"}\n";
const HELD_OUT: &str =
    "{\"id\": \"e1\", \"prompt\": \"say hi\"}\n{\"id\": \"e2\", \"prompt\": \"list two fruits\"}\n";

fn fixtures() -> PathBuf {
    fixtures_for_this_cpu(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/goldens"),
        "`TSR_BLESS_GOLDENS=1 scripts/test.sh --test goldens`",
    )
}

fn blessing() -> bool {
    std::env::var_os("TSR_BLESS_GOLDENS").is_some_and(|v| v == "1")
}

/// Compare `got` with the fixture `name`, or write it when blessing.
fn check(name: &str, got: &str) {
    let path = fixtures().join(name);
    if blessing() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; write it with TSR_BLESS_GOLDENS=1 only for an intended change",
            path.display()
        )
    });
    differs(&path, &want, got);
}

/// Fails naming the first line where `got` differs from the fixture at `path`.
fn differs(path: &Path, want: &str, got: &str) {
    if want != got {
        let line = want
            .lines()
            .zip(got.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(want.lines().count().min(got.lines().count()));
        panic!(
            "{} differs from what this code makes, first at line {}:\n  fixture: {}\n  now:     {}{}",
            path.display(),
            line + 1,
            want.lines().nth(line).unwrap_or("<end>"),
            got.lines().nth(line).unwrap_or("<end>"),
            cpu_kind_caveat()
        );
    }
}

/// [`check`] for a lineage document whose `generated_by` and `judged_by` records (host, pid,
/// time: this machine's) are first checked to name the driver, then left out; compared as JSON.
fn check_without_workers(name: &str, got: &str) {
    fn strip(v: &mut serde_json::Value, seen: &mut usize) {
        match v {
            serde_json::Value::Object(m) => {
                for key in ["generated_by", "judged_by"] {
                    if let Some(w) = m.remove(key) {
                        assert_eq!(w["executor"], "local", "{key}: {w}");
                        assert!(w["pid"].as_u64().is_some() && w["host"].is_string(), "{w}");
                        *seen += 1;
                    }
                }
                m.values_mut().for_each(|v| strip(v, seen));
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(|v| strip(v, seen)),
            _ => {}
        }
    }
    let mut v: serde_json::Value = serde_json::from_str(got).unwrap();
    let mut seen = 0;
    strip(&mut v, &mut seen);
    assert!(seen > 0, "{name}: no record of who computed the items");
    let got = serde_json::to_string_pretty(&v).unwrap();
    let path = fixtures().join(name);
    if blessing() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    differs(&path, &serde_json::to_string_pretty(&want).unwrap(), &got);
}

/// Run the config `body` (with the tiny model, the prompts and the held-out prompts beside it)
/// and return the store.
fn run(dir: &Path, name: &str, body: &str) -> PathBuf {
    tsr_model::testing::write_tiny_hf_model(&dir.join("tiny"), 5);
    std::fs::write(dir.join("prompts.jsonl"), PROMPTS).unwrap();
    std::fs::write(dir.join("held-out.jsonl"), HELD_OUT).unwrap();
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg, format!("name = \"{name}\"\n{body}")).unwrap();
    let store = dir.join("store");
    let o = tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &store);
    assert!(o.status.success(), "{name}: {}", text(&o));
    store
}

/// Each node's kind, step key and outputs, one node per line, and the stored definition (its
/// paths under the test's folder written as `<dir>`).
fn record(store: &Path, name: &str) {
    let dir = store.parent().unwrap().to_str().unwrap();
    let v = status(store, name);
    let mut out = String::new();
    for n in v["nodes"].as_array().unwrap() {
        out.push_str(
            &serde_json::to_string(&serde_json::json!({
                "node": n["node"],
                "kind": n["kind"],
                "step_key": n["step_key"],
                "outputs": n["outputs"],
            }))
            .unwrap(),
        );
        out.push('\n');
    }
    check(&format!("{name}.steps.jsonl"), &out);

    let s = tsr_state::Store::open_existing_nowait(store).unwrap();
    let rec = s.run(name).unwrap();
    let mut def = format!(
        "workflow = {:?}\n# config_toml\n{}",
        rec.workflow, rec.config_toml
    );
    def.push_str("# definition\n");
    for (k, v) in &rec.definition {
        def.push_str(&format!("{k} = {v}\n"));
    }
    def.push_str("# externals\n");
    for (k, d) in &rec.externals {
        def.push_str(&format!("{k} = {}\n", d.to_hex()));
    }
    check(
        &format!("{name}.definition.txt"),
        &def.replace(dir, "<dir>"),
    );
}

const COMMON: &str =
    "iterations = 1\n[model]\nsource = \"tiny\"\n[prompts]\nfile = \"prompts.jsonl\"\n\
                      [generate]\nk = 3\nmax_new_tokens = 6\nbatch_size = 4\n";

#[test]
fn temporal_with_eval_two_iterations_and_its_lineage() {
    let dir = tempfile::tempdir().unwrap();
    let store = run(
        dir.path(),
        "temporal",
        "workflow = \"temporal\"\niterations = 2\n[model]\nsource = \"tiny\"\n[prompts]\nfile = \"prompts.jsonl\"\n\
         [generate]\nk = 3\nmax_new_tokens = 6\nbatch_size = 4\n\
         [judge]\nmode = \"logprob\"\nsamples = 2\nbatch_size = 4\n\
         [dpo]\nlr = 1e-3\nmicro_batch = 1\naccum_steps = 2\ncheckpoint_every = 1\n\
         [eval]\nprompts = \"held-out.jsonl\"\nmax_new_tokens = 8\nbatch_size = 3\n",
    );
    record(&store, "temporal");
    let st = status(&store, "temporal");
    let last = output_of(&st, "iter2/dpo-next", "weights");
    let o = tsr(
        &[
            "export",
            "temporal",
            "pairs",
            "--out",
            dir.path().join("pairs.jsonl").to_str().unwrap(),
        ],
        &store,
    );
    assert!(o.status.success(), "{}", text(&o));
    let pairs = std::fs::read_to_string(dir.path().join("pairs.jsonl")).unwrap();
    check("temporal.pairs.jsonl", &pairs);
    let last_pair: serde_json::Value = serde_json::from_str(pairs.lines().last().unwrap()).unwrap();
    let pair_id = last_pair["pair_id"].as_str().unwrap().to_string();
    for (what, arg) in [
        ("pair", pair_id.as_str()),
        ("model", &last[..16]),
        ("prompt", "b"),
        ("eval", "e2"),
    ] {
        let o = tsr(&["lineage", "temporal", what, arg, "--json"], &store);
        assert!(o.status.success(), "lineage {what}: {}", text(&o));
        let name = format!("temporal.lineage-{what}.json");
        let got = String::from_utf8(o.stdout).unwrap();
        match what {
            "prompt" | "eval" => check_without_workers(&name, &got),
            _ => check(&name, &got),
        }
    }
}

#[test]
fn self_rewarding_past_only_and_future_only() {
    for workflow in ["self-rewarding", "past-only", "future-only"] {
        let dir = tempfile::tempdir().unwrap();
        let store = run(
            dir.path(),
            workflow,
            &format!(
                "workflow = \"{workflow}\"\n{COMMON}\
                 [judge]\nmode = \"text\"\nsamples = 2\nmax_new_tokens = 6\nbatch_size = 4\n\
                 [dpo]\nlr = 1e-3\nmicro_batch = 1\naccum_steps = 2\ncheckpoint_every = 1\n"
            ),
        );
        record(&store, workflow);
    }
}

#[test]
fn meta_rewarding_and_temporal_meta() {
    for workflow in ["meta-rewarding", "temporal-meta"] {
        let dir = tempfile::tempdir().unwrap();
        let store = run(
            dir.path(),
            workflow,
            &format!(
                "workflow = \"{workflow}\"\n{COMMON}\
                 [judge]\nmode = \"text\"\nsamples = 2\nmax_new_tokens = 6\nbatch_size = 4\n\
                 length_band_per_iteration = [0.5]\n\
                 [meta]\nmax_new_tokens = 6\nbatch_size = 4\n\
                 [dpo]\nlr = 1e-3\nmicro_batch = 1\naccum_steps = 2\ncheckpoint_every = 1\n"
            ),
        );
        record(&store, workflow);
    }
}

#[test]
fn lora_with_dropout_a_bf16_base_and_ipo() {
    let lora = "[judge]\nmode = \"logprob\"\nsamples = 1\nbatch_size = 4\n\
                [dpo]\nlr = 1e-2\nepochs = 2\nmicro_batch = 1\naccum_steps = 1\ncheckpoint_every = 1\nadapter = \"lora\"\n";
    for (name, body) in [
        (
            "lora-dropout",
            format!("workflow = \"temporal\"\n{COMMON}{lora}[dpo.lora]\nr = 4\nalpha = 8\ndropout = 0.1\n"),
        ),
        (
            "bf16-base",
            format!(
                "workflow = \"temporal\"\n{}{lora}[dpo.lora]\nr = 4\nalpha = 8\n",
                COMMON.replace("source = \"tiny\"\n", "source = \"tiny\"\ndtype = \"bf16\"\n")
            ),
        ),
        (
            "ipo",
            format!(
                "workflow = \"self-rewarding\"\n{COMMON}\
                 [judge]\nmode = \"logprob\"\nsamples = 1\nbatch_size = 4\n\
                 [dpo]\nloss = \"ipo\"\nbeta = 0.5\nlr = 1e-3\nmicro_batch = 1\naccum_steps = 2\ncheckpoint_every = 1\n"
            ),
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store = run(dir.path(), name, &body);
        record(&store, name);
    }
}

#[test]
fn eval_workflow() {
    let dir = tempfile::tempdir().unwrap();
    tsr_model::testing::write_tiny_hf_model(&dir.path().join("other"), 7);
    let store = run(
        dir.path(),
        "eval",
        "workflow = \"eval\"\n[model]\nsource = \"tiny\"\n\
         [eval]\nprompts = \"held-out.jsonl\"\nbaseline_model = \"other\"\nmax_new_tokens = 8\nbatch_size = 2\ntemperature = 0.8\n\
         [eval.judge]\nmode = \"text\"\nmax_new_tokens = 8\nbatch_size = 2\ntemperature = 0.7\n",
    );
    record(&store, "eval");
}
