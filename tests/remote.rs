//! The store's remote copy against a real S3 server on loopback (`s3s-fs`): round trip,
//! machine loss at random moments, fencing of a writer that lost the lease, faults, secrets.

mod common;

use common::s3::{files_under, S3Server, ACCESS_KEY, SECRET_KEY};
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn toy_config(dir: &Path, name: &str, work_ms: u64) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(
        &p,
        format!(
            "name = \"{name}\"\nworkflow = \"toy\"\nseed = 1\n[toy]\niterations = 2\nitems = 24\n\
             train_steps = 20\ncheckpoint_every = 5\nwork_ms = {work_ms}\nseed = 1\n"
        ),
    )
    .unwrap();
    p
}

/// Segments of one generation on the server: (first, last).
fn segments(server: &S3Server, prefix: &str, epoch: u64) -> Vec<(u64, u64)> {
    let dir = server.object_path(prefix, &format!("gens/{epoch:010}/segments"));
    let mut out: Vec<(u64, u64)> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    let (a, b) = n.split_once('-')?;
                    Some((a.parse().ok()?, b.parse().ok()?))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The newest commit any generation on the server holds.
fn remote_end(server: &S3Server, prefix: &str) -> u64 {
    let gens = server.object_path(prefix, "gens");
    files_under(&gens)
        .iter()
        .filter_map(|p| {
            let n = p.file_name()?.to_string_lossy().into_owned();
            n.rsplit('-').next()?.parse::<u64>().ok()
        })
        .max()
        .unwrap_or(0)
}

fn remote_view(server: &S3Server, url: &str, scratch: &Path) -> serde_json::Value {
    let o = server.tsr(&["verify", "--remote", url, "--json"], scratch);
    serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("{}", text(&o)))
}

#[test]
fn round_trip_restore_and_verify_without_leaking_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(&dir.path().join("s3"));
    let url = server.url("rt");
    let cfg = toy_config(dir.path(), "toy", 2);
    let a = dir.path().join("a");
    let o = server.tsr(&["run", cfg.to_str().unwrap(), "--remote", &url], &a);
    assert!(o.status.success(), "{}", text(&o));
    let mut said = text(&o);
    assert!(said.contains("holds every commit"), "{said}");
    // The remote is a consistent copy, and status says it is up to date.
    let v = remote_view(&server, &url, &dir.path().join("none"));
    assert!(v["problems"].as_array().unwrap().is_empty(), "{v}");
    let st = status(&a, "toy");
    assert_eq!(
        st["remote"]["remote_seq"], st["remote"]["local_seq"],
        "{st}"
    );
    assert_eq!(v["seq"], st["remote"]["local_seq"]);
    let o = tsr(&["status", "toy"], &a);
    assert!(text(&o).contains("(up to date)"), "{}", text(&o));

    // The machine is gone: the same command on an empty folder restores and continues (here:
    // nothing is left to do) with identical results.
    let b = dir.path().join("b");
    let o = server.tsr(
        &[
            "run",
            cfg.to_str().unwrap(),
            "--remote",
            &url,
            "--take-over",
        ],
        &b,
    );
    assert!(o.status.success(), "{}", text(&o));
    said += &text(&o);
    assert!(text(&o).contains("restored"), "{}", text(&o));
    assert!(text(&o).contains("0 steps executed"), "{}", text(&o));
    assert_same_outputs(&a, &b, "toy", "after a restore");

    // `tsr restore` into a third folder: the local verify is clean and every command works.
    let c = dir.path().join("c");
    let o = server.tsr(&["restore", &url], &c);
    assert!(o.status.success(), "{}", text(&o));
    said += &text(&o);
    let o = tsr(&["verify"], &c);
    assert!(o.status.success(), "{}", text(&o));
    assert_same_outputs(&a, &c, "toy", "after tsr restore");
    for cmd in [
        vec!["runs"],
        vec!["status", "toy"],
        vec!["replay", "toy", "--iteration", "2"],
    ] {
        let o = tsr(&cmd, &c);
        assert!(o.status.success(), "{cmd:?}: {}", text(&o));
    }
    // A restore never overwrites a store.
    let o = server.tsr(&["restore", &url], &a);
    assert!(!o.status.success());
    assert!(text(&o).contains("already holds a store"), "{}", text(&o));

    // No credential in any file of the stores or of the remote, nor in what was printed.
    let mut files = Vec::new();
    for d in [&a, &b, &c, &server.root] {
        files.extend(files_under(d));
    }
    assert!(files.len() > 20);
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        for secret in [SECRET_KEY, ACCESS_KEY] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{secret} found in {}",
                f.display()
            );
        }
    }
    assert!(
        !said.contains(SECRET_KEY) && !said.contains(ACCESS_KEY),
        "{said}"
    );
    // A URL with credentials in it is refused without repeating them.
    let o = server.tsr(
        &[
            "run",
            cfg.to_str().unwrap(),
            "--remote",
            &format!("s3://AKIAX:{SECRET_KEY}@bucket/p"),
        ],
        &dir.path().join("d"),
    );
    assert!(!o.status.success());
    assert!(
        text(&o).contains("credentials do not belong in the URL"),
        "{}",
        text(&o)
    );
    assert!(!text(&o).contains(SECRET_KEY), "{}", text(&o));
}

