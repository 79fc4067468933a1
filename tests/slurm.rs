//! The `slurm` executor against a real one-node Slurm on loopback (munge, slurmctld and slurmd
//! from Debian's packages, started by this test and stopped by PID): a tiny-model temporal
//! iteration with evaluation whose item steps run as Slurm array tasks gives every output of
//! the same run in one process, through faults made by Slurm and by the test:
//! - array tasks SIGKILLed in the middle of their shards, and one requeued (`scontrol
//!   requeue`, as a preemption does);
//! - the driver SIGKILLed while its array runs: the next driver adopts the running tasks and
//!   submits nothing for them (a counting `sbatch` shows it);
//! - the controller down at the start (refused before anything is recorded) and down for a
//!   while in the middle of a run (the driver waits and goes on);
//! - SIGTERM on the driver, which leaves its tasks running, then `tsr cancel`;
//! - the node lost while its tasks run (slurmd SIGKILLed), with a late write from an orphaned
//!   task;
//! - a shard that fails every time (a worker of another build), which fails its step after
//!   its attempts with the worker's own message;
//! - the training job (DPO runs as one task) requeued after its first checkpoint: it
//!   continues from the checkpoint it left in the remote.
//!
//! Faults are made at observed events: workers stop themselves (SIGSTOP) before their second
//! batch of `iter1/gen-current` (`TSR_TEST_PAUSE_AT`, set by a wrapper script given as the
//! executor's `binary`), and the test acts on the stopped process. One cluster serves every
//! scenario, one after the other: two clusters would share the node's name and CPUs. About
//! 3 minutes on 2 cores.

mod common;

use common::sharded::*;
use common::slurm::Cluster;
use common::*;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A wrapper that runs this build of tsr with workers stopping themselves before their second
/// batch of `iter1/gen-current`.
fn pausing_binary(dir: &Path) -> PathBuf {
    pausing_binary_at(dir, "tsr-pausing", "iter1/gen-current#2")
}

