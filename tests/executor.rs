//! The `processes` executor on a tiny random model: a temporal iteration with evaluation whose
//! item steps (generation, judging, reference log-probs, answers, evaluation judging) are
//! computed by worker processes gives every output of the same run in one process, also when
//! workers are killed in the middle of their shards; a shard that fails every time fails its
//! step with the worker's own message after its attempts.
//!
//! Every process runs one CPU thread (`RAYON_NUM_THREADS=1`, which the driver also gives each
//! worker), so the comparison is between the same computations on the same thread count.

mod common;

use common::sharded::*;
use common::*;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

#[test]
fn worker_processes_give_the_outputs_of_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let want = reference(dir.path());
    let cfg = setup(
        &dir.path().join("workers"),
        "[executor]\nkind = \"processes\"\nworkers = 2\n",
    );
    let store = dir.path().join("workers/store");
    let o = run(&cfg, &store);
    // Every item step went to the workers: generation (current, anchor, future), judging,
    // reference log-probs, answers and evaluation judging.
    assert_handed_over(&text(&o), "worker process(es)");
    same(&want, &results(&store));
    assert_computed_by(&store, "processes");

    // The same store continues under another executor: nothing is redone.
    let o = tsr(&["resume", "x", "--executor", "local"], &store);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("0 steps executed"), "{}", text(&o));
}

#[test]
fn worker_processes_through_a_remote_give_the_outputs_of_one_process() {
    use common::s3::{files_under, S3Server};
    let dir = tempfile::tempdir().unwrap();
    let want = reference(dir.path());
    let mut server = S3Server::start(&dir.path().join("s3"));
    let mut roomy = 0;
    for (name, limit) in [("roomy", "100"), ("tight", "0.000001")] {
        let cache = dir.path().join(format!("{name}/node-cache"));
        let cfg = setup(
            &dir.path().join(name),
            &format!(
                "[executor]\nkind = \"processes\"\nworkers = 2\nshare = \"remote\"\n\
                 node_cache = \"{}\"\nnode_cache_gb = {limit}\n",
                cache.display()
            ),
        );
        let store = dir.path().join(format!("{name}/store"));
        let mut c = command(&cfg, &store);
        c.args(["--remote", &server.url(name)]);
        for (k, v) in server.env() {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        let t = text(&o);
        assert!(o.status.success(), "{t}");
        assert!(
            t.contains(&format!(
                "workers take their inputs from {}",
                server.url(name)
            )),
            "{t}"
        );
        assert_handed_over(&t, "worker process(es)");
        same(&want, &results(&store));
        assert_computed_by(&store, "processes");
        // The workers read the model from the node cache, not from the store; each step's
        // folder in the remote is removed once its items are committed.
        let weights = output_of(&status(&store, "x"), "import", "weights");
        let cached = cache.join("blobs").join(&weights[..2]).join(&weights[2..]);
        let work = files_under(&server.object_path(name, "work"));
        assert!(work.is_empty(), "{work:?}");
        if name == "roomy" {
            // What a failed or abandoned step leaves in the remote's work/ is reported by
            // `verify --remote` and removed by `tsr gc` (here: a finished step's and an
            // unknown key's folders).
            let done_key = status(&store, "x")["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|n| n["node"] == "iter1/gen-current")
                .unwrap()["step_key"]
                .as_str()
                .unwrap()
                .to_string();
            for key in [done_key.as_str(), "not-a-step"] {
                let p = server.object_path(name, &format!("work/{key}/b/results/0.t"));
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, b"left behind").unwrap();
            }
            let o = server.tsr(&["verify", "--remote", &server.url(name)], &store);
            assert!(
                text(&o).contains("workers' results: 2 step folder(s) under work/ (22 bytes)"),
                "{}",
                text(&o)
            );
            let o = server.tsr(&["gc"], &store);
            assert!(o.status.success(), "{}", text(&o));
            assert!(
                text(&o).contains("removed the worker results of 2 finished or unknown steps"),
                "{}",
                text(&o)
            );
            let left = files_under(&server.object_path(name, "work"));
            assert!(left.is_empty(), "{left:?}");
        }
        let kept = files_under(&cache.join("blobs")).len();
        match name {
            "roomy" => {
                assert!(cached.is_file(), "{}", cached.display());
                roomy = kept;
            }
            // Over the limit, each worker removes what no worker reads: what is left is the
            // inputs of the last step (4 model files, the prompts, two sets of outputs).
            _ => assert!(kept < roomy && kept <= 7, "{kept} of {roomy}"),
        }
    }

    // The object store down for a while once workers have written results: the run says so,
    // waits (the driver for the results and the next step's inputs, the workers for their
    // writes and downloads), and goes on when it is back, with the same outputs.
    let name = "outage";
    let cfg = setup(
        &dir.path().join(name),
        &format!(
            "[executor]\nkind = \"processes\"\nworkers = 2\nshare = \"remote\"\nnode_cache = \"{}\"\n",
            dir.path().join("outage/node-cache").display()
        ),
    );
    let store = dir.path().join(format!("{name}/store"));
    let log = dir.path().join("outage/driver.log");
    let mut c = command(&cfg, &store);
    c.args(["--remote", &server.url(name)]);
    for (k, v) in server.env() {
        c.env(k, v);
    }
    c.stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut child = c.spawn().unwrap();
    let work = server.object_path(name, "work");
    wait_event(&mut child, "a worker's result in the remote", |c| {
        files_under(&work)
            .iter()
            .any(|p| p.parent().is_some_and(|d| d.ends_with("results")))
            || c.try_wait().unwrap().is_some()
    });
    server.stop();
    wait_event(&mut child, "the driver noticing the outage", |c| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("does not answer")
            || c.try_wait().unwrap().is_some()
    });
    server.restart();
    let status = child.wait().unwrap();
    let t = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{t}");
    // The executor's own lines name the step (the remote copy's start with `tsr: remote:`).
    let said = |what: &str| {
        t.lines()
            .any(|l| l.contains(what) && !l.starts_with("tsr: remote:"))
    };
    assert!(
        said("the remote does not answer (") && said("the remote answers again after"),
        "{t}"
    );
    same(&want, &results(&store));
}