fn tiny_temporal(dir: &Path) -> PathBuf {
    let model = dir.join("tiny");
    tsr_model::testing::write_tiny_hf_model(&model, 5);
    let prompts: String = [
        "hello there",
        "name a colour",
        "count to three",
        "say something kind",
        "what is rain",
        "list two fruits",
        "spell cat",
        "greet a friend",
    ]
    .iter()
    .enumerate()
    .map(|(i, p)| format!("{{\"id\": \"p{i}\", \"prompt\": \"{p}\"}}\n"))
    .collect();
    std::fs::write(dir.join("prompts.jsonl"), prompts).unwrap();
    let cfg = dir.join("temporal.toml");
    // Small batches: many commits, so that machines can be lost at many moments.
    std::fs::write(
        &cfg,
        "name = \"temporal\"\nworkflow = \"temporal\"\niterations = 1\n\
         [model]\nsource = \"tiny\"\n[prompts]\nfile = \"prompts.jsonl\"\n\
         [generate]\nk = 4\nmax_new_tokens = 8\nbatch_size = 2\n\
         [judge]\nmode = \"logprob\"\nmax_new_tokens = 6\nbatch_size = 2\n\
         [dpo]\nlr = 1e-3\nmicro_batch = 1\naccum_steps = 1\ncheckpoint_every = 1\n",
    )
    .unwrap();
    cfg
}

