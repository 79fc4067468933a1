//! A DPO trainer's checkpoint written into the store's blob writers (as the `dpo` step does):
//! the same bytes as the checkpoint files, nothing installed when the sink fails, and a restore
//! from the blobs that continues exactly.

use std::io::Write;
use tsr_dpo::trainer::{CheckpointPart, DpoTrainer, TrainPair, TrainerError};
use tsr_model::testing::tiny_model;
use tsr_model::LanguageModel;

use tsr_dpo::trainer::testing::config;

fn pairs_for(model: &LanguageModel) -> Vec<TrainPair> {
    let dir = tempfile::tempdir().unwrap();
    tsr_dpo::trainer::testing::pairs_for(model, dir.path())
}

#[test]
fn checkpoint_into_blob_writers_equals_the_files_and_a_failing_sink_installs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir.path().join("m"), 5);
    let mut t = DpoTrainer::new(&model, pairs_for(&model), config()).unwrap();
    t.step().unwrap();
    t.step().unwrap();
    let files = t.write_checkpoint(&dir.path().join("ck")).unwrap();
    let blobs =
        tsr_state::BlobStore::open(dir.path().join("blobs"), dir.path().join("tmp")).unwrap();
    let (w, s) = t
        .write_checkpoint_with(
            |_| blobs.writer().map_err(TrainerError::sink),
            |_, w| w.finish().map_err(TrainerError::sink),
        )
        .unwrap();
    assert_eq!(
        blobs.read(&w).unwrap(),
        std::fs::read(&files.weights).unwrap()
    );
    assert_eq!(
        blobs.read(&s).unwrap(),
        std::fs::read(&files.trainer).unwrap()
    );
    assert_eq!(
        w.to_hex(),
        model.digest().unwrap(),
        "the weights blob is the model's identity"
    );

    // A blob writer that fails part-way through the trainer state: an error, and no blob or
    // temporary file is left (the weights blob is the one already there from above).
    struct Failing(tsr_state::BlobWriter, usize);
    impl Write for Failing {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.1 < buf.len() {
                return Err(std::io::Error::other("disk full"));
            }
            self.1 -= buf.len();
            self.0.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.0.flush()
        }
    }
    let before = blobs.list().unwrap();
    let err = t
        .write_checkpoint_with(
            |p| {
                let budget = match p {
                    CheckpointPart::Weights => usize::MAX,
                    CheckpointPart::Trainer => 100_000,
                };
                Ok::<_, TrainerError>(Failing(blobs.writer().map_err(TrainerError::sink)?, budget))
            },
            |_, w| w.0.finish().map_err(TrainerError::sink),
        )
        .unwrap_err();
    let chain = tsr_state::error_chain(&err);
    assert!(chain.contains("disk full"), "{chain}");
    assert!(chain.contains("trainer.ckpt"), "names the part: {chain}");
    assert_eq!(blobs.list().unwrap(), before);
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );

    // Restoring from the blobs continues exactly like restoring from the files.
    let m2 = tiny_model(&dir.path().join("m2"), 5);
    let mut t2 = DpoTrainer::new(&m2, pairs_for(&m2), config()).unwrap();
    let state = blobs.read(&s).unwrap();
    t2.restore(&blobs.verified_path(&w).unwrap(), &state, None)
        .unwrap();
    t.step().unwrap();
    t2.step().unwrap();
    assert_eq!(m2.digest().unwrap(), model.digest().unwrap());
}