/// A wrapper named `name` that runs this build of tsr with workers stopping themselves where
/// `at` says (`TSR_TEST_PAUSE_AT`).
fn pausing_binary_at(dir: &Path, name: &str, at: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(
        &p,
        format!(
            "#!/bin/sh\nexport TSR_TEST_PAUSE_AT='{at}'\nexec '{}' \"$@\"\n",
            env!("CARGO_BIN_EXE_tsr")
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn executor(binary: &Path, extra: &str) -> String {
    format!(
        "[executor]\nkind = \"slurm\"\nworkers = 2\ncpus_per_task = 1\nbinary = \"{}\"\n{extra}",
        binary.display()
    )
}

/// The run's driver under the cluster, its standard error in `<dir>/driver.log`.
fn spawn_driver(cluster: &Cluster, cfg: &Path, store: &Path) -> (Child, PathBuf) {
    let log = store.with_extension("driver.log");
    let mut c = command(cfg, store);
    cluster.env(&mut c);
    c.stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    (c.spawn().unwrap(), log)
}

/// A worker stopped by the test hook: its PID, array task (`<array>_<task>`) and step key.
#[derive(Debug, Clone)]
struct Stopped {
    pid: i32,
    task: String,
    key: String,
}

/// The workers of `store` that are stopped.
fn stopped_workers(store: &Path) -> Vec<Stopped> {
    let needle = store.join("work").display().to_string();
    stopped_workers_where(|args| {
        let job = args.iter().find(|a| a.starts_with(&needle))?;
        Some(job[needle.len() + 1..].split('/').next()?.to_string())
    })
}

/// The stopped workers that read from the remote `url`.
fn stopped_remote_workers(url: &str) -> Vec<Stopped> {
    stopped_workers_where(|args| {
        let at = |flag: &str| args.iter().position(|a| a == flag).map(|i| &args[i + 1]);
        (at("--remote")? == url).then_some(())?;
        Some(at("--step")?.split('/').next()?.to_string())
    })
}

/// The stopped workers whose arguments `key_of` recognises (giving their step key).
fn stopped_workers_where(key_of: impl Fn(&[String]) -> Option<String>) -> Vec<Stopped> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if !is_stopped(pid as u32) {
            continue;
        }
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args.iter().any(|a| a == "worker") {
            continue;
        }
        let Some(key) = key_of(&args) else {
            continue;
        };
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let var = |name: &str| -> String {
            env.split(|b| *b == 0)
                .filter_map(|kv| std::str::from_utf8(kv).ok())
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")).map(str::to_string))
                .unwrap_or_default()
        };
        out.push(Stopped {
            pid,
            task: format!(
                "{}_{}",
                var("SLURM_ARRAY_JOB_ID"),
                var("SLURM_ARRAY_TASK_ID")
            ),
            key,
        });
    }
    out
}

/// Notes the start of a scenario with the time since the first scenario began (shown with a
/// failure, to tell which scenario it was in).
fn phase(n: &str) {
    static T0: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let t0 = T0.get_or_init(std::time::Instant::now);
    eprintln!("scenario {n} starts at {:.0?}", t0.elapsed());
}

/// `sig` to the main thread of process `pid` only (`tgkill`): that thread takes it before it
/// runs on.
fn signal_main_thread(pid: i32, sig: i32) {
    // SAFETY: a thread-directed signal to the main thread of a worker of this test's cluster.
    unsafe {
        libc::syscall(libc::SYS_tgkill, pid, pid, sig);
    }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: a signal to a worker process of this test's cluster.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Waits for `child` (the driver) to end, failing with its log if it does not succeed.
fn finish(mut child: Child, log: &Path) {
    let st = child.wait().unwrap();
    assert!(
        st.success(),
        "the driver of {} failed: {}",
        log.display(),
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// Waits until `n` workers of `store` (or more) are stopped, failing if the run ends first.
fn wait_stopped(child: &mut Child, store: &Path, n: usize) -> Vec<Stopped> {
    let mut stopped = vec![];
    wait_event(child, "tasks stopped", |c| {
        stopped = stopped_workers(store);
        stopped.len() >= n || c.try_wait().unwrap().is_some()
    });
    assert!(stopped.len() >= n, "the run ended before its tasks stopped");
    stopped
}

/// Lets every stopped worker go on until the run ends, and checks that it succeeded.
fn finish_releasing(mut child: Child, log: &Path, store: &Path) {
    wait_event(&mut child, "end of the run", |c| {
        for w in stopped_workers(store) {
            signal(w.pid, libc::SIGCONT);
        }
        c.try_wait().unwrap().is_some()
    });
    finish(child, log);
}

/// The state of an array task.
fn task_state(cluster: &Cluster, task: &str) -> String {
    let o = cluster
        .client("squeue")
        .args([
            "--noheader",
            "--array",
            "--states=all",
            "--format=%T",
            "--jobs",
            task,
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn slurm_array_tasks_give_the_outputs_of_one_process_through_faults() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mut cluster = Cluster::start(&dir.join("slurm"));
    let want = reference(dir);
    let pausing = pausing_binary(dir);

    phase("1");
    // 1. Tasks killed mid-shard, and one requeued. Each shard of `iter1/gen-current` (6
    // batches, 3 per shard) has a task that stops before its second batch. The first two
    // stopped tasks are SIGKILLed (each delivered a batch: resubmitted without using an
    // attempt); the third is requeued (Slurm puts it back in the queue under the same id, and
    // the driver waits for it); later ones are let go.
    // A step kind's own resources that Slurm refuses stop the run before anything is recorded,
    // naming the steps and Slurm's words.
    let cfg = setup(
        &dir.join("refused"),
        &executor(&pausing, "[executor.steps.judge]\npartition = \"nope\"\n"),
    );
    let mut c = command(&cfg, &dir.join("refused/store"));
    cluster.env(&mut c);
    let o = c.output().unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("iter1/judge-current") && t.contains("--partition=nope") && t.contains("nope"),
        "{t}"
    );
    let o = tsr(&["status", "x"], &dir.join("refused/store"));
    assert!(!o.status.success(), "the run was recorded: {}", text(&o));

    // The judge's tasks get their own limits; the others ask for the plan's memory.
    let cfg = setup(
        &dir.join("faults"),
        &executor(
            &pausing,
            "[executor.steps.judge]\nmem = \"300M\"\ntime = \"00:30:00\"\n",
        ),
    );
    let store = dir.join("faults/store");
    let (mut child, log) = spawn_driver(&cluster, &cfg, &store);
    let mut seen = BTreeSet::new();
    let mut acted = 0;
    let mut requeued = String::new();
    wait_event(&mut child, "end of the run", |c| {
        for w in stopped_workers(&store) {
            if !seen.insert(w.pid) {
                continue;
            }
            acted += 1;
            match acted {
                1 | 2 => signal(w.pid, libc::SIGKILL),
                3 => {
                    cluster.scontrol(&["requeue", &w.task]);
                    requeued = w.task.clone();
                }
                _ => signal(w.pid, libc::SIGCONT),
            }
        }
        // A requeued task waits for its begin time (about 2 minutes): start it now, as the
        // cluster would later.
        if !requeued.is_empty() && task_state(&cluster, &requeued) == "PENDING" {
            cluster.scontrol(&["update", &format!("JobId={requeued}"), "StartTime=now"]);
            requeued.clear();
        }
        c.try_wait().unwrap().is_some()
    });
    finish(child, &log);
    assert!(acted >= 3, "{acted} workers stopped");
    let driver_log = std::fs::read_to_string(&log).unwrap();
    assert_handed_over(&driver_log, "--cpus-per-task=1");
    let handed = |node: &str| {
        driver_log
            .lines()
            .find(|l| {
                l.starts_with(&format!("tsr: {node}: ")) && l.contains("as Slurm array tasks")
            })
            .unwrap_or_else(|| panic!("{node}:\n{driver_log}"))
            .to_string()
    };
    let judge = handed("iter1/judge-current");
    assert!(judge.contains("--mem=300M --time=00:30:00"), "{judge}");
    let gen = handed("iter1/gen-current");
    assert!(
        gen.contains(" --mem=") && gen.contains("M") && !gen.contains("--time"),
        "{gen}"
    );
    same(&want, &results(&store));
    assert_computed_by(&store, "slurm");
    cluster.wait_idle();

    phase("2");
    // 2. The driver SIGKILLed while both tasks of `iter1/gen-current` run (stopped): the next
    // driver adopts them and submits nothing for that step.
    let cfg = setup(&dir.join("takeover"), &executor(&pausing, ""));
    let store = dir.join("takeover/store");
    let (mut child, _) = spawn_driver(&cluster, &cfg, &store);
    let stopped = wait_stopped(&mut child, &store, 2);
    // `tsr status` (from the running driver's live snapshot) names the running tasks.
    let mut shards = serde_json::Value::Null;
    wait_event(&mut child, "the shards in the live status", |c| {
        let o = tsr(&["status", "x", "--json"], &store);
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&o.stdout) {
            if let Some(n) = v["nodes"]
                .as_array()
                .and_then(|n| n.iter().find(|n| n["node"] == "iter1/gen-current"))
            {
                shards = n["shards"].clone();
            }
        }
        shards["running"] == 2 || c.try_wait().unwrap().is_some()
    });
    let mut tasks: Vec<String> = stopped
        .iter()
        .map(|w| format!("array task {}", w.task))
        .collect();
    tasks.sort();
    let mut shown: Vec<String> = shards["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap().to_string())
        .collect();
    shown.sort();
    assert_eq!(shown, tasks, "{shards}");
    assert_eq!(shards["done"], 0, "{shards}");
    let o = tsr(&["status", "x"], &store);
    assert!(
        text(&o).contains("shards: 2 running, 0 waiting, 0 done of 2"),
        "{}",
        text(&o)
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let before = cluster.submissions().len();
    let reads = cluster.queue_reads();
    let (mut child, log) = spawn_driver(&cluster, &cfg, &store);
    // Two reads of the queue by the new driver: it has decided what to submit for the step.
    wait_event(&mut child, "the new driver reading the queue", |c| {
        cluster.queue_reads() >= reads + 2 || c.try_wait().unwrap().is_some()
    });
    let key = &stopped[0].key[..16];
    assert!(
        !cluster.submissions()[before..]
            .iter()
            .any(|s| s.contains(key)),
        "the step's running tasks were submitted again: {:?}",
        &cluster.submissions()[before..]
    );
    for w in &stopped {
        signal(w.pid, libc::SIGCONT);
    }
    finish(child, &log);
    assert!(
        !cluster.submissions()[before..]
            .iter()
            .any(|s| s.contains(key)),
        "the adopted step was submitted again: {:?}",
        &cluster.submissions()[before..]
    );
    same(&want, &results(&store));
    cluster.wait_idle();

    phase("3");
    // 3. A worker of another build (a copy of tsr with a byte more) refuses every job: the step
    // fails after its attempts with the worker's own message, and nothing of it stays queued.
    let other = dir.join("tsr-other");
    let mut bytes = std::fs::read(env!("CARGO_BIN_EXE_tsr")).unwrap();
    bytes.push(0);
    std::fs::write(&other, bytes).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = setup(&dir.join("other"), &executor(&other, "max_attempts = 2\n"));
    let store = dir.join("other/store");
    let (child, log) = spawn_driver(&cluster, &cfg, &store);
    let o = child.wait_with_output().unwrap();
    let t = std::fs::read_to_string(&log).unwrap();
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("failed 2 times"), "{t}");
    assert!(
        t.contains("another tsr build"),
        "the worker's message is missing: {t}"
    );
    cluster.wait_idle();

    phase("4");
    // 4. The controller down at the start: refused before anything is recorded.
    cluster.stop_controller();
    let cfg = setup(&dir.join("down"), &executor(&pausing, ""));
    let store = dir.join("down/store");
    let mut c = command(&cfg, &store);
    cluster.env(&mut c);
    let o = c.output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("Slurm would not accept the array jobs"),
        "{}",
        text(&o)
    );
    let runs = tsr(&["runs", "--json"], &store);
    assert!(
        !String::from_utf8_lossy(&runs.stdout).contains("\"x\""),
        "a run was recorded: {}",
        text(&runs)
    );
    cluster.start_controller(false);
    cluster.wait_idle();

    phase("5");
    // 5. The controller down while tasks run: the driver says so, waits, and goes on when it
    // is back.
    let (mut child, log) = spawn_driver(&cluster, &cfg, &store);
    wait_stopped(&mut child, &store, 1);
    cluster.stop_controller();
    wait_event(
        &mut child,
        "the driver noticing the controller is down",
        |c| {
            std::fs::read_to_string(&log)
                .unwrap()
                .contains("does not answer")
                || c.try_wait().unwrap().is_some()
        },
    );
    cluster.start_controller(false);
    // Stopped tasks from now on are let go.
    finish_releasing(child, &log, &store);
    same(&want, &results(&store));
    cluster.wait_idle();

    phase("6");
    // 6. SIGTERM on the driver leaves its tasks running (exit 75); `tsr cancel` ends them, and
    // the same command then submits what is missing and finishes.
    let cfg = setup(&dir.join("cancel"), &executor(&pausing, ""));
    let store = dir.join("cancel/store");
    let (mut child, log) = spawn_driver(&cluster, &cfg, &store);
    let stopped = wait_stopped(&mut child, &store, 2);
    signal(child.id() as i32, libc::SIGTERM);
    let st = child.wait().unwrap();
    assert_eq!(
        st.code(),
        Some(75),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    for w in &stopped {
        assert!(
            task_state(&cluster, &w.task) == "RUNNING",
            "a stopped driver's task {} is `{}`, not running",
            w.task,
            task_state(&cluster, &w.task)
        );
    }
    let mut c = Command::new(env!("CARGO_BIN_EXE_tsr"));
    c.args(["cancel", "x", "--store"]).arg(&store);
    cluster.env(&mut c);
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("cancelled 1 Slurm job(s) of run `x`"),
        "{}",
        text(&o)
    );
    cluster.wait_idle();
    for w in &stopped {
        assert_eq!(task_state(&cluster, &w.task), "CANCELLED");
    }
    let (child, log) = spawn_driver(&cluster, &cfg, &store);
    finish_releasing(child, &log, &store);
    same(&want, &results(&store));
    cluster.wait_idle();

    phase("7");
    // 7. The node lost (slurmd SIGKILLed) while both tasks run: the controller notices after
    // its SlurmdTimeout and requeues them. One orphaned task goes on and writes its batches
    // late; the other is ended by its PID. When the node is back, the requeued tasks skip
    // what the orphan wrote, and the outputs are the same.
    let cfg = setup(&dir.join("node"), &executor(&pausing, ""));
    let store = dir.join("node/store");
    let (mut child, log) = spawn_driver(&cluster, &cfg, &store);
    let stopped = wait_stopped(&mut child, &store, 2);
    // The node unreachable: its daemon and its tasks' step daemons die, so nothing reports to
    // the controller again, but the tasks' processes go on (orphans).
    cluster.kill_node();
    assert!(
        cluster.kill_node_processes() > 0,
        "no step daemon of the node was found"
    );
    // Requeued, and the node down with its CPUs released (a node daemon back before the
    // release leaves them allocated for good in Slurm 22.05).
    wait_event(
        &mut child,
        "the tasks requeued after the node's loss",
        |c| {
            (stopped
                .iter()
                .all(|w| task_state(&cluster, &w.task) == "PENDING")
                && cluster.node_state().0.starts_with("DOWN")
                && cluster.node_state().1 == 0)
                || c.try_wait().unwrap().is_some()
        },
    );
    // The orphan computes the rest of its shard and exits; its results arrive after its task
    // was requeued.
    signal(stopped[0].pid, libc::SIGCONT);
    signal(stopped[1].pid, libc::SIGKILL);
    wait_event(&mut child, "the orphan's end", |c| {
        !Path::new(&format!("/proc/{}/cmdline", stopped[0].pid)).exists()
            || std::fs::read(format!("/proc/{}/cmdline", stopped[0].pid))
                .map(|b| b.is_empty())
                .unwrap_or(true)
            || c.try_wait().unwrap().is_some()
    });
    cluster.start_node();
    // Back and registered before the requeued tasks may start.
    wait_event(&mut child, "the node back", |c| {
        cluster.node_state() == ("IDLE".to_string(), 0) || c.try_wait().unwrap().is_some()
    });
    let mut released = BTreeSet::new();
    let mut reconfigured = false;
    wait_event(&mut child, "end of the run", |c| {
        // Slurm 22.05 can keep the lost tasks' CPUs allocated on an idle node after it comes
        // back (seen here when the requeued tasks end within a second): the next array then
        // waits for `Resources` for ever. `scontrol reconfigure` recounts them, as an
        // operator would.
        if !reconfigured && matches!(cluster.node_state(), (s, n) if s == "IDLE" && n > 0) {
            cluster.scontrol(&["reconfigure"]);
            reconfigured = true;
        }
        for w in &stopped {
            if !released.contains(&w.task) && task_state(&cluster, &w.task) == "PENDING" {
                cluster.scontrol(&["update", &format!("JobId={}", w.task), "StartTime=now"]);
                released.insert(w.task.clone());
            }
        }
        for w in stopped_workers(&store) {
            signal(w.pid, libc::SIGCONT);
        }
        c.try_wait().unwrap().is_some()
    });
    finish(child, &log);
    same(&want, &results(&store));
    cluster.wait_idle();

    phase("8");
    // 8. Through the remote copy (the default under Slurm with a remote): tasks read the inputs
    // through the node cache and hand back results as objects, with the remote's credentials
    // from a file on the node that their script sources. The driver's machine is lost while
    // both tasks of `iter1/gen-current` run; the same command on an empty folder restores the
    // store from the remote, takes the run over, adopts the tasks (nothing is submitted
    // twice) and commits what they wrote.
    let server = common::s3::S3Server::start(&dir.join("s3"));
    let url = server.url("lost");
    let env_file = dir.join("node.env");
    std::fs::write(
        &env_file,
        server
            .env()
            .iter()
            .map(|(k, v)| format!("export {k}='{v}'\n"))
            .collect::<String>(),
    )
    .unwrap();
    let cache = dir.join("node-cache");
    // Its training job also stops itself before its second optimizer step (after its first
    // checkpoint), for the preemption below.
    let pausing_dpo = pausing_binary_at(
        dir,
        "tsr-pausing-dpo",
        "iter1/gen-current#2;iter1/dpo-future#2",
    );
    let cfg = setup(
        &dir.join("lost"),
        &executor(
            &pausing_dpo,
            &format!(
                "node_cache = \"{}\"\nworker_env = \"{}\"\n",
                cache.display(),
                env_file.display()
            ),
        ),
    );
    let driver = |store: &Path, take_over: bool| {
        let log = store.with_extension("driver.log");
        let mut c = command(&cfg, store);
        cluster.env(&mut c);
        c.args(["--remote", &url]);
        if take_over {
            c.arg("--take-over");
        }
        for (k, v) in server.env() {
            c.env(k, v);
        }
        c.stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        (c.spawn().unwrap(), log)
    };
    let first = dir.join("lost/store");
    let (mut child, log) = driver(&first, false);
    let mut stopped = vec![];
    wait_event(&mut child, "tasks stopped", |c| {
        stopped = stopped_remote_workers(&url);
        stopped.len() >= 2 || c.try_wait().unwrap().is_some()
    });
    assert_eq!(
        stopped.len(),
        2,
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    let t = std::fs::read_to_string(&log).unwrap();
    assert!(
        t.contains(&format!("workers take their inputs from {url}")),
        "{t}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::remove_dir_all(&first).unwrap();
    let before = cluster.submissions().len();
    let reads = cluster.queue_reads();
    let second = dir.join("lost/elsewhere");
    let (mut child, log) = driver(&second, true);
    wait_event(&mut child, "the new driver reading the queue", |c| {
        cluster.queue_reads() >= reads + 2 || c.try_wait().unwrap().is_some()
    });
    let key = &stopped[0].key[..16];
    let mut seen: BTreeSet<i32> = stopped.iter().map(|w| w.pid).collect();
    for w in &stopped {
        signal(w.pid, libc::SIGCONT);
    }
    phase("9");
    // 9. The training job preempted after its first checkpoint (`scontrol requeue`): the task
    // starts again and continues from the checkpoint it left in the remote.
    let (mut requeued, mut to_start) = (String::new(), false);
    wait_event(&mut child, "end of the run", |c| {
        for w in stopped_remote_workers(&url) {
            if !seen.insert(w.pid) {
                continue;
            }
            if requeued.is_empty() {
                // The stop a preemption sends, waiting for it when the controller continues the
                // task, so the job checkpoints and exits at once instead of finishing. It goes to
                // the main thread (the one stopped at the boundary): a signal to the process may
                // be taken by another of its threads when it is continued, whose handler can then
                // set the stop flag just after the main thread has checked it (seen here: the
                // job finished its training instead).
                signal_main_thread(w.pid, libc::SIGTERM);
                cluster.scontrol(&["requeue", &w.task]);
                requeued = w.task.clone();
                to_start = true;
            } else {
                signal(w.pid, libc::SIGCONT);
            }
        }
        if to_start && task_state(&cluster, &requeued) == "PENDING" {
            cluster.scontrol(&["update", &format!("JobId={requeued}"), "StartTime=now"]);
            to_start = false;
        }
        c.try_wait().unwrap().is_some()
    });
    finish(child, &log);
    let t = std::fs::read_to_string(&log).unwrap();
    assert!(t.contains("restored"), "{t}");
    assert!(!requeued.is_empty(), "the training job never stopped: {t}");
    assert!(
        t.lines().any(|l| l.starts_with(&format!(
            "tsr: iter1/dpo-future: ran as one job by array task {requeued} (restart 1)"
        )) && l.contains("continued from checkpoint")),
        "{t}"
    );
    assert!(
        !cluster.submissions()[before..]
            .iter()
            .any(|s| s.contains(key)),
        "the step's running tasks were submitted again after the take-over: {:?}",
        &cluster.submissions()[before..]
    );
    same(&want, &results(&second));
    assert_computed_by(&second, "slurm");
    let work = common::s3::files_under(&server.object_path("lost", "work"));
    assert!(work.is_empty(), "{work:?}");
    assert!(!common::s3::files_under(&cache.join("blobs")).is_empty());
    // No credential in what tsr wrote for the tasks: the scripts hold paths only.
    for f in common::s3::files_under(&second.join("work")) {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        assert!(!text.contains(common::s3::SECRET_KEY), "{}", f.display());
    }
    cluster.wait_idle();
}

/// Slurm settings are checked before anything runs, each refusal naming its key.
#[test]
fn slurm_settings_are_refused_by_key() {
    let dir = tempfile::tempdir().unwrap();
    for (body, want) in [
        (
            "kind = \"processes\"\npartition = \"gpu\"",
            "executor.partition",
        ),
        ("kind = \"local\"\ngres = \"gpu:1\"", "executor.gres"),
        (
            "kind = \"slurm\"\nworkers = 2\ndevices = [\"cuda:0\", \"cuda:1\"]",
            "executor.devices",
        ),
        (
            "kind = \"slurm\"\nextra_args = [\"--array=0-3\"]",
            "executor.extra_args",
        ),
        (
            "kind = \"slurm\"\nextra_args = [\"gpu\"]",
            "executor.extra_args",
        ),
        (
            "kind = \"slurm\"\ncpus_per_task = 0",
            "executor.cpus_per_task",
        ),
        ("kind = \"slurmm\"", "executor.kind"),
    ] {
        let cfg = setup(dir.path(), &format!("[executor]\n{body}\n"));
        let o = command(&cfg, &dir.path().join("store")).output().unwrap();
        assert_eq!(o.status.code(), Some(1), "{body}: {}", text(&o));
        assert!(text(&o).contains(want), "{body}: {}", text(&o));
    }
    // Without Slurm's tools on the PATH, a clear refusal before anything is recorded.
    let cfg = setup(dir.path(), "[executor]\nkind = \"slurm\"\n");
    let o = Command::new(env!("CARGO_BIN_EXE_tsr"))
        .args(["run", cfg.to_str().unwrap(), "--store"])
        .arg(dir.path().join("store"))
        .env("PATH", dir.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("`sbatch` is not installed here"),
        "{}",
        text(&o)
    );
}
