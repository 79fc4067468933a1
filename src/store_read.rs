//! Opening a store for the commands that read or continue what it holds (inspection, resume,
//! fork), and the defaults a run settles on from what the store records of it. The queries over a run's records are in `tsr_workflows::lineage`.

use anyhow::Context;
use tsr_state::Store;

/// Open an existing store (inspection commands, resume, fork).
pub fn open_store(dir: &std::path::Path) -> anyhow::Result<std::sync::Arc<Store>> {
    Ok(std::sync::Arc::new(
        Store::open_existing(dir)
            .with_context(|| format!("opening the store {}", dir.display()))?,
    ))
}

/// The config TOML the store records for the run `name`, or for a fork the run it branches
/// from (whose settings it inherits): what [`tsr_workflows::Config::settle_defaults`] keeps.
/// `None` for a new run.
pub(crate) fn recorded(
    store: &Store,
    name: &str,
    forked_from: Option<&str>,
) -> anyhow::Result<Option<String>> {
    let rec = match store.get_run(name)? {
        Some(r) => Some(r),
        None => match forked_from {
            Some(parent) => store.get_run(parent)?,
            None => None,
        },
    };
    Ok(rec.map(|r| r.config_toml))
}

/// [`tsr_workflows::Config::settle_defaults`] with what the store in `store_dir` records for
/// the run (or the run a fork branches from), where there is a store; as a new run otherwise.
pub(crate) fn settle_from_store_dir(
    config: &mut tsr_workflows::Config,
    store_dir: &std::path::Path,
    forked_from: Option<&str>,
) -> anyhow::Result<()> {
    let recorded = if store_dir.join("db").exists() {
        let store = open_store(store_dir)?;
        recorded(&store, &config.name, forked_from)?
    } else {
        None
    };
    config.settle_defaults(recorded.as_deref());
    Ok(())
}