/// What the newest `lease.json` on the server says its holder's pid is.
fn lease_pid(server: &S3Server, prefix: &str) -> Option<u64> {
    let t = std::fs::read_to_string(server.object_path(prefix, "lease.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&t).ok()?["holder"]["pid"].as_u64()
}

#[test]
fn machine_loss_at_random_moments_continues_from_the_remote_with_identical_results() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(&dir.path().join("s3"));
    let url = server.url("loss");
    let cfg = tiny_temporal(dir.path());
    let cfg_s = cfg.to_str().unwrap();
    let reference = dir.path().join("reference");
    let (v, units) = reference_run(&cfg, &reference, "temporal");

    // Each round is a new machine: an empty folder, the remote, SIGKILL, and the folder is lost
    // with the machine. Every moment is an event the test observes, never a time, so the rounds
    // mean the same on a fast machine and a slow one:
    // - while it starts: once the remote's lease names it (taken, nothing restored yet), or once
    //   its restore has written a blob;
    // - inside every step with units, both phases: the machine stops itself at a unit of the
    //   step, goes on for a seeded moment (cut short by its next unit boundary) and is
    //   killed there.
    let plan = plan_kills(&v, &units, 3, 11);
    // One start-up round before every second step round.
    let kills = plan.len() + plan.len() / 2;
    assert!(kills >= 24, "{kills} machine losses planned: {units:?}");
    let machine = |i: usize| {
        let mut c = server.command(
            &[
                "run",
                cfg_s,
                "--quiet",
                "--remote",
                &url,
                "--take-over",
                "--remote-sync",
                "commit",
            ],
            &dir.path().join(format!("machine-{i}")),
        );
        c.stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join(format!("machine-{i}.log"))).unwrap());
        c
    };
    let mut rounds: Vec<String> = Vec::new();
    let mut hit = std::collections::BTreeSet::new();
    let first = remote_end(&server, "loss");
    for (i, at) in plan.iter().enumerate() {
        let store = dir.path().join(format!("machine-{i}"));
        if i % 2 == 1 {
            // A start-up round before this step's round.
            let mut child = machine(100 + i).spawn().unwrap();
            let store0 = dir.path().join(format!("machine-{}", 100 + i));
            let restoring = (i / 2) % 2 == 0;
            let what = if restoring { "restored blob" } else { "lease" };
            wait_event(&mut child, what, |c| {
                c.try_wait().unwrap().is_some()
                    || if restoring {
                        // Restoring: it has written a blob it read from the remote.
                        !files_under(&store0.join("blobs")).is_empty()
                    } else {
                        lease_pid(&server, "loss") == Some(c.id() as u64)
                    }
            });
            assert!(
                child.try_wait().unwrap().is_none(),
                "round {i}: the machine ended while starting: {}",
                std::fs::read_to_string(dir.path().join(format!("machine-{}.log", 100 + i)))
                    .unwrap_or_default()
            );
            child.kill().unwrap();
            child.wait().unwrap();
            rounds.push(
                if restoring {
                    "while restoring"
                } else {
                    "lease taken"
                }
                .into(),
            );
            let _ = std::fs::remove_dir_all(&store0);
        }
        let mut child = spawn_paused(machine(i), at).unwrap_or_else(|o| {
            panic!(
                "round {i}: the machine never reached {at:?} (exit {:?}): {}",
                o.status.code(),
                std::fs::read_to_string(dir.path().join(format!("machine-{i}.log")))
                    .unwrap_or_default()
            )
        });
        assert!(
            kill_after(&mut child, at.after_ms),
            "round {i}: the run finished within {at:?}"
        );
        let left = unfinished_kinds(&store, "temporal");
        if left.iter().any(|(_, n)| *n == at.node) {
            hit.insert(at.node.clone());
        }
        rounds.push(format!("{at:?} left {left:?} unfinished"));
        std::fs::remove_dir_all(&store).unwrap();
    }
    // Coverage, not a count: a kill landed inside every step with units, in both phases.
    let planned: std::collections::BTreeSet<String> = plan.iter().map(|k| k.node.clone()).collect();
    let missed: Vec<&String> = planned.difference(&hit).collect();
    assert!(
        missed.is_empty(),
        "no kill landed in {missed:?}: {rounds:#?}"
    );
    for kind in ["generate", "judge", "ref-logprobs", "dpo"] {
        assert!(
            v["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["kind"] == kind && planned.contains(n["node"].as_str().unwrap())),
            "no `{kind}` step planned: {units:?}"
        );
    }
    // The killed machines' work reached the remote (the last machine does not start from
    // scratch).
    let seen = remote_end(&server, "loss");
    assert!(
        seen > first,
        "the remote holds no commit of the killed machines: {rounds:#?}"
    );
    let last = dir.path().join("last");
    let o = server.tsr(
        &["run", cfg_s, "--quiet", "--remote", &url, "--take-over"],
        &last,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(rounds.len(), kills);
    eprintln!("{kills} machine losses: {rounds:#?}");
    assert_same_outputs(
        &reference,
        &last,
        "temporal",
        &format!("after {kills} machine losses"),
    );
    let pairs = |s: &Path| {
        let o = tsr(&["export", "temporal", "pairs"], s);
        assert!(o.status.success(), "{}", text(&o));
        o.stdout
    };
    assert_eq!(pairs(&reference), pairs(&last), "exported pairs differ");
    let v = remote_view(&server, &url, &dir.path().join("none"));
    assert!(v["problems"].as_array().unwrap().is_empty(), "{v}");
    assert!(v["generations"].as_u64().unwrap() >= 2, "{v}");
}

/// Start `tsr run CONFIG --quiet --remote URL` in the background with extra environment,
/// its output captured.
fn spawn_run(
    server: &S3Server,
    cfg: &str,
    url: &str,
    store: &Path,
    env: &[(&str, &str)],
) -> std::process::Child {
    let mut c = server.command(&["run", cfg, "--quiet", "--remote", url], store);
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn a_second_writer_is_refused_and_a_take_over_fences_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(&dir.path().join("s3"));
    let url = server.url("fence");
    let cfg = toy_config(dir.path(), "toy", 60);
    let cfg_s = cfg.to_str().unwrap();
    let a = dir.path().join("a");
    let a_child = spawn_run(&server, cfg_s, &url, &a, &[]);
    wait_for("the first segment", 60, || {
        !segments(&server, "fence", 1).is_empty()
    });

    // Another machine without --take-over is refused, naming the holder and the expiry.
    let b = dir.path().join("b");
    let o = server.tsr(&["run", cfg_s, "--quiet", "--remote", &url], &b);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("is held by host") && t.contains("--take-over"),
        "{t}"
    );
    assert!(t.contains(&format!("pid {}", a_child.id())), "{t}");

    // A store with another history is refused even with --take-over, and leaves the writer be.
    let other = dir.path().join("other");
    let quick = toy_config(dir.path(), "quick", 1);
    assert!(tsr(&["run", quick.to_str().unwrap(), "--quiet"], &other)
        .status
        .success());
    let o = server.tsr(
        &["run", cfg_s, "--quiet", "--remote", &url, "--take-over"],
        &other,
    );
    assert!(!o.status.success());
    assert!(
        text(&o).contains("holds the history of another store"),
        "{}",
        text(&o)
    );
    let lease = std::fs::read_to_string(server.object_path("fence", "lease.json")).unwrap();
    assert!(
        lease.contains(&format!("\"pid\": {}", a_child.id())),
        "{lease}"
    );

    // With --take-over it restores, takes the remote and finishes the run.
    let b2 = dir.path().join("b2");
    let o = server.tsr(&["run", cfg_s, "--remote", &url, "--take-over"], &b2);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    let restored_at: u64 = t
        .split("up to commit ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{t}"));

    // The first writer learns it lost the lease at its next write and stops.
    let out = a_child.wait_with_output().unwrap();
    let ta = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{ta}");
    assert!(ta.contains("took the remote over"), "{ta}");
    // Nothing the first writer wrote after losing the lease is in the remote's history: a
    // restore reads the second machine's generation and gives the second machine's results.
    // (The first one's generation ends where the second restored from, but for at most a
    // segment in flight while the lease changed hands, which no restore reads.)
    let late = segments(&server, "fence", 1)
        .iter()
        .filter(|(_, last)| *last > restored_at)
        .count();
    assert!(
        late <= 1,
        "{late} segments written after the take-over at {restored_at}"
    );
    let c = dir.path().join("c");
    let o = server.tsr(&["restore", &url], &c);
    assert!(o.status.success(), "{}", text(&o));
    assert_same_outputs(&b2, &c, "toy", "restored after the take-over");
    let v = remote_view(&server, &url, &dir.path().join("none"));
    assert_eq!(v["epoch"], 2, "{v}");
    assert!(v["problems"].as_array().unwrap().is_empty(), "{v}");
    // The first machine's store is intact but no longer continues the remote.
    let o = server.tsr(
        &["run", cfg_s, "--quiet", "--remote", &url, "--take-over"],
        &a,
    );
    assert!(!o.status.success());
    assert!(
        text(&o).contains("holds the history of another store"),
        "{}",
        text(&o)
    );
}

