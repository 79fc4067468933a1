//! Step keys: `blake3(kind, version, canonical config JSON, sorted (input name, digest))`.
//! Two nodes, in one run or in two, with equal keys are the same work and share one record.

use std::collections::BTreeMap;
use tsr_state::Digest;

pub fn step_key(
    kind: &str,
    version: u32,
    config: &serde_json::Value,
    inputs: &BTreeMap<String, Digest>,
) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(b"tsr-step-key-v1\0");
    h.update(kind.as_bytes());
    h.update(b"\0");
    h.update(&version.to_be_bytes());
    // serde_json's Map is a BTreeMap (no `preserve_order` feature), so this is canonical.
    let cfg = serde_json::to_string(config).expect("config JSON");
    h.update(&(cfg.len() as u64).to_be_bytes());
    h.update(cfg.as_bytes());
    for (name, d) in inputs {
        h.update(&(name.len() as u64).to_be_bytes());
        h.update(name.as_bytes());
        h.update(&d.0);
    }
    Digest::from(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_depends_on_everything() {
        let cfg = serde_json::json!({"b": 1, "a": [1, 2]});
        let mut inputs = BTreeMap::new();
        inputs.insert("x".to_string(), Digest::of(b"x"));
        let k = step_key("gen", 1, &cfg, &inputs);
        assert_eq!(
            k,
            step_key("gen", 1, &serde_json::json!({"a": [1, 2], "b": 1}), &inputs)
        );
        assert_ne!(k, step_key("gen", 2, &cfg, &inputs));
        assert_ne!(k, step_key("judge", 1, &cfg, &inputs));
        assert_ne!(
            k,
            step_key("gen", 1, &serde_json::json!({"b": 2, "a": [1, 2]}), &inputs)
        );
        let mut other = inputs.clone();
        other.insert("x".to_string(), Digest::of(b"y"));
        assert_ne!(k, step_key("gen", 1, &cfg, &other));
    }
}