/// Starts the run in `dir` under 2 worker processes, each of which stops itself (SIGSTOP)
/// before its second batch of `iter1/gen-current`: (store, the run).
fn spawn_pausing_workers(dir: &Path) -> (PathBuf, std::process::Child) {
    let cfg = setup(dir, "[executor]\nkind = \"processes\"\nworkers = 2\n");
    let store = dir.join("store");
    let mut c = command(&cfg, &store);
    c.env("TSR_TEST_PAUSE_AT", "iter1/gen-current#2")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = c.spawn().unwrap();
    (store, child)
}

/// How many times process `pid` has been switched out (voluntarily or not): it grows whenever
/// the process runs.
fn context_switches(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("ctxt_switches:"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
        .sum()
}

/// The worker processes that are stopped (`TSR_TEST_PAUSE_AT`) among the children of `parent`.
fn stopped_children(parent: u32) -> Vec<u32> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.first() == Some(&"T") && fields.get(1) == Some(&parent.to_string().as_str()) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn workers_killed_in_the_middle_of_their_shards_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let want = reference(dir.path());
    // Each worker of `iter1/gen-current` (6 batches, 3 per shard) stops itself before its
    // second batch: it has committed one and has more to do. The test kills it there; its
    // shard restarts without the batches that have a result, and stops again before its
    // second. So each shard is killed twice, at a batch boundary it provably reached.
    let (store, mut child) = spawn_pausing_workers(&dir.path().join("killed"));
    let mut killed = BTreeSet::new();
    wait_event(&mut child, "end of the run", |c| {
        for pid in stopped_children(c.id()) {
            if killed.insert(pid) {
                // SAFETY: kill only sends a signal to a stopped child of the run.
                unsafe {
                    libc::kill(pid as i32, libc::SIGKILL);
                }
            }
        }
        c.try_wait().unwrap().is_some()
    });
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(killed.len(), 4, "two kills per shard of 3 batches");
    same(&want, &results(&store));
}

