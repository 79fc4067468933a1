//! The `tsr` binary end to end on the model-free `toy` workflow: run, status, replay, verify
//! (damage and repair), fork reuse, config-change refusal, SIGTERM exit code, second process.

mod common;

use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

fn write_config(dir: &Path, name: &str, train_steps: u32, work_ms: u32) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(
        &p,
        format!(
            "name = \"{name}\"\nworkflow = \"toy\"\n[toy]\niterations = 2\nitems = 12\ntrain_steps = {train_steps}\ncheckpoint_every = 3\nwork_ms = {work_ms}\n"
        ),
    )
    .unwrap();
    p
}

#[test]
fn run_status_replay_verify_repair() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cfg = write_config(dir.path(), "r1", 6, 0);
    let o = tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &store);
    assert!(o.status.success(), "{}", text(&o));

    let o = tsr(&["status", "r1", "--json"], &store);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 8);
    assert_eq!(nodes.iter().filter(|n| n["state"] == "reused").count(), 1);
    assert!(nodes
        .iter()
        .all(|n| n["state"] == "done" || n["state"] == "reused"));

    let o = tsr(&["replay", "r1", "--iteration", "2", "--json"], &store);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["identical"], true);
    assert_eq!(v["steps"].as_array().unwrap().len(), 3);

    // Damage the output of iter1/map; verify finds it, exit 1; --repair recomputes it.
    let o = tsr(&["status", "r1", "--json"], &store);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let map = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "iter1/map")
        .unwrap()
        .clone();
    let digest = map["outputs"][0][1].as_str().unwrap().to_string();
    let blob = store.join("blobs").join(&digest[..2]).join(&digest[2..]);
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[5] ^= 0x20;
    std::fs::write(&blob, bytes).unwrap();
    let o = tsr(&["verify"], &store);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("blob-corrupt"), "{}", text(&o));
    assert!(text(&o).contains("tsr verify --repair"), "{}", text(&o));
    let o = tsr(&["verify", "--repair"], &store);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("after repair: ok"), "{}", text(&o));
    let o = tsr(&["verify", "--json"], &store);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn edited_config_is_refused_and_fork_reuses_unchanged_steps() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cfg = write_config(dir.path(), "base", 6, 0);
    assert!(tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &store)
        .status
        .success());
    write_config(dir.path(), "base", 9, 0);
    let o = tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &store);
    assert_eq!(o.status.code(), Some(1));
    let t = text(&o);
    assert!(t.contains("toy.train_steps: 6 -> 9"), "{t}");
    assert!(
        t.contains("tsr fork base --name NEW --set toy.train_steps=9"),
        "{t}"
    );

    let o = tsr(
        &["fork", "base", "--name", "b2", "--set", "toy.train_steps=9"],
        &store,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("4 steps executed, 4 reused"),
        "{}",
        text(&o)
    );
    let o = tsr(&["fork", "base", "--name", "b2"], &store);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("already exists"));
    let o = tsr(&["fork", "base", "--name", "../b3"], &store);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("not starting with a dot"), "{}", text(&o));
    let o = tsr(&["runs", "--json"], &store);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let b2 = v
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "b2")
        .unwrap();
    assert_eq!(b2["forked_from"], "base");
}

