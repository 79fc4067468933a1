//! Helpers shared by the CLI integration tests: run the `tsr` binary against a store and read
//! what it recorded.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

pub mod llama_server;
pub mod proxy;
pub mod s3;
pub mod sharded;
pub mod slurm;

/// `tsr plan CONFIG --json` with memory enough for any plan (1 TB), as JSON.
pub fn plan_json(cfg: &Path, store: &Path) -> serde_json::Value {
    let o = tsr(
        &["plan", cfg.to_str().unwrap(), "--json", "--memory", "1TB"],
        store,
    );
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The node `name` of a plan's JSON (see [`plan_json`]).
pub fn plan_node<'a>(plan: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    plan["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == name)
        .unwrap_or_else(|| panic!("no node {name} in {plan}"))
}

/// The `tsr` binary the tests run: this build's, or `TSR_TEST_EXE` where set
/// (`scripts/as-avx2.sh` points it at this build run by an emulated CPU of another kind).
pub fn tsr_exe() -> std::path::PathBuf {
    std::env::var_os("TSR_TEST_EXE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_tsr").into())
}

/// Run `tsr ARGS --store STORE` and capture its output.
pub fn tsr(args: &[&str], store: &Path) -> Output {
    Command::new(tsr_exe())
        .args(args)
        .arg("--store")
        .arg(store)
        .output()
        .unwrap()
}