#[test]
fn an_unreachable_server_and_failing_puts_do_not_stop_the_run_and_it_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = S3Server::start(&dir.path().join("s3"));
    let url = server.url("faults");
    let cfg = toy_config(dir.path(), "toy", 40);
    let cfg_s = cfg.to_str().unwrap();
    let reference = dir.path().join("reference");
    assert!(tsr(&["run", cfg_s, "--quiet"], &reference).status.success());

    // The server goes away mid-run and comes back: the run goes on locally and the remote
    // catches up before the process exits.
    let a = dir.path().join("a");
    // The run may go on without the remote for 2 s, then waits for it.
    let child = spawn_run(
        &server,
        cfg_s,
        &url,
        &a,
        &[("TSR_REMOTE_FLUSH_S", "120"), ("TSR_REMOTE_MAX_LAG_S", "2")],
    );
    wait_for("the first segment", 60, || {
        !segments(&server, "faults", 1).is_empty()
    });
    server.stop();
    std::thread::sleep(Duration::from_millis(8000));
    server.restart();
    let out = child.wait_with_output().unwrap();
    let t = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{t}");
    assert!(t.contains("the run goes on locally"), "{t}");
    assert!(t.contains("answers again"), "{t}");
    assert!(
        t.contains("more than the bound of 2 s; waiting for it"),
        "{t}"
    );
    assert_same_outputs(&reference, &a, "toy", "with the server down for a while");
    let st = status(&a, "toy");
    assert_eq!(
        st["remote"]["remote_seq"], st["remote"]["local_seq"],
        "{st}"
    );
    let v = remote_view(&server, &url, &dir.path().join("none"));
    assert!(v["problems"].as_array().unwrap().is_empty(), "{v}");
    assert_eq!(v["seq"], st["remote"]["local_seq"], "{v}");
    let r = dir.path().join("restored");
    assert!(server.tsr(&["restore", &url], &r).status.success());
    assert_same_outputs(&reference, &r, "toy", "restored after the outage");

    // A PUT the server fails (it cannot create the blobs folder: a file stands in its way).
    let url2 = server.url("failing");
    let blocker = server.object_path("failing", "blobs");
    std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    std::fs::write(&blocker, b"in the way").unwrap();
    let b = dir.path().join("b");
    let child = spawn_run(&server, cfg_s, &url2, &b, &[("TSR_REMOTE_FLUSH_S", "120")]);
    // The first step's output cannot be uploaded: the remote stays at its first snapshot
    // while the run goes on.
    std::thread::sleep(Duration::from_millis(4000));
    assert!(segments(&server, "failing", 1).is_empty());
    std::fs::remove_file(&blocker).unwrap();
    let out = child.wait_with_output().unwrap();
    let t = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("`blobs/") && t.contains("500 Internal Server Error"),
        "the failing PUT is named: {t}"
    );
    assert!(t.contains("the run goes on locally"), "{t}");
    assert_same_outputs(&reference, &b, "toy", "with failing uploads");
    let v = remote_view(&server, &url2, &dir.path().join("none"));
    assert!(v["problems"].as_array().unwrap().is_empty(), "{v}");
}