/// A training step runs as one job in a worker process: SIGKILLed after its first checkpoint,
/// its next launch continues from that checkpoint, and the run ends with the outputs of one
/// process.
#[test]
fn a_training_worker_killed_after_a_checkpoint_continues_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let want = reference(dir.path());
    let run_dir = dir.path().join("dpo-killed");
    let cfg = setup(&run_dir, "[executor]\nkind = \"processes\"\nworkers = 2\n");
    let store = run_dir.join("store");
    let mut c = command(&cfg, &store);
    // Before its second optimizer step, so after its first checkpoint (one per step).
    c.env("TSR_TEST_PAUSE_AT", "iter1/dpo-future#2")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut seen = BTreeSet::new();
    wait_event(&mut child, "end of the run", |c| {
        for pid in stopped_children(c.id()) {
            if seen.insert(pid) {
                // SAFETY: signals only to a stopped child of the run.
                unsafe {
                    libc::kill(
                        pid as i32,
                        if seen.len() == 1 {
                            libc::SIGKILL
                        } else {
                            libc::SIGCONT
                        },
                    );
                }
            }
        }
        c.try_wait().unwrap().is_some()
    });
    let o = child.wait_with_output().unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert_eq!(seen.len(), 1, "only the first launch stops: {t}");
    assert!(
        t.contains("tsr: iter1/dpo-future: ran as one job by worker process, shard 0 (launch 2)")
            && t.contains("continued from checkpoint 0 (saved by 0-1)"),
        "{t}"
    );
    same(&want, &results(&store));
    // The final model's lineage names who trained it.
    let model = t
        .lines()
        .find_map(|l| l.strip_prefix("tsr: final model "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("{t}"));
    let o = tsr(&["lineage", "x", "model", model, "--json"], &store);
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("{}", text(&o)));
    let trained: Vec<&serde_json::Value> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h.get("dpo_step").is_some())
        .collect();
    // M1 comes from M0 by `iter1/dpo-next` (the future model is a side branch). When the
    // future model trained on the same pairs, it made the same weights: the hop then names the
    // first maker by name (`iter1/dpo-future`, whose first launch was killed) and the other.
    assert_eq!(trained.len(), 1, "{v}");
    let h = trained[0];
    assert_eq!(h["trained_by"]["executor"], "processes", "{h}");
    assert_eq!(h["trained_by"]["job"], "shard 0", "{h}");
    let (maker, launch) = match h["made_by"].as_str() {
        Some("iter1/dpo-next") => ("iter1/dpo-next", 1),
        Some("iter1/dpo-future") => {
            assert_eq!(
                h["also_made_by"],
                serde_json::json!(["iter1/dpo-next"]),
                "{h}"
            );
            ("iter1/dpo-future", 2)
        }
        other => panic!("made by {other:?}: {h}"),
    };
    let o = tsr(&["lineage", "x", "model", model], &store);
    assert!(
        text(&o).contains(&format!("<- {maker} ("))
            && text(&o).contains(&format!(
                "trained by worker process, shard 0 (launch {launch})"
            )),
        "{}",
        text(&o)
    );
    if maker == "iter1/dpo-future" {
        assert!(
            text(&o).contains("; the same weights also made by iter1/dpo-next"),
            "{}",
            text(&o)
        );
    }
}