/// Standard output and error together, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `tsr status RUN --json`, parsed.
pub fn status(store: &Path, run: &str) -> serde_json::Value {
    let o = tsr(&["status", run, "--json"], store);
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The digest of one output of one node, from a status document.
pub fn output_of(v: &serde_json::Value, node: &str, output: &str) -> String {
    let n = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == node)
        .unwrap_or_else(|| panic!("no node {node}"));
    n["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o[0] == output)
        .unwrap()[1]
        .as_str()
        .unwrap()
        .to_string()
}

/// The bytes of a blob of the store.
pub fn blob(store: &Path, digest: &str) -> Vec<u8> {
    std::fs::read(store.join("blobs").join(&digest[..2]).join(&digest[2..])).unwrap()
}

/// Where a test stops a run: in step `node`, at the `unit`-th unit boundary (from 1) that the
/// step reaches in the new process, then `after_ms` later (0: at the boundary itself), but never
/// past the step's next unit boundary.
#[derive(Clone, Debug)]
pub struct KillAt {
    pub node: String,
    pub unit: u64,
    pub after_ms: u64,
}

impl KillAt {
    pub fn new(node: &str, unit: u64, after_ms: u64) -> KillAt {
        KillAt {
            node: node.to_string(),
            unit,
            after_ms,
        }
    }
}

/// How long the kill tests wait for an event before they call the run hung (a guard against a
/// test that never ends, far beyond any machine's speed; no test relies on it).
const HUNG: std::time::Duration = std::time::Duration::from_secs(600);

/// Whether process `pid` is stopped (state `T` in /proc).
pub fn is_stopped(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": the state follows the last ')'.
    stat.rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
}

/// Wait for `event` on behalf of `child`, failing (with the child killed) only if it never comes.
pub fn wait_event(
    child: &mut std::process::Child,
    what: &str,
    mut event: impl FnMut(&mut std::process::Child) -> bool,
) {
    let t0 = std::time::Instant::now();
    while !event(child) {
        if t0.elapsed() > HUNG {
            let _ = child.kill();
            panic!(
                "no {what} after {HUNG:?}: the run hangs{}",
                slurm::diagnosis()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Spawn `cmd` with `TSR_TEST_PAUSE_AT` set so that it stops itself at `at`, and again at the
/// step's next unit boundary (see the engine's `should_stop`), and wait for the first stop:
/// `Ok(child)` stopped there, or `Err(output)` when it exited first (it never reached that
/// unit). The child is killed if the test's thread ends first (a failed assertion never leaves a
/// stopped run behind holding its store).
pub fn spawn_paused(
    mut cmd: Command,
    at: &KillAt,
) -> Result<std::process::Child, std::process::Output> {
    use std::os::unix::process::CommandExt;
    cmd.env(
        "TSR_TEST_PAUSE_AT",
        format!("{}#{},{}", at.node, at.unit, at.unit + 1),
    );
    // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let mut exited = false;
    wait_event(&mut child, "stop", |c| {
        exited = c.try_wait().unwrap().is_some();
        exited || is_stopped(c.id())
    });
    if exited {
        return Err(child.wait_with_output().unwrap());
    }
    Ok(child)
}

/// SIGCONT a stopped child and wait until it runs again.
fn resume(child: &mut std::process::Child) {
    unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
    wait_event(child, "resume", |c| {
        c.try_wait().unwrap().is_some() || !is_stopped(c.id())
    });
}

/// Let a child stopped at a unit boundary go on for `after_ms`, or until it stops again at the
/// step's next boundary if that comes first, then SIGKILL it: the kill lands inside the unit
/// after the boundary, at a seeded point of its work, blob writes and commit. Returns whether it
/// was still running (not finished).
pub fn kill_after(child: &mut std::process::Child, after_ms: u64) -> bool {
    if after_ms > 0 {
        resume(child);
        let t0 = std::time::Instant::now();
        let moment = std::time::Duration::from_millis(after_ms);
        while t0.elapsed() < moment
            && !is_stopped(child.id())
            && child.try_wait().unwrap().is_none()
        {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }
    if child.try_wait().unwrap().is_some() {
        return false;
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    true
}

/// Send SIGTERM to a child stopped at a unit boundary, let it run (through its stop at the next
/// boundary) and return its output once it exits.
pub fn terminate(mut child: std::process::Child) -> std::process::Output {
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    resume(&mut child);
    wait_event(&mut child, "exit", |c| {
        if c.try_wait().unwrap().is_some() {
            return true;
        }
        if is_stopped(c.id()) {
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
        }
        false
    });
    child.wait_with_output().unwrap()
}

/// `tsr run CONFIG --quiet --store STORE` with its output discarded (the way the kill tests
/// start a run).
pub fn run_command(cfg: &Path, store: &Path) -> Command {
    let mut c = Command::new(tsr_exe());
    c.args(["run", cfg.to_str().unwrap(), "--quiet", "--store"])
        .arg(store)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    c
}

/// Start `tsr run CONFIG` on `store` once per planned kill, wait until it stops itself there
/// and SIGKILL it within the next unit (see [`kill_after`]). Panics when a run finishes before
/// its planned kill or a kill leaves its step finished, naming it: every planned kill lands in
/// its step, whatever the machine's speed. Returns, for each kill, the (kind, node) of the steps
/// it left unfinished.
pub fn kill_in_steps(
    cfg: &Path,
    store: &Path,
    run: &str,
    plan: &[KillAt],
) -> Vec<Vec<(String, String)>> {
    let mut landed = Vec::new();
    for at in plan {
        let mut child = match spawn_paused(run_command(cfg, store), at) {
            Ok(c) => c,
            Err(o) => panic!(
                "the run never reached {at:?} (exit {:?}): {}",
                o.status.code(),
                text(&o)
            ),
        };
        assert!(
            kill_after(&mut child, at.after_ms),
            "the run finished after {at:?}"
        );
        let left = unfinished_kinds(store, run);
        assert!(
            left.iter().any(|(_, n)| *n == at.node),
            "{at:?} left {left:?} unfinished, not its step"
        );
        landed.push(left);
    }
    landed
}

/// Run `tsr run CONFIG` uninterrupted on `store` as a reference: its status and how many unit
/// boundaries each of its steps reached (`TSR_TEST_UNIT_LOG`), for planning kills.
pub fn reference_run(
    cfg: &Path,
    store: &Path,
    run: &str,
) -> (serde_json::Value, std::collections::BTreeMap<String, u64>) {
    let log = store.with_extension("units");
    let o = Command::new(tsr_exe())
        .args(["run", cfg.to_str().unwrap(), "--quiet", "--store"])
        .arg(store)
        .env("TSR_TEST_UNIT_LOG", &log)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let mut units = std::collections::BTreeMap::new();
    for l in std::fs::read_to_string(&log).unwrap_or_default().lines() {
        *units.entry(l.to_string()).or_insert(0) += 1;
    }
    (status(store, run), units)
}

/// Kills spread over a run: for each node of the reference status (in the run's order) with unit
/// boundaries, `per_node` kills (fewer where it has fewer than `4 * per_node` units: one per 4
/// units, at least one) at its first or second remaining unit, each a seeded moment later: up to
/// the step's mean time per unit in the reference run (the stop at the next boundary bounds it
/// whatever the machine's speed). A step of one unit is killed at its boundary.
pub fn plan_kills(
    reference: &serde_json::Value,
    units: &std::collections::BTreeMap<String, u64>,
    per_node: u64,
    seed: u64,
) -> Vec<KillAt> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut plan = Vec::new();
    for n in reference["nodes"].as_array().unwrap() {
        let node = n["node"].as_str().unwrap();
        let u = units.get(node).copied().unwrap_or(0);
        if u == 0 {
            continue;
        }
        let kills = per_node.min(u / 4).max(1);
        let unit_ms = if u >= 2 {
            (n["busy_s"].as_f64().unwrap_or(0.0) * 1000.0 / u as f64) as u64
        } else {
            0
        };
        for k in 0..kills {
            plan.push(KillAt::new(node, 1 + k % 2, rng.gen_range(0..=unit_ms)));
        }
    }
    plan
}

/// The kill test of a workflow: an uninterrupted reference run, then `per_node` SIGKILLs inside
/// every step with units (see [`plan_kills`]), each of which must leave its step unfinished, a
/// final run, and every node's outputs equal to the reference's. Returns the number of kills.
pub fn assert_kills_change_nothing(
    cfg: &Path,
    dir: &Path,
    run: &str,
    per_node: u64,
    seed: u64,
) -> usize {
    let reference = dir.join("ref");
    let (v, units) = reference_run(cfg, &reference, run);
    let plan = plan_kills(&v, &units, per_node, seed);
    assert!(
        plan.len() >= 2,
        "only {} kills planned: {units:?}",
        plan.len()
    );
    let store = dir.join("killed");
    kill_in_steps(cfg, &store, run, &plan);
    let o = tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &store);
    assert!(o.status.success(), "{}", text(&o));
    assert_same_outputs(
        &reference,
        &store,
        run,
        &format!("after {} kills", plan.len()),
    );
    plan.len()
}

/// The kinds of the steps that a killed run left unfinished (its store's status): where a kill
/// landed.
pub fn unfinished_kinds(store: &Path, run: &str) -> Vec<(String, String)> {
    status(store, run)["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["state"] == "interrupted")
        .map(|n| {
            (
                n["kind"].as_str().unwrap().to_string(),
                n["node"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Every node of `run` has the same outputs in both stores.
pub fn assert_same_outputs(reference: &Path, store: &Path, run: &str, why: &str) {
    let a = status(reference, run);
    let b = status(store, run);
    for n in a["nodes"].as_array().unwrap() {
        let name = n["node"].as_str().unwrap();
        let m = b["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["node"] == name)
            .unwrap();
        assert_eq!(n["outputs"], m["outputs"], "node {name} differs {why}");
    }
}

/// Run `tsr ARGS --store STORE` with its standard output closed before it writes anything, as
/// `tsr ... | true` (or `| head` after the first line) does.
pub fn tsr_with_closed_stdout(args: &[&str], store: &Path) -> Output {
    let mut child = Command::new(tsr_exe())
        .args(args)
        .arg("--store")
        .arg(store)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    child.wait_with_output().unwrap()
}

/// Copy a folder recursively (a store's database, to put an older copy back).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

/// `tsr logprobs --model MODEL [--adapter DIR] --pairs PAIRS --json`: the summed log-prob of
/// each line.
pub fn logprobs(model: &Path, adapter: Option<&Path>, pairs: &Path, store: &Path) -> Vec<f64> {
    let mut args = vec![
        "logprobs".to_string(),
        "--model".into(),
        model.display().to_string(),
        "--pairs".into(),
        pairs.display().to_string(),
        "--json".into(),
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter".to_string(), a.display().to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = tsr(&args, store);
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["logprob"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

/// The cache `scripts/test.sh` installs into: `$TSR_CACHE`, else `$XDG_CACHE_HOME/tsr`, else
/// `~/.cache/tsr`.
pub fn cache_dir() -> std::path::PathBuf {
    use std::path::PathBuf;
    std::env::var_os("TSR_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|x| PathBuf::from(x).join("tsr")))
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/tsr")
        })
}

/// The kind of CPU whose float results a fixture holds: [`tsr_model::testing::fixture_kind`],
/// named by how this machine's gemm adds long products (`avx512`, `avx2`, `avx2-l1d48k`; a
/// machine of no known kind gets its vector features' kind).
#[allow(dead_code)]
pub fn cpu_kind() -> String {
    tsr_model::testing::fixture_kind()
}

/// For a message about digests that differ from a fixture's: nothing where this machine's gemm
/// is that of a known kind, else that it is not (the digests may differ for that alone).
#[allow(dead_code)]
pub fn cpu_kind_caveat() -> String {
    if tsr_model::testing::fixture_kind_is_known() {
        String::new()
    } else {
        format!(
            "\n  This CPU's gemm probe ({}) is not one of the kinds the fixtures were made on, so \
             its products may add in another order than the `{}` set's machine: make a set for \
             it (tests/goldens.rs, scripts/old_store_golden.sh) and add the probe to \
             FIXTURE_KINDS in model/src/testing.rs.",
            tsr_model::testing::gemm_probe(),
            cpu_kind()
        )
    }
}

/// The folder of a fixture set made on this machine's [`cpu_kind`]: `base` itself for
/// AVX-512 (the kind the sets were first made on), else `base/<kind>`. Fails naming the kind
/// and how to make the set where there is none.
#[allow(dead_code)]
pub fn fixtures_for_this_cpu(base: &std::path::Path, make: &str) -> std::path::PathBuf {
    let kind = cpu_kind();
    // Blessing on a machine of no known kind would overwrite the set of its vector features.
    assert!(
        std::env::var_os("TSR_BLESS_GOLDENS").is_none()
            || tsr_model::testing::fixture_kind_is_known(),
        "this CPU's gemm probe ({}) is no known kind's, so blessing would overwrite the `{kind}` \
         set: add the probe as `{}` to FIXTURE_KINDS in model/src/testing.rs first",
        tsr_model::testing::gemm_probe(),
        tsr_model::testing::fixture_kind_to_make()
    );
    let dir = if kind == "avx512" {
        base.to_path_buf()
    } else {
        base.join(&kind)
    };
    assert!(
        dir.is_dir() || std::env::var_os("TSR_BLESS_GOLDENS").is_some(),
        "{} is missing: its digests are made on a CPU of this kind ({kind}), whose gemm kernels \
         add in another order than other kinds'; make them on such a machine with {make}, and \
         add the kind's gemm probe ({}) to FIXTURE_KINDS in model/src/testing.rs",
        dir.display(),
        tsr_model::testing::gemm_probe()
    );
    dir
}