#[test]
fn sigterm_gives_the_resumable_exit_code_and_the_same_command_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cfg = write_config(dir.path(), "t", 300, 15);
    // The run stops itself in the middle of training (an event, not a moment on the clock).
    let child = spawn_paused(run_command(&cfg, &store), &KillAt::new("iter1/train", 5, 0))
        .unwrap_or_else(|o| panic!("never reached iter1/train: {}", text(&o)));
    // While it runs, a second process is refused, and status reads the live snapshot.
    let o = tsr(&["verify"], &store);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains(&format!("in use by pid {}", child.id())),
        "{}",
        text(&o)
    );
    let o = tsr(&["status", "t"], &store);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("live snapshot"), "{}", text(&o));
    let out = terminate(child);
    assert_eq!(
        out.status.code(),
        Some(75),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("Resume with: tsr run"));
    let o = tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &store);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn bad_config_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(&p, "name = \"x\"\nworkflow = \"toy\"\n[toy]\nitemz = 3\n").unwrap();
    let o = tsr(&["run", p.to_str().unwrap()], &dir.path().join("s"));
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("itemz"), "{}", text(&o));
    let o = tsr(
        &["run", dir.path().join("missing.toml").to_str().unwrap()],
        &dir.path().join("s"),
    );
    assert!(text(&o).contains("missing.toml"), "{}", text(&o));
    // Run names become file names and object keys: a path is refused before anything is written.
    let deep = dir.path().join("a/b");
    std::fs::create_dir_all(&deep).unwrap();
    let p = deep.join("evil.toml");
    std::fs::write(&p, "name = \"../../evil\"\nworkflow = \"toy\"\n").unwrap();
    let o = tsr(&["run", p.to_str().unwrap()], &deep.join("s"));
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("1 to 100 letters, digits, `.`, `_` or `-`, not starting with a dot"),
        "{}",
        text(&o)
    );
    assert!(!deep.join("s").exists() && !dir.path().join("evil").exists());
}

#[test]
fn damaged_database_and_truncated_blob_are_detected_and_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cfg = write_config(dir.path(), "d", 6, 0);
    assert!(tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &store)
        .status
        .success());
    let o = tsr(&["status", "d", "--json"], &store);
    let before: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();

    // Truncate an output blob: verify names it; --repair recomputes it.
    let digest = before["nodes"][0]["outputs"][0][1]
        .as_str()
        .unwrap()
        .to_string();
    let blob = store.join("blobs").join(&digest[..2]).join(&digest[2..]);
    let len = std::fs::metadata(&blob).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&blob)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let o = tsr(&["verify"], &store);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains(&blob.display().to_string()),
        "{}",
        text(&o)
    );
    let o = tsr(&["verify", "--repair"], &store);
    assert!(o.status.success(), "verify --repair failed: {}", text(&o));

    // A database that comes back older than what was acknowledged (restored from an old copy,
    // or rolled back by sled's recovery past damage): the commit counter detects it, normal
    // commands refuse, verify explains, --repair accepts and recomputes, and the results equal
    // the originals.
    let db = store.join("db");
    let old = dir.path().join("db-old");
    copy_dir(&db, &old);
    let o = tsr(
        &[
            "fork",
            "d",
            "--name",
            "d2",
            "--set",
            "toy.train_steps=7",
            "--quiet",
        ],
        &store,
    );
    assert!(o.status.success(), "{}", text(&o));
    std::fs::remove_dir_all(&db).unwrap();
    copy_dir(&old, &db);
    let o = tsr(&["status", "d"], &store);
    assert_eq!(
        o.status.code(),
        Some(1),
        "the rollback went unnoticed: {}",
        text(&o)
    );
    assert!(text(&o).contains("lost committed records"), "{}", text(&o));
    let o = tsr(&["verify"], &store);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("db-rolled-back"), "{}", text(&o));
    let o = tsr(&["verify", "--repair"], &store);
    assert!(o.status.success(), "{}", text(&o));
    let o = tsr(&["status", "d", "--json"], &store);
    let after: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for (a, b) in before["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .zip(after["nodes"].as_array().unwrap())
    {
        assert_eq!(a["outputs"], b["outputs"], "{}", a["node"]);
    }

    // Bytes overwritten in the written part of sled's log: sled refuses to open it; the error
    // names the database and what to do, for every command.
    let log = db.join("db");
    let mut bytes = std::fs::read(&log).unwrap();
    let written = bytes.iter().rposition(|&b| b != 0).unwrap();
    let start = written / 2;
    for b in &mut bytes[start..start + 200] {
        *b ^= 0xff;
    }
    std::fs::write(&log, bytes).unwrap();
    for args in [&["status", "d"][..], &["verify"][..]] {
        let o = tsr(args, &store);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", text(&o));
        let t = text(&o);
        assert!(
            t.contains(&db.display().to_string()) && t.contains("restore"),
            "{args:?}: {t}"
        );
    }
}

