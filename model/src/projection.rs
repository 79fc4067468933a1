//! The seven linear projections of a decoder block, the one list that the forward pass, LoRA
//! adapters (targets, PEFT module names) and the memory plan share.

use super::config::Config;

/// One projection of a block, in the order the blocks use (and LoRA dropout seeds count).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    /// Every projection, in block order.
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// Its module name, as PEFT's `target_modules` and `[dpo.lora] targets` give it.
    pub fn name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// The block module that holds it.
    pub fn module(self) -> &'static str {
        match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
            Proj::Gate | Proj::Up | Proj::Down => "mlp",
        }
    }

    /// Its weight's name in layer `layer` (`model.layers.0.self_attn.q_proj.weight`).
    pub fn weight_name(self, layer: usize) -> String {
        format!(
            "model.layers.{layer}.{}.{}.weight",
            self.module(),
            self.name()
        )
    }

    /// Its bias's name in layer `layer`.
    pub fn bias_name(self, layer: usize) -> String {
        format!(
            "model.layers.{layer}.{}.{}.bias",
            self.module(),
            self.name()
        )
    }

    /// Whether a model of this config gives it a bias (Qwen2's q, k and v).
    pub fn has_bias(self, cfg: &Config) -> bool {
        match self {
            Proj::Q | Proj::K | Proj::V => cfg.qkv_bias,
            Proj::O => cfg.o_bias,
            Proj::Gate | Proj::Up | Proj::Down => false,
        }
    }

    /// `(in, out)` features in a model of this config.
    pub fn shape(self, cfg: &Config) -> (usize, usize) {
        let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
        let q = cfg.num_attention_heads * cfg.head_dim;
        let kv = cfg.num_key_value_heads * cfg.head_dim;
        match self {
            Proj::Q => (h, q),
            Proj::K | Proj::V => (h, kv),
            Proj::O => (q, h),
            Proj::Gate | Proj::Up => (h, f),
            Proj::Down => (f, h),
        }
    }

    /// The projection named `name` (`q_proj`, ...).
    pub fn named(name: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Every name, comma-separated (for messages).
    pub fn names() -> String {
        Proj::ALL.map(Proj::name).join(", ")
    }
}
