//! Helpers shared by the CLI integration tests: run the `tsr` binary against a store and read
//! what it recorded.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

pub mod s3;

/// Run `tsr ARGS --store STORE` and capture its output.
pub fn tsr(args: &[&str], store: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tsr"))
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

/// Start `tsr run CONFIG` on `store` once per delay and SIGKILL it after that many
/// milliseconds (if it is still running). Returns how many kills landed.
pub fn kill_at_delays(cfg: &Path, store: &Path, delays_ms: &[u64]) -> usize {
    let mut kills = 0;
    for &delay_ms in delays_ms {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tsr"))
            .args(["run", cfg.to_str().unwrap(), "--quiet", "--store"])
            .arg(store)
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
    }
    kills
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
    let mut child = Command::new(env!("CARGO_BIN_EXE_tsr"))
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
