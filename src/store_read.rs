//! Opening a store for the commands that read or continue what it holds (inspection, resume,
//! fork). The queries over a run's records are in `tsr_workflows::lineage`.

use anyhow::Context;
use tsr_state::Store;

/// Open an existing store (inspection commands, resume, fork).
pub fn open_store(dir: &std::path::Path) -> anyhow::Result<std::sync::Arc<Store>> {
    Ok(std::sync::Arc::new(
        Store::open_existing(dir)
            .with_context(|| format!("opening the store {}", dir.display()))?,
    ))
}
