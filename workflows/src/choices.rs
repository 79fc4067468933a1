//! The config's enumerated values: each a Rust enum written and read as the same TOML string as
//! before (so config files and stored definitions stay byte-identical), with tsr's own message
//! for a value that is not one of them: the key, the value and the choices.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// One enum per config key: its variants with their TOML names, and the reason an unknown
/// value is refused (a function of the value).
macro_rules! choice {
    (
        $(#[$meta:meta])*
        $name:ident, key = $key:literal,
        { $( $(#[$vmeta:meta])* $var:ident = $text:literal ),+ $(,)? },
        refuse = $refuse:expr
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $var ),+
        }

        impl $name {
            /// The config key this value is given under.
            pub const KEY: &'static str = $key;
            /// Every value, in the order the documentation lists them.
            pub const ALL: &'static [$name] = &[$($name::$var),+];
            /// The names a config file uses.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            /// The name a config file uses.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$var => $text ),+
                }
            }
        }

        impl FromStr for $name {
            type Err = String;
            /// The value named `s`, or why `s` is refused (without the key).
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $( $text => Ok($name::$var), )+
                    other => Err(($refuse)(other)),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse()
                    .map_err(|reason: String| D::Error::custom(refusal($key, &reason)))
            }
        }
    };
}

/// The message for a refused value: the same words `Config::validate` uses for other keys.
fn refusal(key: &str, reason: &str) -> String {
    format!("config key `{key}`: {reason}")
}

choice! {
    /// What a run trains (or that it only evaluates, or exercises the engine).
    Workflow, key = "workflow",
    {
        /// A model-free workflow that exercises the engine.
        Toy = "toy",
        /// The paper's Algorithm 1: anchored rejection, then future-guided chosen.
        Temporal = "temporal",
        /// Best and worst of Mi's own responses (Yuan et al. 2024).
        SelfRewarding = "self-rewarding",
        /// Anchored rejection only.
        PastOnly = "past-only",
        /// Future-guided chosen only.
        FutureOnly = "future-only",
        /// Self-Rewarding plus judge training (Wu et al. 2024).
        MetaRewarding = "meta-rewarding",
        /// Temporal selection in both phases plus judge training.
        TemporalMeta = "temporal-meta",
        /// Evaluate one model against a baseline (`tsr eval`).
        Eval = "eval",
    },
    refuse = |other: &str| format!(
        "unknown workflow `{other}`; choose one of {:?}",
        Workflow::NAMES
    )
}

impl Workflow {
    /// A language-model training workflow (not `toy`, not `eval`).
    pub fn trains(self) -> bool {
        !matches!(self, Workflow::Toy | Workflow::Eval)
    }

    /// Also trains the judge on its own judgements (Meta-Rewarding).
    pub fn is_meta(self) -> bool {
        matches!(self, Workflow::MetaRewarding | Workflow::TemporalMeta)
    }

    /// Phase 1 takes rejected responses from the past anchor when they score lower.
    pub fn uses_anchor(self) -> bool {
        matches!(
            self,
            Workflow::Temporal | Workflow::PastOnly | Workflow::TemporalMeta
        )
    }

    /// Trains a look-ahead model Mf whose responses can become chosen in phase 2.
    pub fn uses_future(self) -> bool {
        matches!(
            self,
            Workflow::Temporal | Workflow::FutureOnly | Workflow::TemporalMeta
        )
    }
}

choice! {
    /// The past model whose worst response can become rejected (anchored rejection).
    Anchor, key = "anchor",
    {
        /// M0, the initial model (the paper's choice).
        Initial = "initial",
        /// Mi-1, the model one iteration back (M0 in the first iteration).
        Previous = "previous",
    },
    refuse = |_: &str| "use `initial` (M0) or `previous` (Mi-1)".to_string()
}

choice! {
    /// The reference model of DPO's KL term.
    Reference, key = "dpo.reference",
    {
        /// Mi, the model being trained (the paper's choice).
        Current = "current",
        /// M0, the initial model.
        Initial = "initial",
    },
    refuse = |_: &str| "use `current` (Mi) or `initial` (M0)".to_string()
}

choice! {
    /// What DPO trains.
    Adapter, key = "dpo.adapter",
    {
        /// Every weight.
        Full = "full",
        /// A low-rank adapter over the frozen base.
        Lora = "lora",
    },
    refuse = |other: &str| format!(
        "`{other}`: use `full` (every weight trains) or `lora` (a low-rank adapter)"
    )
}

choice! {
    /// Precision of the frozen base weights.
    Dtype, key = "model.dtype",
    {
        F32 = "f32",
        Bf16 = "bf16",
        F16 = "f16",
    },
    refuse = |other: &str| format!("`{other}`: use `f32`, `bf16` or `f16`")
}

choice! {
    /// Where the batches of item steps (generation, judging, scoring) are computed.
    Executor, key = "executor.kind",
    {
        /// In this process (the default).
        Local = "local",
        /// In worker processes on this machine.
        Processes = "processes",
        /// In Slurm array jobs.
        Slurm = "slurm",
    },
    refuse = |other: &str| format!(
        "`{other}`: use `local` (this process), `processes` (worker processes on this machine) or `slurm` (Slurm array jobs)"
    )
}

