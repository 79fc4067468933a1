//! The run config: TOML, validated before anything runs. Unknown keys and bad values are errors
//! that name the key (and the line, from the TOML parser).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tsr_engine::testkit::ToySpec;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
    #[error("--set `{0}`: expected KEY=VALUE, e.g. --set dpo.beta=0.2")]
    BadSet(String),
}

fn default_seed() -> u64 {
    1
}
fn default_device() -> String {
    "cpu".into()
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Run name: the same name continues the same run.
    pub name: String,
    /// toy | (language-model workflows as they land)
    pub workflow: String,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// cpu | cuda:N
    #[serde(default = "default_device")]
    pub device: String,
    /// Store folder (default `.tsr` beside where tsr runs; `--store` overrides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<PathBuf>,
    #[serde(default)]
    pub toy: ToySpec,
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            source: e,
        })?;
        let mut c = Config::from_str_at(&text, path)?;
        // Relative paths in a config are relative to the config file.
        if let Some(dir) = path.parent() {
            if let Some(s) = &c.store {
                if s.is_relative() && !dir.as_os_str().is_empty() {
                    c.store = Some(dir.join(s));
                }
            }
        }
        Ok(c)
    }

    pub fn from_str_at(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim().to_string(),
        })?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: &str| {
            Err(ConfigError::Invalid {
                key: key.into(),
                reason: reason.into(),
            })
        };
        if let Err(e) = tsr_state::validate_name(&self.name) {
            return bad("name", &e.to_string());
        }
        if !crate::WORKFLOWS.contains(&self.workflow.as_str()) {
            return bad(
                "workflow",
                &format!("unknown workflow `{}`; choose one of {:?}", self.workflow, crate::WORKFLOWS),
            );
        }
        if self.device != "cpu" && !self.device.starts_with("cuda") {
            return bad("device", "use `cpu` or `cuda:N`");
        }
        if self.workflow == "toy" {
            let t = &self.toy;
            if t.iterations == 0 {
                return bad("toy.iterations", "must be at least 1");
            }
            if t.items == 0 {
                return bad("toy.items", "must be at least 1");
            }
            if t.checkpoint_every == 0 {
                return bad("toy.checkpoint_every", "must be at least 1");
            }
        }
        Ok(())
    }

    pub fn to_value(&self) -> toml::Value {
        toml::Value::try_from(self).expect("config serializes to TOML")
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("config serializes to TOML")
    }

    /// Flattened `dotted.key -> value` of everything that affects results.
    pub fn definition(&self) -> BTreeMap<String, String> {
        crate::definition_of(&self.to_value())
    }
}

pub(crate) fn flatten(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// Apply `key=value` (dotted key; value parsed as a TOML literal, else taken as a string) to a
/// config, and validate the result.
pub fn apply_set(config: &Config, set: &str) -> Result<Config, ConfigError> {
    let (key, raw) = set
        .split_once('=')
        .ok_or_else(|| ConfigError::BadSet(set.to_string()))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(ConfigError::BadSet(set.to_string()));
    }
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let mut root = config.to_value();
    let parts: Vec<&str> = key.split('.').collect();
    let mut cur = &mut root;
    for (i, part) in parts.iter().enumerate() {
        let table = cur.as_table_mut().ok_or_else(|| ConfigError::Invalid {
            key: key.into(),
            reason: format!("`{}` is not a table", parts[..i].join(".")),
        })?;
        if i + 1 == parts.len() {
            table.insert(part.to_string(), value.clone());
            break;
        }
        cur = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
    }
    let text = toml::to_string(&root).expect("TOML");
    Config::from_str_at(&text, Path::new(&format!("--set {key}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::from_str_at(s, Path::new("test.toml"))
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = parse("name = \"a\"\nworkflow = \"toy\"\nbogus = 1\n").unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = parse("name = \"a\"\nworkflow = \"toy\"\n[toy]\niterations = \"two\"\n").unwrap_err().to_string();
        assert!(e.contains("iterations"), "{e}");
        let e = parse("name = \"a\"\nworkflow = \"toy\"\n[toy]\niterations = 0\nitems = 1\ntrain_steps = 1\ncheckpoint_every = 1\nwork_ms = 0\nseed = 1\n").unwrap_err().to_string();
        assert!(e.contains("toy.iterations"), "{e}");
        let e = parse("name = \"a b\"\nworkflow = \"toy\"\n").unwrap_err().to_string();
        assert!(e.contains("`name`"), "{e}");
        let e = parse("name = \"a\"\nworkflow = \"nope\"\n").unwrap_err().to_string();
        assert!(e.contains("unknown workflow"), "{e}");
    }

    #[test]
    fn set_changes_one_field_and_revalidates() {
        let c = parse("name = \"a\"\nworkflow = \"toy\"\n").unwrap();
        let d = apply_set(&c, "toy.train_steps=9").unwrap();
        assert_eq!(d.toy.train_steps, 9);
        assert_eq!(d.toy.items, c.toy.items);
        let d = apply_set(&d, "name=b").unwrap();
        assert_eq!(d.name, "b");
        assert!(apply_set(&c, "toy.items=0").is_err());
        assert!(apply_set(&c, "toy.nope=1").is_err());
        assert!(apply_set(&c, "noequals").is_err());
        let def = d.definition();
        assert_eq!(def["toy.train_steps"], "9");
        assert!(!def.contains_key("device"));
    }
}
