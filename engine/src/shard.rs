//! Item steps computed in shards by other processes: the job a worker gets, the batch runner
//! the driver hands a step's missing batches to, the result files workers write and the
//! journal a worker computes into.
//!
//! The protocol keeps the driver the single writer of its store:
//! - a worker gets a [`ShardJob`] (everything that makes the step's key, and where its inputs
//!   are) and a list of batch indices of the step's fixed partition;
//! - it recomputes the step key from the job and refuses a mismatch, so a result always
//!   belongs to the step it is imported into;
//! - it writes one result file per batch (created whole, under a name of its own), and a
//!   retried shard skips the batches that already have a verified result;
//! - the driver verifies each result (magic, checksum, the batch's exact indices), commits the
//!   first verified result of each batch once, and ignores duplicates and damaged files.
//!
//! Seeds come from the step key and each item's identity, and a batch holds the same items as
//! in a local run, so a batch computes the same bytes wherever it runs (on the same hardware
//! class and thread count).

use crate::error::StepError;
use crate::preempt::StopFlag;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tsr_state::{Digest, WorkerRecord};

/// What a worker needs to compute batches of one step.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ShardJob {
    /// The node the step runs for (for messages and logs).
    pub node: String,
    #[serde(with = "tsr_state::hex")]
    pub key: Digest,
    pub kind: String,
    pub version: u32,
    pub config: serde_json::Value,
    /// Input digests, by input name.
    pub inputs: BTreeMap<String, Digest>,
    /// External inputs (files outside the store), by input name.
    pub externals: BTreeMap<String, PathBuf>,
    /// Through a remote: the digests the external inputs are offered under (a worker reads
    /// them from its node cache instead of the paths).
    #[serde(default)]
    pub external_blobs: BTreeMap<String, Digest>,
    /// The blob folder the inputs are read from.
    pub blobs: PathBuf,
    pub device: String,
    /// Items of the step, and items per batch (the fixed partition).
    pub total: u64,
    pub batch: u64,
    /// The identity of the program that made the job; a worker that is another program
    /// refuses it.
    pub build: String,
    /// A whole step run as one job (see [`crate::job`]): one batch of one item, whose result
    /// lists the step's outputs.
    #[serde(default)]
    pub whole: bool,
}

impl ShardJob {
    /// The item indices of batch `b`.
    pub fn batch_items(&self, b: u64) -> std::ops::Range<u64> {
        let start = b * self.batch;
        start..(start + self.batch).min(self.total)
    }

    /// How many batches the step has.
    pub fn batches(&self) -> u64 {
        self.total.div_ceil(self.batch.max(1))
    }
}

/// Where a step's shards stand while an executor computes them (for `tsr status`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ShardProgress {
    /// Shards with batches left when the step was handed over.
    pub shards: u64,
    /// Waiting to start (queued by tsr, or pending in the cluster's queue).
    pub waiting: u64,
    pub running: u64,
    pub done: u64,
    /// Attempts used up by failures, over all shards.
    pub failed_attempts: u32,
    /// Who computes the running and pending ones (`array task 812_3`, `pid 4711`).
    pub workers: Vec<String>,
    /// What a user should know now: a pending reason, the controller not answering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The progress of each step a runner is computing, by node.
#[derive(Debug, Default)]
pub struct ProgressBoard(std::sync::Mutex<BTreeMap<String, ShardProgress>>);

impl ProgressBoard {
    pub fn set(&self, node: &str, p: ShardProgress) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(node.to_string(), p);
        }
    }
    pub fn clear(&self, node: &str) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(node);
        }
    }
    pub fn get(&self, node: &str) -> Option<ShardProgress> {
        self.0.lock().ok()?.get(node).cloned()
    }
}

/// Computes batches of an item step elsewhere and hands back their items.
pub trait BatchRunner: Send + Sync + std::fmt::Debug {
    /// Where the shards of `node`'s step stand, while this runner computes them.
    fn progress(&self, _node: &str) -> Option<ShardProgress> {
        None
    }

    /// Compute `batches` of `job`, calling `deliver(batch, items, worker)` with each batch's
    /// items (in index order) and who computed them as they arrive, in any order, each batch
    /// once. Returns when every batch is delivered, with [`StepError::Interrupted`] when `stop`
    /// is set first, or with the workers' error after they used up their attempts.
    fn run(
        &self,
        job: &ShardJob,
        batches: &[u64],
        stop: &StopFlag,
        deliver: &mut Deliver<'_>,
    ) -> Result<(), StepError>;
}

/// Takes a computed batch: its index, its items in index order, and who computed them.
pub type Deliver<'a> = dyn FnMut(u64, Vec<Vec<u8>>, WorkerRecord) -> Result<(), StepError> + 'a;