/// Twenty worker SIGKILLs across four steps, at batch boundaries chosen by a seeded generator:
/// each worker stops itself before its second and fourth batch of `iter1/gen-current`,
/// `iter1/judge-current`, `iter1/gen-future` and `iter1/judge-future` (2 shards each), and the
/// test kills it or lets it go on, until it has killed 20.
#[test]
fn twenty_random_worker_kills_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let want = reference_k(dir.path(), 6);
    let run_dir = dir.path().join("random");
    let cfg = setup_k(
        &run_dir,
        "[executor]\nkind = \"processes\"\nworkers = 2\n",
        6,
    );
    let store = run_dir.join("store");
    let mut c = command(&cfg, &store);
    c.env(
        "TSR_TEST_PAUSE_AT",
        "iter1/gen-current#2,4;iter1/judge-current#2,4;iter1/gen-future#2,4;iter1/judge-future#2,4",
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    // Each stop is acted on once. A worker let go stops again before its fourth batch, and it
    // can do so before this loop sees it running: a stop is told from the last one by the
    // context switches the process made since (it ran in between), not by its pid.
    let mut acted: std::collections::BTreeMap<u32, u64> = Default::default();
    let (mut killed, mut released) = (0, 0);
    let mut rng: u64 = 0x7e57_5eed;
    wait_event(&mut child, "end of the run", |c| {
        for pid in stopped_children(c.id()) {
            let switches = context_switches(pid);
            if acted.get(&pid) == Some(&switches) {
                continue;
            }
            acted.insert(pid, switches);
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // About 3 in 4 stopped workers are killed, until 20 are.
            let kill = killed < 20 && !(rng >> 33).is_multiple_of(4);
            // SAFETY: signals to a stopped worker of the run.
            unsafe {
                libc::kill(pid as i32, if kill { libc::SIGKILL } else { libc::SIGCONT });
            }
            if kill {
                killed += 1;
            } else {
                released += 1;
            }
        }
        c.try_wait().unwrap().is_some()
    });
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(killed, 20, "{killed} kills, {released} let go");
    same(&want, &results(&store));
}

#[test]
fn a_shard_that_fails_every_time_fails_its_step_with_the_workers_message() {
    let dir = tempfile::tempdir().unwrap();
    // Workers on devices this machine does not have: each attempt fails the same way.
    let cfg = setup(
        dir.path(),
        "[executor]\nkind = \"processes\"\nworkers = 2\nmax_attempts = 2\ndevices = [\"cuda:998\", \"cuda:999\"]\n",
    );
    let store = dir.path().join("store");
    let o = command(&cfg, &store).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("failed 2 times"), "{t}");
    assert!(
        t.contains("cuda"),
        "the worker's own message is missing: {t}"
    );

    // Items per shard must be whole batches of every sharded step.
    let cfg = setup(
        dir.path(),
        "[executor]\nkind = \"processes\"\nworkers = 2\nshard_items = 3\n",
    );
    let o = command(&cfg, &dir.path().join("store2")).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("executor.shard_items = 3 is not a whole number"),
        "{}",
        text(&o)
    );

    // Bad settings are refused before anything runs, naming the key.
    for (body, want) in [
        ("workers = 0", "executor.workers"),
        ("kind = \"slurmm\"", "executor.kind"),
        ("devices = [\"cuda:0\"]", "executor.devices"),
        ("devices = [\"cuda:0\", \"cpu\"]", "executor.devices"),
        ("max_attempts = 0", "executor.max_attempts"),
    ] {
        let cfg = setup(dir.path(), &format!("[executor]\n{body}\n"));
        let o = command(&cfg, &dir.path().join("store3")).output().unwrap();
        assert_eq!(o.status.code(), Some(1), "{body}: {}", text(&o));
        assert!(text(&o).contains(want), "{body}: {}", text(&o));
    }
    let cfg = setup(dir.path(), "");
    let o = tsr(
        &["run", cfg.to_str().unwrap(), "--workers", "2"],
        &dir.path().join("store4"),
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("--workers goes with worker processes"),
        "{}",
        text(&o)
    );
}