#[test]
fn verify_finds_corrupt_and_missing_remote_objects() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(&dir.path().join("s3"));
    let url = server.url("damage");
    let cfg = toy_config(dir.path(), "toy", 2);
    let a = dir.path().join("a");
    let o = server.tsr(
        &[
            "run",
            cfg.to_str().unwrap(),
            "--quiet",
            "--remote",
            &url,
            "--remote-sync",
            "commit",
        ],
        &a,
    );
    assert!(o.status.success(), "{}", text(&o));
    let none = dir.path().join("none");
    let check = |what: &str, want: &str| {
        let o = server.tsr(&["verify", "--remote", &url], &none);
        assert_eq!(o.status.code(), Some(1), "{what}: {}", text(&o));
        assert!(text(&o).contains(want), "{what}: {}", text(&o));
    };
    let segs = segments(&server, "damage", 1);
    assert!(segs.len() >= 3, "{segs:?}");
    let (f, l) = segs[segs.len() / 2];
    let seg = server.object_path(
        "damage",
        &format!("gens/0000000001/segments/{f:020}-{l:020}"),
    );
    let good = std::fs::read(&seg).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x20;
    std::fs::write(&seg, &bad).unwrap();
    check("a flipped byte", "checksum does not match");
    // A restore refuses it too, naming the object.
    let o = server.tsr(&["restore", &url], &dir.path().join("r1"));
    assert!(!o.status.success());
    assert!(
        text(&o).contains(&format!("{f:020}-{l:020}")),
        "{}",
        text(&o)
    );
    std::fs::remove_file(&seg).unwrap();
    check("a missing segment", "a segment before it is missing");
    std::fs::write(&seg, &good).unwrap();
    let o = server.tsr(&["verify", "--remote", &url], &none);
    assert!(o.status.success(), "{}", text(&o));
    // A blob: missing, then corrupt.
    let model = output_of(&status(&a, "toy"), "iter2/train", "model");
    let blob = server.object_path("damage", &format!("blobs/{model}"));
    let bytes = std::fs::read(&blob).unwrap();
    std::fs::remove_file(&blob).unwrap();
    check("a missing blob", &format!("blob {model} is missing"));
    let mut bad = bytes.clone();
    bad[0] ^= 1;
    std::fs::write(&blob, &bad).unwrap();
    check("a corrupt blob", &format!("blob {model} is corrupt"));
    std::fs::write(&blob, &bytes).unwrap();
    assert!(server
        .tsr(&["verify", "--remote", &url], &none)
        .status
        .success());
}