#[test]
fn a_run_whose_output_reader_goes_away_still_finishes() {
    // `tsr run ... | true`: the pipe closes at once; the run must neither be killed by SIGPIPE
    // nor panic when it prints its summary.
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "piped", 4, 1);
    let store = dir.path().join("s");
    let o = tsr_with_closed_stdout(&["run", cfg.to_str().unwrap()], &store);
    assert!(
        o.status.success(),
        "{:?}: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"));
    let v = status(&store, "piped");
    assert_eq!(v["status"], "done", "{v}");
}

#[test]
fn errors_show_their_cause_without_backtraces_when_rust_backtrace_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole.gguf");
    tsr_model::testing::write_tiny_gguf(&whole, 1);
    let bytes = std::fs::read(&whole).unwrap();
    let cut = dir.path().join("truncated.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() * 3 / 5]).unwrap();
    // As a user with RUST_BACKTRACE=1 sees it; and with RUST_LIB_BACKTRACE=1 too, which makes
    // candle capture backtraces into its errors (tsr must still keep them out of the message).
    for lib in [None, Some("1")] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tsr"));
        c.args([
            "generate",
            "--model",
            cut.to_str().unwrap(),
            "--prompt",
            "hi",
        ])
        .args(["--max-new", "2", "--store"])
        .arg(dir.path().join("s"))
        .env("RUST_BACKTRACE", "1");
        match lib {
            Some(v) => c.env("RUST_LIB_BACKTRACE", v),
            None => c.env_remove("RUST_LIB_BACKTRACE"),
        };
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains("truncated.gguf"), "the file is named: {err}");
        // candle's own error (the one that carries a backtrace when asked to), named by cause.
        assert!(err.contains("remaining in file"), "{err}");
        assert!(
            !err.contains("backtrace")
                && !err.contains("rust_begin_unwind")
                && !err.contains(" at /"),
            "RUST_LIB_BACKTRACE={lib:?}: a backtrace inside the error: {err}"
        );
        assert!(
            err.lines().count() <= 6,
            "RUST_LIB_BACKTRACE={lib:?}: {err}"
        );
    }
}

/// Where a run's store is: `--store`, else `$TSR_STORE`, else the config's `store`, else `./.tsr`
/// (as `tsr --help` and the README say).
#[test]
fn the_store_is_the_flag_then_tsr_store_then_the_config_then_dot_tsr() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("s.toml");
    std::fs::write(
        &cfg,
        "name = \"s\"\nworkflow = \"toy\"\nstore = \"from-config\"\n[toy]\niterations = 1\nitems = 2\ntrain_steps = 1\ncheckpoint_every = 1\nwork_ms = 0\n",
    )
    .unwrap();
    let run = |flag: Option<&str>, env: Option<&str>| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_tsr"));
        c.current_dir(dir.path()).args(["run", "s.toml", "--quiet"]);
        if let Some(f) = flag {
            c.args(["--store", f]);
        }
        match env {
            Some(e) => c.env("TSR_STORE", e),
            None => c.env_remove("TSR_STORE"),
        };
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
    };
    let has_run = |store: &str| dir.path().join(store).join("LOCK").exists();
    run(Some("from-flag"), Some("from-env"));
    assert!(has_run("from-flag") && !has_run("from-env") && !has_run("from-config"));
    run(None, Some("from-env"));
    assert!(has_run("from-env") && !has_run("from-config"));
    run(None, None);
    assert!(has_run("from-config"));
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("store = \"from-config\"\n", ""),
    )
    .unwrap();
    run(None, None);
    assert!(has_run(".tsr"));
}