#[test]
fn a_stopped_driver_keeps_what_its_workers_finished_and_resumes_to_the_same_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let want = reference(dir.path());
    // Both workers of `iter1/gen-current` stop themselves before their second batch; then the
    // driver gets SIGTERM. It passes the stop on (SIGTERM, then SIGCONT): each worker's handler
    // sets its stop flag, the worker exits 75 at a batch boundary, and the driver commits the
    // batches they finished and exits 75 too.
    let (store, mut child) = spawn_pausing_workers(&dir.path().join("stopped"));
    let mut workers = vec![];
    wait_event(&mut child, "both workers stopped", |c| {
        workers = stopped_children(c.id());
        workers.len() == 2 || c.try_wait().unwrap().is_some()
    });
    assert_eq!(workers.len(), 2, "the run ended before its workers stopped");
    // SAFETY: a signal to the run only.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(75), "{}", text(&o));
    let v = status(&store, "x");
    let gen = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "iter1/gen-current")
        .unwrap()
        .clone();
    // Each worker finished its first batch; it sees the stop at its second boundary, or at
    // its third when the signal was handled on another of its threads after the check. Whole
    // batches are kept, and the step is unfinished.
    let done = gen["items_done"].as_u64().unwrap();
    assert!(
        (4..12).contains(&done) && done % 2 == 0,
        "whole batches kept, step unfinished: {gen}"
    );
    assert_eq!(gen["state"], "interrupted", "{gen}");
    // The unfinished step's worker folder stays for its resume; gc keeps it.
    let work = store.join("work");
    let gc = |store: &Path| -> serde_json::Value {
        let o = tsr(&["gc", "--json"], store);
        assert!(o.status.success(), "{}", text(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    assert_eq!(std::fs::read_dir(&work).unwrap().count(), 1);
    assert_eq!(gc(&store)["work"]["removed_steps"], 0);
    // Resumed in this process (the executor is not part of the run's definition): the same
    // outputs, and gc then removes the finished step's worker folder.
    let o = Command::new(env!("CARGO_BIN_EXE_tsr"))
        .args(["resume", "x", "--executor", "local", "--quiet", "--store"])
        .arg(&store)
        .env("RAYON_NUM_THREADS", "1")
        .env_remove("TSR_TEST_PAUSE_AT")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    same(&want, &results(&store));
    assert_eq!(gc(&store)["work"]["removed_steps"], 1);
    assert_eq!(std::fs::read_dir(&work).unwrap().count(), 0);
}

/// `tsr plan` counts every worker that shares the device: each holds the model and a batch.
#[test]
fn the_memory_plan_counts_the_workers_that_share_a_device() {
    let dir = tempfile::tempdir().unwrap();
    let plan = |executor: &str| -> serde_json::Value {
        plan_json(&setup(dir.path(), executor), &dir.path().join("store"))
    };
    let node = |v: &serde_json::Value, name: &str| -> (u64, String) {
        let n = plan_node(v, name);
        (n["peak"].as_u64().unwrap(), n["assumes"].to_string())
    };
    let local = plan("");
    let three = plan("[executor]\nkind = \"processes\"\nworkers = 3\n");
    let own =
        plan("[executor]\nkind = \"processes\"\nworkers = 2\ndevices = [\"cuda:0\", \"cuda:1\"]\n");
    let (one, _) = node(&local, "iter1/gen-current");
    let (all, why) = node(&three, "iter1/gen-current");
    assert_eq!(all, 3 * one);
    assert!(why.contains("3 worker processes"), "{why}");
    assert_eq!(
        node(&own, "iter1/gen-current").0,
        one,
        "one worker per device"
    );
    // DPO runs in the run's own process.
    assert_eq!(
        node(&three, "iter1/dpo-next").0,
        node(&local, "iter1/dpo-next").0
    );
}
