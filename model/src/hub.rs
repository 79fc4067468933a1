//! Resolving `Org/Name` against the local Hugging Face cache layout
//! (`<hub>/models--Org--Name/snapshots/<rev>/`, `<rev>` read from `refs/main`). No network.

use std::path::{Path, PathBuf};

use super::ModelError;

/// The hub cache folder: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub` (`$XDG_CACHE_HOME` honoured).
pub fn hub_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("huggingface").join("hub")
}

/// The snapshot directory of hub id `Org/Name` in the local cache, or
/// [`ModelError::HubNotFound`] naming the path that was looked up.
pub fn resolve_hub_id(id: &str) -> Result<PathBuf, ModelError> {
    resolve_in(&hub_cache_dir(), id)
}

pub(crate) fn resolve_in(hub: &Path, id: &str) -> Result<PathBuf, ModelError> {
    let repo = hub.join(format!("models--{}", id.replace('/', "--")));
    let snapshots = repo.join("snapshots");
    let not_found = |looked_up: PathBuf| ModelError::HubNotFound {
        id: id.to_string(),
        looked_up,
    };
    let refs_main = repo.join("refs").join("main");
    if let Ok(rev) = std::fs::read_to_string(&refs_main) {
        let dir = snapshots.join(rev.trim());
        if dir.join("config.json").is_file() {
            return Ok(dir);
        }
        return Err(not_found(dir.join("config.json")));
    }
    // No refs/main (e.g. a cache filled by a pinned revision): accept a single snapshot.
    let mut snaps: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .map_err(|_| not_found(refs_main.clone()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("config.json").is_file())
        .collect();
    snaps.sort();
    match snaps.len() {
        1 => Ok(snaps.remove(0)),
        _ => Err(not_found(refs_main)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_refs_main_and_names_missing_path() {
        let tmp = tempfile::tempdir().unwrap();
        let e = resolve_in(tmp.path(), "Org/Name").unwrap_err().to_string();
        assert!(
            e.contains("models--Org--Name") && e.contains("Org/Name"),
            "{e}"
        );
        let repo = tmp.path().join("models--Org--Name");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        std::fs::write(repo.join("snapshots/abc123/config.json"), "{}").unwrap();
        assert_eq!(
            resolve_in(tmp.path(), "Org/Name").unwrap(),
            repo.join("snapshots/abc123")
        );
    }
}