/// Batch indices as ranges (`0-2,5,7-9`): a shard's pending list stays short on the command
/// line however many batches it has.
pub fn format_batches(batches: &[u64]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < batches.len() {
        let mut j = i;
        while j + 1 < batches.len() && batches[j + 1] == batches[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            batches[i].to_string()
        } else {
            format!("{}-{}", batches[i], batches[j])
        });
        i = j + 1;
    }
    out.join(",")
}

/// The batch indices of [`format_batches`]' text.
pub fn parse_batches(text: &str) -> Result<Vec<u64>, String> {
    let mut out = Vec::new();
    for part in text.split(',').filter(|p| !p.trim().is_empty()) {
        let num = |s: &str| {
            s.trim()
                .parse::<u64>()
                .map_err(|_| format!("`{part}` is not a batch index or a range like 3-7"))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("`{part}` is an empty range"));
                }
                out.extend(a..=b);
            }
            None => out.push(num(part)?),
        }
    }
    Ok(out)
}

/// The folder of one step's shards under an executor's work folder:
/// `<work>/<step key>/<build, 16 hex>/` (results of another build are never read), with its
/// `results`, `logs` and `scratch` folders and the job a worker reads (`job.json`).
pub fn prepare_dir(work: &Path, job: &ShardJob) -> Result<PathBuf, StepError> {
    let dir = work
        .join(job.key.to_hex())
        .join(job.build.get(..16).unwrap_or(&job.build));
    for sub in ["results", "logs", "scratch"] {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d)
            .map_err(|e| StepError::io(format!("creating {}", d.display()), e))?;
    }
    let job_bytes = serde_json::to_vec_pretty(job).expect("a shard job serializes");
    tsr_state::fsio::write_atomic(&dir.join("job.json"), &job_bytes)?;
    Ok(dir)
}

/// The fixed shards of a step: `k` batches per shard (shard `s` is batches `s * k ..`), from
/// `shard_items` (a whole number of the step's batches) or, by default, the step's batches split
/// evenly between `workers`; returns `k` and the shards that hold any of `batches`.
pub fn plan_shards(
    job: &ShardJob,
    batches: &[u64],
    shard_items: Option<u64>,
    workers: usize,
) -> Result<(u64, BTreeMap<u64, Vec<u64>>), StepError> {
    let per = match shard_items {
        // A whole step is one job, whatever the shard size.
        _ if job.whole => 1,
        Some(n) if n == 0 || n % job.batch != 0 => {
            return Err(StepError::Invalid(format!(
                "executor.shard_items = {n} is not a whole number of this step's batches of {} items; use a multiple of {}",
                job.batch, job.batch
            )))
        }
        Some(n) => n / job.batch,
        None => job.batches().div_ceil(workers.max(1) as u64),
    }
    .max(1);
    let mut shards: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for &b in batches {
        shards.entry(b / per).or_default().push(b);
    }
    Ok((per, shards))
}

