//! Crash and preemption tests: the toy workflow run as a child process, SIGKILLed at random
//! moments (mid blob write, mid sled commit, mid checkpoint: wherever the dice fall) until it
//! finishes; and SIGTERM giving a clean, resumable exit.

mod common;

use common::*;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tsr_state::Store;

fn kill(child: &std::process::Child, sig: i32) {
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

fn executions(log: &std::path::Path) -> (usize, usize) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for line in text.lines() {
        *seen.entry(line).or_default() += 1;
    }
    let total = text.lines().count();
    (total, total - seen.len())
}

/// Entry point of the child process (does nothing in the parent test run).
#[test]
fn child() {
    child_main();
}

#[test]
fn sigkill_at_random_moments_gives_identical_results() {
    let dir = tempfile::tempdir().unwrap();
    // Reference: uninterrupted, in this process.
    let reference = {
        let store = Arc::new(Store::open(&dir.path().join("ref")).unwrap());
        run_toy(&store, "crash", &crash_spec());
        outputs(&store, "crash")
    };

    let store_dir = dir.path().join("crashy");
    let log = dir.path().join("executions.log");
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        std::env::var("TSR_CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20261124),
    );
    let mut kills = 0;
    let mut rounds = 0;
    loop {
        rounds += 1;
        assert!(rounds < 500, "the child never finished");
        let mut child = spawn_child(&store_dir, &log, "child");
        if kills < 30 {
            std::thread::sleep(Duration::from_millis(rng.gen_range(5..90)));
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                let listing: Vec<String> = std::fs::read_dir(store_dir.join("db"))
                    .map(|rd| {
                        rd.flatten()
                            .map(|e| {
                                format!(
                                    "{:?} {}",
                                    e.file_name(),
                                    e.metadata().map(|m| m.len()).unwrap_or(0)
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                assert!(
                    status.success(),
                    "child failed: {status:?}: {err}\ndb: {listing:?}"
                );
                break;
            }
            kill(&child, libc::SIGKILL);
            child.wait().unwrap();
            kills += 1;
        } else {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "child failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            break;
        }
    }
    assert!(
        kills >= 20,
        "only {kills} kills landed before the run finished"
    );

    let store = Store::open(&store_dir).unwrap();
    let got = outputs(&store, "crash");
    assert_eq!(
        got, reference,
        "final digests and item counts differ after {kills} kills"
    );

    // Work done twice is bounded by what was in flight at each kill: one batch of items per
    // running item step (4 or 3) and one checkpoint interval (4) of training.
    let (total, dups) = executions(&log);
    let spec = crash_spec();
    let units = spec.items // source
        + spec.iterations as u64 * spec.items // maps
        + spec.items // anchor (once)
        + spec.iterations as u64 * spec.train_steps;
    assert_eq!(total - dups, units as usize, "every unit ran at least once");
    assert!(
        dups <= kills * (4 + 3 + 4),
        "{dups} repeated units for {kills} kills: committed work was redone"
    );
    let report = tsr_state::verify(&store).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    eprintln!("{kills} kills, {rounds} rounds, {total} unit executions, {dups} repeated");
}

#[test]
fn sigterm_exits_resumable_in_bounded_time_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("s");
    let log = dir.path().join("log");
    let child = spawn_child(&store_dir, &log, "child");
    std::thread::sleep(Duration::from_millis(400));
    let t0 = Instant::now();
    kill(&child, libc::SIGTERM);
    let out = child.wait_with_output().unwrap();
    let took = t0.elapsed();
    assert_eq!(
        out.status.code(),
        Some(tsr_engine::EXIT_INTERRUPTED),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(took < Duration::from_secs(3), "took {took:?} to stop");
    {
        let store = Store::open(&store_dir).unwrap();
        let run = store.run("crash").unwrap();
        assert_eq!(run.status, tsr_state::RunStatus::Interrupted);
    }
    // Resume to completion in a second child; results equal an uninterrupted run.
    let out = spawn_child(&store_dir, &log, "child")
        .wait_with_output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = Store::open(&store_dir).unwrap();
    let got = outputs(&store, "crash");
    let ref_store = Arc::new(Store::open(&dir.path().join("ref")).unwrap());
    run_toy(&ref_store, "crash", &crash_spec());
    assert_eq!(got, outputs(&ref_store, "crash"));
}

#[test]
fn second_process_on_a_store_is_refused_with_the_pid() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("s");
    let _held = Store::open(&store_dir).unwrap();
    let out = spawn_child(&store_dir, &dir.path().join("log"), "child")
        .wait_with_output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("in use by pid {}", std::process::id())),
        "{err}"
    );
}