#[test]
fn sigterm_uploads_what_the_remote_lacks_before_exiting() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(&dir.path().join("s3"));
    let url = server.url("term");
    let cfg = toy_config(dir.path(), "toy", 60);
    let a = dir.path().join("a");
    let child = spawn_run(&server, cfg.to_str().unwrap(), &url, &a, &[]);
    wait_for("the first segment", 60, || {
        !segments(&server, "term", 1).is_empty()
    });
    std::thread::sleep(Duration::from_millis(700));
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let out = child.wait_with_output().unwrap();
    let t = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(75), "{t}");
    assert!(t.contains("holds every commit"), "{t}");
    let st = status(&a, "toy");
    let local = &st["remote"]["local_seq"];
    assert_eq!(&st["remote"]["remote_seq"], local, "{st}");
    let v = remote_view(&server, &url, &dir.path().join("none"));
    assert_eq!(&v["seq"], local, "{v}");
    // The lease was let go: another machine continues at once, without --take-over.
    let b = dir.path().join("b");
    let o = server.tsr(
        &["run", cfg.to_str().unwrap(), "--quiet", "--remote", &url],
        &b,
    );
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn a_store_stays_with_its_remote_and_settings_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(&dir.path().join("s3"));
    let cfg = toy_config(dir.path(), "toy", 1);
    let cfg_s = cfg.to_str().unwrap();
    let a = dir.path().join("a");
    let o = server.tsr(
        &["run", cfg_s, "--quiet", "--remote", &server.url("one")],
        &a,
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = server.tsr(
        &["run", cfg_s, "--quiet", "--remote", &server.url("two")],
        &a,
    );
    assert!(!o.status.success());
    assert!(
        text(&o).contains("is replicated to s3://tsr-test/one"),
        "{}",
        text(&o)
    );
    // Resume without --remote keeps replicating to the store's remote.
    let o = server.tsr(&["resume", "toy", "--remote-sync", "commit"], &a);
    assert!(o.status.success(), "{}", text(&o));
    let o = server.tsr(&["resume", "toy", "--remote-sync", "often"], &a);
    assert!(
        text(&o).contains("`often` is not a sync mode"),
        "{}",
        text(&o)
    );
    // The remote settings in a config are checked before anything runs, and are not part of
    // the run's definition (changing them is not another run).
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("seed = 1\n[toy]", "seed = 1\nremote = \"ftp://x/y\"\n[toy]"),
    )
    .unwrap();
    let o = tsr(&["run", bad.to_str().unwrap()], &dir.path().join("z"));
    assert!(text(&o).contains("config key `remote`"), "{}", text(&o));
    assert!(text(&o).contains("not supported"), "{}", text(&o));
    let with = dir.path().join("with.toml");
    std::fs::write(
        &with,
        std::fs::read_to_string(&cfg).unwrap().replace(
            "seed = 1\n[toy]",
            &format!(
                "seed = 1\nremote = \"{}\"\nremote_sync = \"checkpoint\"\n[toy]",
                server.url("one")
            ),
        ),
    )
    .unwrap();
    let o = server.tsr(&["run", with.to_str().unwrap(), "--quiet"], &a);
    assert!(o.status.success(), "{}", text(&o));
    // gc cleans the remote too: after it, the remote holds one snapshot and what it refers to.
    let o = server.tsr(&["gc"], &a);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("remote: removed"), "{}", text(&o));
    let v = remote_view(&server, &server.url("one"), &dir.path().join("none"));
    assert!(v["problems"].as_array().unwrap().is_empty(), "{v}");
    assert_eq!(v["segments"], 0, "{v}");
    let c = dir.path().join("c");
    assert!(server
        .tsr(&["restore", &server.url("one")], &c)
        .status
        .success());
    assert_same_outputs(&a, &c, "toy", "after gc");
}