/// Delivers the verified results in `results` of the batches still `pending` (the first
/// verified result of each, once) and removes each file once delivered: the folder keeps only
/// what is to come. Damaged files and results of other batches are left alone.
pub fn deliver_results(
    job: &ShardJob,
    results: &Path,
    pending: &mut std::collections::BTreeSet<u64>,
    deliver: &mut Deliver<'_>,
) -> Result<(), StepError> {
    for (b, path) in result_files(results) {
        if pending.contains(&b) {
            if let Ok((who, items)) = read_batch(job, b, &path) {
                pending.remove(&b);
                deliver(b, items, who)?;
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    Ok(())
}

/// The last lines of a worker's log: its own error message.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(5)..].join("\n");
    if tail.is_empty() {
        "(it wrote nothing)".into()
    } else {
        tail
    }
}

const MAGIC: &[u8] = b"tsr shard result 2\n";

/// A batch's result as a worker writes it: who computed it (JSON), the items with their
/// indices, then a blake3 of everything before it.
pub fn encode_result(who: &WorkerRecord, items: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    let who = serde_json::to_vec(who).expect("a worker record serializes");
    out.extend_from_slice(&(who.len() as u64).to_le_bytes());
    out.extend_from_slice(&who);
    out.extend_from_slice(&(items.len() as u64).to_le_bytes());
    for (i, b) in items {
        out.extend_from_slice(&i.to_le_bytes());
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
        out.extend_from_slice(b);
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// A result file's content: who computed it, and its items with their indices.
pub type ShardResult = (WorkerRecord, Vec<(u64, Vec<u8>)>);

/// Who computed a result file and its items, or why it is not one (damaged, cut short,
/// another format).
pub fn decode_result(bytes: &[u8]) -> Result<ShardResult, String> {
    if bytes.len() < MAGIC.len() + 8 + 32 || !bytes.starts_with(MAGIC) {
        return Err("not a shard result (no header)".into());
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err("checksum mismatch (damaged or cut short)".into());
    }
    let mut pos = MAGIC.len();
    let u64_at = |pos: &mut usize| -> Result<u64, String> {
        let b = body
            .get(*pos..*pos + 8)
            .ok_or_else(|| "truncated record".to_string())?;
        *pos += 8;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let who_len = u64_at(&mut pos)? as usize;
    let who = body
        .get(pos..pos.saturating_add(who_len))
        .ok_or_else(|| "truncated worker record".to_string())?;
    let who: WorkerRecord =
        serde_json::from_slice(who).map_err(|e| format!("its worker record: {e}"))?;
    pos += who_len;
    let n = u64_at(&mut pos)?;
    let mut items = Vec::new();
    for _ in 0..n {
        let i = u64_at(&mut pos)?;
        let len = u64_at(&mut pos)? as usize;
        let b = body
            .get(pos..pos.saturating_add(len))
            .ok_or_else(|| "truncated item".to_string())?;
        pos += len;
        items.push((i, b.to_vec()));
    }
    if pos != body.len() {
        return Err("trailing bytes after the items".into());
    }
    Ok((who, items))
}

/// The batch a result named `<batch>.<writer>` is for.
pub fn batch_of(name: &str) -> Option<u64> {
    name.split('.').next()?.parse().ok()
}

/// The result files for batches in `dir`: `<batch>.<writer>` (temporary files start with `.`).
pub fn result_files(dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut out: Vec<(u64, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                return None;
            }
            let b = batch_of(&name)?;
            Some((b, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Who computed batch `b` of `job` and its items, from the result file at `path`, when it
/// verifies and holds exactly that batch's indices in order.
pub fn read_batch(
    job: &ShardJob,
    b: u64,
    path: &Path,
) -> Result<(WorkerRecord, Vec<Vec<u8>>), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
    check_batch(job, b, &bytes)
}

/// Who computed batch `b` of `job` and its items, from a result's bytes, when they verify and
/// hold exactly that batch's indices in order.
pub fn check_batch(
    job: &ShardJob,
    b: u64,
    bytes: &[u8],
) -> Result<(WorkerRecord, Vec<Vec<u8>>), String> {
    let (who, items) = decode_result(bytes)?;
    let want: Vec<u64> = job.batch_items(b).collect();
    let got: Vec<u64> = items.iter().map(|(i, _)| *i).collect();
    if got != want {
        return Err(format!(
            "it holds items {got:?}, not batch {b}'s {}..{}",
            want.first().unwrap_or(&0),
            want.last().map_or(0, |l| l + 1)
        ));
    }
    Ok((who, items.into_iter().map(|(_, b)| b).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_lists_travel_as_ranges() {
        for list in [
            vec![],
            vec![7],
            vec![0, 1, 2, 5, 7, 8, 9],
            (0..100_000).collect(),
        ] {
            let text = format_batches(&list);
            assert!(text.len() < 40, "{text}");
            assert_eq!(parse_batches(&text).unwrap(), list);
        }
        assert_eq!(format_batches(&[0, 1, 2, 5, 7, 8, 9]), "0-2,5,7-9");
        for bad in ["x", "3-1", "1-", "-2"] {
            assert!(parse_batches(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_result_reads_back_and_any_damage_is_refused() {
        let items = vec![(3u64, b"abc".to_vec()), (4, vec![]), (5, vec![0u8; 300])];
        let who = crate::identity::here("slurm", Some("812_3".into()), 2, "cpu");
        let bytes = encode_result(&who, &items);
        assert_eq!(decode_result(&bytes).unwrap(), (who, items));
        for cut in [0, 10, bytes.len() / 2, bytes.len() - 1] {
            assert!(decode_result(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        for flip in [0, MAGIC.len() + 3, bytes.len() / 2, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[flip] ^= 1;
            assert!(decode_result(&b).is_err(), "flip at {flip}");
        }
    }

    #[test]
    fn a_result_must_hold_exactly_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let job = ShardJob {
            node: "n".into(),
            key: Digest::of(b"k"),
            kind: "toy-map".into(),
            version: 1,
            config: serde_json::json!({}),
            inputs: BTreeMap::new(),
            externals: BTreeMap::new(),
            external_blobs: BTreeMap::new(),
            blobs: dir.path().to_path_buf(),
            device: "cpu".into(),
            total: 7,
            batch: 3,
            build: "b".into(),
            whole: false,
        };
        assert_eq!(job.batches(), 3);
        assert_eq!(job.batch_items(2), 6..7);
        let who = crate::identity::here("processes", Some("shard 0".into()), 0, "cpu");
        let p = dir.path().join("1.w");
        std::fs::write(
            &p,
            encode_result(&who, &[(3, vec![1]), (4, vec![2]), (5, vec![3])]),
        )
        .unwrap();
        assert_eq!(
            read_batch(&job, 1, &p).unwrap(),
            (who.clone(), vec![vec![1], vec![2], vec![3]])
        );
        assert!(read_batch(&job, 0, &p).is_err());
        std::fs::write(&p, encode_result(&who, &[(3, vec![1]), (4, vec![2])])).unwrap();
        assert!(read_batch(&job, 1, &p).is_err());
    }
}
