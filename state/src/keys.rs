//! Key layout of the single sled tree. Each table is a one-byte prefix; integers are big-endian
//! so that lexicographic order is numeric order. Retired prefixes stay reserved forever so their
//! bytes are never reused with another meaning.
//!
//! | prefix | table | key after the prefix | value |
//! |---|---|---|---|
//! | `R` | runs | run name | `RunRecord` |
//! | `N` | run nodes | run name, 0x00, node name | `NodeRecord` |
//! | `S` | steps | step key (32 bytes) | `StepRecord` |
//! | `I` | items | step key (32), item index (u64 BE) | item payload (step-defined bytes) |
//! | `A` | artifacts | digest (32) | `ArtifactRecord` |
//! | `L` | lineage edges | output digest (32), input digest (32) | `EdgeRecord` |
//! | `M` | meta | name | raw bytes (`format` = store format version) |
//! | `J` | journal | commit number (u64 BE) | the commit's writes, for the remote copy (only while replicated) |
//! | `W` | who computed items | step key (32), first item index of the batch (u64 BE) | `WorkerRecord` |

use crate::Digest;

pub const RUN: u8 = b'R';
pub const NODE: u8 = b'N';
pub const STEP: u8 = b'S';
pub const ITEM: u8 = b'I';
pub const ARTIFACT: u8 = b'A';
pub const EDGE: u8 = b'L';
pub const META: u8 = b'M';
pub const JOURNAL: u8 = b'J';
pub const WORKER: u8 = b'W';

pub fn journal(seq: u64) -> Vec<u8> {
    let mut k = vec![JOURNAL];
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Whether a key travels to the remote copy: records do; meta (local facts) and the journal
/// (the means of shipping) do not.
pub fn replicated(key: &[u8]) -> bool {
    !matches!(key.first(), Some(&META) | Some(&JOURNAL))
}

pub fn run(name: &str) -> Vec<u8> {
    let mut k = vec![RUN];
    k.extend_from_slice(name.as_bytes());
    k
}

pub fn node_prefix(run: &str) -> Vec<u8> {
    let mut k = vec![NODE];
    k.extend_from_slice(run.as_bytes());
    k.push(0);
    k
}

pub fn node(run: &str, node: &str) -> Vec<u8> {
    let mut k = node_prefix(run);
    k.extend_from_slice(node.as_bytes());
    k
}

pub fn step(key: &Digest) -> Vec<u8> {
    let mut k = vec![STEP];
    k.extend_from_slice(&key.0);
    k
}

pub fn item_prefix(step: &Digest) -> Vec<u8> {
    let mut k = vec![ITEM];
    k.extend_from_slice(&step.0);
    k
}

pub fn item(step: &Digest, index: u64) -> Vec<u8> {
    let mut k = item_prefix(step);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

pub fn worker_prefix(step: &Digest) -> Vec<u8> {
    let mut k = vec![WORKER];
    k.extend_from_slice(&step.0);
    k
}

pub fn worker(step: &Digest, first: u64) -> Vec<u8> {
    let mut k = worker_prefix(step);
    k.extend_from_slice(&first.to_be_bytes());
    k
}

pub fn artifact(d: &Digest) -> Vec<u8> {
    let mut k = vec![ARTIFACT];
    k.extend_from_slice(&d.0);
    k
}

pub fn edge_prefix(output: &Digest) -> Vec<u8> {
    let mut k = vec![EDGE];
    k.extend_from_slice(&output.0);
    k
}

pub fn edge(output: &Digest, input: &Digest) -> Vec<u8> {
    let mut k = edge_prefix(output);
    k.extend_from_slice(&input.0);
    k
}

pub fn meta(name: &str) -> Vec<u8> {
    let mut k = vec![META];
    k.extend_from_slice(name.as_bytes());
    k
}

pub fn digest_at(key: &[u8], offset: usize) -> Option<Digest> {
    let slice = key.get(offset..offset + 32)?;
    let mut d = [0u8; 32];
    d.copy_from_slice(slice);
    Some(Digest(d))
}

/// Human-readable rendering of a key for error messages.
pub fn display(key: &[u8]) -> String {
    let Some((&prefix, rest)) = key.split_first() else {
        return "<empty>".into();
    };
    let table = match prefix {
        RUN => "run",
        NODE => "node",
        STEP => "step",
        ITEM => "item",
        ARTIFACT => "artifact",
        EDGE => "edge",
        META => "meta",
        JOURNAL => "journal",
        WORKER => "worker",
        _ => "unknown",
    };
    match prefix {
        RUN | NODE | META => format!(
            "{table}:{}",
            String::from_utf8_lossy(rest).replace('\0', "/")
        ),
        ITEM | WORKER if rest.len() == 40 => {
            let d = digest_at(key, 1).unwrap();
            let idx = u64::from_be_bytes(rest[32..40].try_into().unwrap());
            format!("{table}:{}#{idx}", d.short())
        }
        _ => {
            let hex: String = rest.iter().take(8).map(|b| format!("{b:02x}")).collect();
            format!("{table}:{hex}")
        }
    }
}
