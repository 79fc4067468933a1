//! What a step hands over as one output: bytes, a file of its scratch folder, or a blob it
//! already wrote into the store.

use std::path::PathBuf;
use tsr_state::Digest;

pub enum OutputData {
    Bytes(Vec<u8>),
    /// A file in the step's scratch folder; moved into the store on commit.
    File(PathBuf),
    /// A blob already in the store (e.g. written through [`crate::ItemJournal::blob_writer`]).
    /// Only its presence is checked on commit; its content is verified whenever it is read.
    Blob(Digest),
}
