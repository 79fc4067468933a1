//! I/O faults injected under the store (failed write, short write, fsync error, disk full,
//! failed rename, failed sled commit) at many points of a toy run: the run stops with a clear
//! error, the committed state stays intact (`verify` passes), and the next run continues to the
//! same results as an uninterrupted run.

mod common;

use common::*;
use std::sync::Arc;
use tsr_engine::testkit::{toy_dag, ToySpec};
use tsr_engine::{open_run, Driver, StopFlag};
use tsr_state::faults::{FailNth, FaultOp};
use tsr_state::Store;

fn spec() -> ToySpec {
    ToySpec {
        iterations: 2,
        items: 9,
        train_steps: 6,
        checkpoint_every: 2,
        work_ms: 0,
        seed: 11,
    }
}

#[test]
fn every_kind_of_io_fault_fails_cleanly_and_the_next_run_continues() {
    let dir = tempfile::tempdir().unwrap();
    let reference = {
        let store = Arc::new(Store::open(&dir.path().join("ref")).unwrap());
        run_toy(&store, "f", &spec());
        outputs(&store, "f")
    };
    let cases = [
        (FaultOp::BlobWrite, libc::EIO, "Input/output error"),
        (FaultOp::BlobWrite, libc::ENOSPC, "No space left on device"),
        (FaultOp::BlobSync, libc::EIO, "Input/output error"),
        (FaultOp::BlobRename, libc::ENOSPC, "No space left on device"),
        (FaultOp::DirSync, libc::EIO, "Input/output error"),
        (FaultOp::DbCommit, libc::ENOSPC, "No space left on device"),
    ];
    let mut injected = 0;
    for (op, errno, message) in cases {
        for nth in [0u64, 1, 3, 7, 15, 40] {
            let store_dir = dir.path().join(format!("{op:?}-{errno}-{nth}"));
            let fault = Arc::new(FailNth::new(op, nth, errno));
            let err = {
                let store =
                    Arc::new(Store::open_with_faults(&store_dir, Some(fault.clone())).unwrap());
                let dag = Arc::new(toy_dag(&spec()).unwrap());
                match open_run(&store, &run_spec("f", &spec()), &dag) {
                    Err(e) => Some(tsr_state::error_chain(&e)),
                    Ok(_) => Driver::new(store, dag, "f", quiet(StopFlag::new()))
                        .run()
                        .err()
                        .map(|e| tsr_state::error_chain(&e)),
                }
            };
            if fault.seen() <= nth {
                // The run never reached this many operations of this kind.
                assert!(
                    err.is_none(),
                    "{op:?}#{nth}: failed without an injected fault: {err:?}"
                );
                continue;
            }
            injected += 1;
            let err =
                err.unwrap_or_else(|| panic!("{op:?}#{nth}: the injected fault was swallowed"));
            assert!(err.contains(message), "{op:?}#{nth}: unclear error: {err}");
            // Committed state is intact and the next run (no faults) finishes identically.
            let store = Arc::new(Store::open(&store_dir).unwrap());
            let report = tsr_state::verify(&store).unwrap();
            assert!(report.ok(), "{op:?}#{nth}: {:?}", report.problems);
            run_toy(&store, "f", &spec());
            assert_eq!(
                outputs(&store, "f"),
                reference,
                "{op:?}#{nth}: results differ after the fault"
            );
        }
    }
    assert!(injected >= 20, "only {injected} faults landed");
}