#[test]
fn file_remotes_work_the_same_way() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = toy_config(dir.path(), "toy", 40);
    let url = format!("file://{}", dir.path().join("bucket").display());
    let a = dir.path().join("a");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tsr"))
        .args([
            "run",
            cfg.to_str().unwrap(),
            "--quiet",
            "--remote",
            &url,
            "--store",
        ])
        .arg(&a)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lease = dir.path().join("bucket/lease.json");
    wait_for("the lease", 60, || lease.exists());
    // The lease is swapped under a lock file: a second writer is refused while it is live.
    let o = tsr(
        &["run", cfg.to_str().unwrap(), "--quiet", "--remote", &url],
        &dir.path().join("x"),
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("is held by host"), "{}", text(&o));
    assert!(child.wait().unwrap().success());
    // Once it let the lease go, another machine continues without --take-over.
    let b = dir.path().join("b");
    let o = tsr(
        &["run", cfg.to_str().unwrap(), "--quiet", "--remote", &url],
        &b,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_same_outputs(&a, &b, "toy", "through a file remote");
    // Reading a folder that does not exist says so and creates nothing.
    let missing = dir.path().join("missing");
    let o = tsr(
        &[
            "verify",
            "--remote",
            &format!("file://{}", missing.display()),
        ],
        &b,
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("holds no store yet"), "{}", text(&o));
    assert!(!missing.exists());
}

#[test]
fn a_rolled_back_database_does_not_continue_its_remote() {
    // The remote took commits the local database then lost (restored from an old copy): once
    // `verify --repair` accepts the database, its new commits would reuse those numbers, so it
    // no longer replicates to that remote; the remote itself restores whole.
    let dir = tempfile::tempdir().unwrap();
    let cfg = toy_config(dir.path(), "toy", 1);
    let url = format!("file://{}", dir.path().join("bucket").display());
    let a = dir.path().join("a");
    let o = tsr(
        &["run", cfg.to_str().unwrap(), "--quiet", "--remote", &url],
        &a,
    );
    assert!(o.status.success(), "{}", text(&o));
    let old = dir.path().join("db-old");
    copy_dir(&a.join("db"), &old);
    let o = tsr(
        &[
            "fork",
            "toy",
            "--name",
            "toy2",
            "--set",
            "toy.train_steps=7",
            "--quiet",
        ],
        &a,
    );
    assert!(o.status.success(), "{}", text(&o));
    std::fs::remove_dir_all(a.join("db")).unwrap();
    copy_dir(&old, &a.join("db"));
    let o = tsr(&["verify", "--repair"], &a);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("was rolled back and accepted"), "{t}");
    let o = tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &a);
    assert!(
        text(&o).contains("was rolled back and accepted"),
        "{}",
        text(&o)
    );
    let b = dir.path().join("b");
    let o = tsr(&["restore", &url], &b);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(status(&b, "toy2")["nodes"].as_array().unwrap().len(), 8);
}

