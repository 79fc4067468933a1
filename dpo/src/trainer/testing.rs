//! The fixtures every trainer test uses (the trainer's own tests and the store's checkpoint
//! tests): five short text pairs, a trainer config that exercises warmup, cosine decay,
//! clipping, accumulation and shuffling over three epochs, and the pairs with the reference
//! log-probabilities of a second tiny model.

use super::{encode_text_pairs, reference_logps, TextPair, TrainPair, TrainerConfig};
use crate::{AdamWConfig, Decay, DpoLossConfig, DpoLossKind, LrSchedule};
use std::path::Path;
use tsr_model::testing::tiny_model;
use tsr_model::LanguageModel;

pub const TEXTS: [(&str, &str, &str); 5] = [
    (
        "What is the capital of France?",
        "The capital of France is Paris.",
        "Berlin.",
    ),
    (
        "What is two plus two?",
        "The answer is four.",
        "The sea is blue.",
    ),
    (
        "Write a short poem about the sea.",
        "The sea is blue and the sky is wide.",
        "No.",
    ),
    (
        "Please explain why the sky is blue.",
        "Sunlight is scattered by the air.",
        "Rust is fast.",
    ),
    (
        "Hello!",
        "Hello! How can I help you today?",
        "the quick brown fox",
    ),
];

pub fn text_pairs() -> Vec<TextPair> {
    TEXTS
        .iter()
        .map(|(p, c, r)| TextPair {
            prompt: p.to_string(),
            chosen: c.to_string(),
            rejected: r.to_string(),
        })
        .collect()
}

pub fn config() -> TrainerConfig {
    TrainerConfig {
        loss: DpoLossConfig {
            beta: 0.1,
            kind: DpoLossKind::Sigmoid,
            length_normalize: false,
        },
        schedule: LrSchedule {
            peak_lr: 1e-2,
            warmup_steps: 2,
            total_steps: 9,
            decay: Decay::Cosine,
            min_lr_ratio: 0.1,
        },
        optimizer: AdamWConfig::default(),
        epochs: 3,
        max_steps: None,
        micro_batch: 1,
        accum_steps: 2,
        max_grad_norm: Some(0.5),
        seed: 7,
        shuffle: true,
    }
}

/// The text pairs encoded for `model`, with the reference log-probabilities of a second tiny
/// model (written under `scratch`) that differs from the policy.
pub fn pairs_for(model: &LanguageModel, scratch: &Path) -> Vec<TrainPair> {
    let mut pairs = encode_text_pairs(model, &text_pairs()).unwrap();
    let reference = tiny_model(scratch, 99);
    reference_logps(&reference, &mut pairs, 2).unwrap();
    pairs
}