choice! {
    /// How workers get a step's inputs and hand back its results.
    Share, key = "executor.share",
    {
        /// Through a folder the workers see at the same path (the store's `work/`).
        Filesystem = "filesystem",
        /// Through the store's remote copy: inputs from its blobs (cached per node), results
        /// as objects under its `work/`.
        Remote = "remote",
    },
    refuse = |other: &str| format!(
        "`{other}`: use `filesystem` (the store on a filesystem the workers share) or `remote` (through the store's remote copy)"
    )
}

impl Dtype {
    /// Bytes per weight.
    pub fn bytes(self) -> u64 {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
        }
    }

    /// Half precision (bf16 or f16).
    pub fn is_half(self) -> bool {
        self != Dtype::F32
    }
}

/// `remote_sync`: the store's [`tsr_state::SyncMode`], read with the key in its message.
pub mod remote_sync {
    use super::*;
    use tsr_state::SyncMode;

    pub fn serialize<S: Serializer>(v: &Option<SyncMode>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(m) => s.serialize_str(&m.to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SyncMode>, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map(Some)
            .map_err(|reason: String| D::Error::custom(refusal("remote_sync", &reason)))
    }
}

/// Enums of other crates read with the same wording: the key, the value and the choices.
fn foreign<'de, D, T>(d: D, key: &str, choices: &str) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    use serde::de::IntoDeserializer;
    let s = String::deserialize(d)?;
    let de: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
        s.as_str().into_deserializer();
    T::deserialize(de).map_err(|_| D::Error::custom(refusal(key, &format!("`{s}`: use {choices}"))))
}

/// `judge.mode`.
pub(crate) fn judge_mode<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<tsr_steps::kinds::judge::JudgeMode, D::Error> {
    foreign(
        d,
        "judge.mode",
        "`text` (write a judgement, parse `Score: N`) or `logprob` (the expected score)",
    )
}

/// `eval.judge.mode`.
pub(crate) fn eval_judge_mode<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<tsr_steps::kinds::judge::JudgeMode, D::Error> {
    foreign(
        d,
        "eval.judge.mode",
        "`text` (parse `Better: A|B`) or `logprob` (compare the probabilities of `A` and `B`)",
    )
}

/// `prompt_attention`.
pub(crate) fn prompt_attention<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<tsr_steps::lm::PromptAttention>, D::Error> {
    foreign(
        d,
        "prompt_attention",
        "`fused` (tsr's causal kernel for a prompt's attention, a new run's default) or `batched` (gemm's products)",
    )
    .map(Some)
}

/// `generate.weights`.
pub(crate) fn generate_weights<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<tsr_steps::lm::Weights>, D::Error> {
    foreign(d, "generate.weights", WEIGHTS).map(Some)
}

/// `judge.weights`.
pub(crate) fn judge_weights<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<tsr_steps::lm::Weights>, D::Error> {
    foreign(d, "judge.weights", WEIGHTS).map(Some)
}

/// The choices of a step's `weights`.
const WEIGHTS: &str = "`f32`, `bf16` or `f16` (the precision of the weights while the step runs)";

/// `dpo.loss`.
pub(crate) fn dpo_loss<'de, D: Deserializer<'de>>(d: D) -> Result<tsr_dpo::DpoLossKind, D::Error> {
    foreign(d, "dpo.loss", "`sigmoid` (DPO) or `ipo` (IPO)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_reads_back_as_its_value() {
        fn check<T: FromStr<Err = String> + Copy + PartialEq + fmt::Debug + fmt::Display>(
            all: &[T],
            names: &[&str],
        ) {
            assert_eq!(all.len(), names.len());
            for (v, n) in all.iter().zip(names) {
                assert_eq!(v.to_string(), *n);
                assert_eq!(n.parse::<T>().unwrap(), *v);
            }
        }
        check(Workflow::ALL, Workflow::NAMES);
        check(Anchor::ALL, Anchor::NAMES);
        check(Reference::ALL, Reference::NAMES);
        check(Adapter::ALL, Adapter::NAMES);
        check(Dtype::ALL, Dtype::NAMES);
        check(Executor::ALL, Executor::NAMES);
        check(Share::ALL, Share::NAMES);
    }

    #[test]
    fn a_refused_value_names_the_key_and_the_choices() {
        #[derive(Deserialize, Debug)]
        #[allow(dead_code)]
        struct T {
            anchor: Anchor,
        }
        let e = toml::from_str::<T>("anchor = \"past\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("config key `anchor`: use `initial` (M0) or `previous` (Mi-1)"),
            "{e}"
        );
        let e = "nope".parse::<Workflow>().unwrap_err();
        assert!(
            e.starts_with("unknown workflow `nope`; choose one of"),
            "{e}"
        );
        assert!(e.contains("\"temporal-meta\""), "{e}");
    }
}