#[test]
fn an_expired_lease_is_taken_without_asking() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(&dir.path().join("s3"));
    let url = server.url("expiry");
    let cfg = toy_config(dir.path(), "toy", 60);
    let cfg_s = cfg.to_str().unwrap();
    let mut child = spawn_run(
        &server,
        cfg_s,
        &url,
        &dir.path().join("a"),
        &[("TSR_REMOTE_LEASE_S", "3")],
    );
    wait_for("the first segment", 60, || {
        !segments(&server, "expiry", 1).is_empty()
    });
    // The machine vanishes without letting the lease go.
    child.kill().unwrap();
    child.wait().unwrap();
    let b = dir.path().join("b");
    let o = server.tsr(&["run", cfg_s, "--quiet", "--remote", &url], &b);
    assert!(!o.status.success());
    assert!(text(&o).contains("is held by host"), "{}", text(&o));
    std::thread::sleep(Duration::from_millis(3500));
    let o = server.tsr(&["run", cfg_s, "--quiet", "--remote", &url], &b);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("restored"), "{}", text(&o));
}

#[test]
fn a_damaged_local_blob_is_never_uploaded() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = toy_config(dir.path(), "toy", 1);
    let a = dir.path().join("a");
    assert!(tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &a)
        .status
        .success());
    let model = output_of(&status(&a, "toy"), "iter2/train", "model");
    let path = a.join("blobs").join(&model[..2]).join(&model[2..]);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let bucket = dir.path().join("bucket");
    let url = format!("file://{}", bucket.display());
    let o = tsr(
        &["run", cfg.to_str().unwrap(), "--quiet", "--remote", &url],
        &a,
    );
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains(&format!("blob {model} of this store")) && t.contains("verify --repair"),
        "{t}"
    );
    assert!(
        !bucket.join("blobs").join(&model).exists(),
        "the damaged blob was uploaded"
    );
    // Repaired, it replicates.
    assert!(tsr(&["verify", "--repair"], &a).status.success());
    let o = tsr(
        &["run", cfg.to_str().unwrap(), "--quiet", "--remote", &url],
        &a,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(bucket.join("blobs").join(&model).exists());
}

#[test]
fn sigterm_ends_a_wait_for_a_lagging_remote() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = S3Server::start(&dir.path().join("s3"));
    let url = server.url("lag");
    let cfg = toy_config(dir.path(), "toy", 60);
    let a = dir.path().join("a");
    let log = dir.path().join("a.log");
    let mut child = server
        .command(
            &["run", cfg.to_str().unwrap(), "--quiet", "--remote", &url],
            &a,
        )
        .env("TSR_REMOTE_MAX_LAG_S", "1")
        .env("TSR_REMOTE_FLUSH_S", "3")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for("the first segment", 60, || {
        !segments(&server, "lag", 1).is_empty()
    });
    server.stop();
    // The run reaches a sync point and says it waits for the remote (an event in its log, not
    // a time); then a spot notice arrives.
    wait_for("the wait for the remote", 120, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("waiting for it before going on")
    });
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let t0 = Instant::now();
    let exit = child.wait().unwrap();
    let t = std::fs::read_to_string(&log).unwrap();
    assert_eq!(exit.code(), Some(75), "{t}");
    // The way out is bounded by TSR_REMOTE_FLUSH_S (3 s); 30 s leaves room for a loaded
    // machine. Without the stop request ending the wait, the run would wait until the remote
    // answers.
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "took {:?}: {t}",
        t0.elapsed()
    );
    assert!(t.contains("the rest is in the local store"), "{t}");
    // The next run on this store uploads what the remote lacks.
    server.restart();
    let o = server.tsr(&["run", cfg.to_str().unwrap(), "--quiet"], &a);
    assert!(o.status.success(), "{}", text(&o));
    let st = status(&a, "toy");
    assert_eq!(
        st["remote"]["remote_seq"], st["remote"]["local_seq"],
        "{st}"
    );
}
