//! Per-item bookkeeping cost of the engine and memory as items accumulate.
//!
//! Runs one step that commits `--items` items (default 80,000 = 10,000 prompts x K = 8) in
//! fixed batches of `--batch` through the real store (sled batch + flush per batch), with no
//! work per item, so the time measured is bookkeeping only. Prints the cost per item and the
//! resident memory sampled as items accumulate.
//!
//! `cargo run --release -p tsr-engine --example bench_journal -- --items 80000 --batch 16`

use std::sync::Arc;
use std::time::Instant;
use tsr_engine::{
    open_run, DagBuilder, Driver, DriverOptions, RunSpec, Step, StepContext, StepError, StepInputs,
    StepOutputs, StopFlag,
};
use tsr_state::Store;

struct Items {
    n: u64,
    batch: usize,
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(|l| l.to_string())
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

impl Step for Items {
    fn kind(&self) -> &'static str {
        "bench-items"
    }
    fn version(&self) -> u32 {
        1
    }
    fn config(&self) -> serde_json::Value {
        serde_json::json!({"n": self.n, "batch": self.batch})
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["count"]
    }
    fn run(&self, _: &StepInputs, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let t0 = Instant::now();
        let mut next_report = self.n / 8;
        let mut done = 0u64;
        ctx.for_each_batch(self.n, self.batch, |idx| {
            done += idx.len() as u64;
            if done >= next_report {
                println!(
                    "  {done:>7} items  {:>7.3} ms/item so far  RSS {:>6.1} MiB",
                    t0.elapsed().as_secs_f64() * 1000.0 / done as f64,
                    rss_mib()
                );
                next_report += self.n / 8;
            }
            // A response-sized payload (about 300 bytes of JSON).
            Ok(idx
                .iter()
                .map(|i| {
                    format!(
                        "{{\"prompt_id\":\"p{}\",\"sample\":{},\"text\":\"{}\"}}",
                        i / 8,
                        i % 8,
                        "x".repeat(240)
                    )
                    .into_bytes()
                })
                .collect())
        })?;
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "committed {} items in batches of {} in {secs:.2} s: {:.3} ms/item",
            self.n,
            self.batch,
            secs * 1000.0 / self.n as f64
        );
        Ok(StepOutputs::new().bytes("count", "text", self.n.to_string().into_bytes()))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: u64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let n = arg("--items", 80_000);
    let batch = arg("--batch", 16) as usize;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    let mut b = DagBuilder::new();
    b.add("items", Arc::new(Items { n, batch }), vec![], None);
    let dag = Arc::new(b.build().unwrap());
    let spec = RunSpec {
        name: "bench".into(),
        workflow: "bench".into(),
        config_toml: String::new(),
        definition: Default::default(),
        forked_from: None,
    };
    open_run(&store, &spec, &dag).unwrap();
    println!("RSS at start {:.1} MiB", rss_mib());
    let t0 = Instant::now();
    Driver::new(
        store.clone(),
        dag,
        "bench",
        DriverOptions {
            progress: false,
            log: false,
            stop: StopFlag::new(),
            ..Default::default()
        },
    )
    .run()
    .unwrap();
    println!(
        "whole run {:.2} s, RSS at end {:.1} MiB",
        t0.elapsed().as_secs_f64(),
        rss_mib()
    );
    let v = tsr_state::verify(&store).unwrap();
    println!("store consistent: {} ({} records)", v.ok(), v.records);
}
