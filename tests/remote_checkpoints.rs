//! A whole step's checkpoint files through a real S3-compatible server (s3s-fs on loopback): a
//! file large enough for a multipart upload goes up under the job's folder and comes back
//! verified, under a remote prefix and step folder as long as the executors use. (s3s-fs keeps
//! each object's name, base64-encoded, in one file name, so long names fail there first.)
//! Its own test binary: it sets the S3 environment of this process.

mod common;

use common::s3::S3Server;
use tsr_engine::job::{JobFiles, SavedCheckpoint};

#[test]
fn large_checkpoint_files_go_through_the_remote_and_come_back_verified() {
    let dir = tempfile::tempdir().unwrap();
    let server = S3Server::start(&dir.path().join("s3"));
    for (k, v) in server.env() {
        // SAFETY: this test binary has this one test; nothing else reads the environment.
        unsafe { std::env::set_var(k, v) };
    }
    let url = tsr_state::remote::RemoteUrl::parse(&server.url("team-a/runs/x")).unwrap();
    let remote = std::sync::Arc::new(tsr_state::remote::Remote::open(&url).unwrap());
    let files = tsr_engine::exchange::RemoteFiles {
        remote,
        rel: format!("{}/{}", "ab".repeat(32), "cd".repeat(8)),
    };
    // 40 MiB: above the 32 MiB a single put takes.
    let big: Vec<u8> = (0..40u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let src = dir.path().join("weights");
    std::fs::write(&src, &big).unwrap();
    let d = tsr_state::Digest::of(&big);
    files.put_checkpoint_file(&d, &src).unwrap();
    assert!(!src.exists(), "the local copy goes once it is uploaded");
    let cp = SavedCheckpoint {
        seq: 3,
        cursor: b"{\"step\":3}".to_vec(),
        files: [("weights".to_string(), d)].into(),
        by: "812_0.1".into(),
    };
    files.record_checkpoint(&cp).unwrap();
    assert_eq!(files.checkpoint().unwrap(), Some(cp));
    let blobs = tsr_state::BlobStore::open(dir.path().join("b"), dir.path().join("t")).unwrap();
    let back = files.take_checkpoint_file(&d, &blobs).unwrap();
    assert_eq!(tsr_state::hash_file(&back).unwrap(), d);
    // A file the record names that is gone says how to start over.
    files.drop_checkpoint_file(&d).unwrap();
    let e = files
        .take_checkpoint_file(
            &d,
            &tsr_state::BlobStore::open(dir.path().join("b2"), dir.path().join("t")).unwrap(),
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ckpt.json") && e.contains("start the step over"),
        "{e}"
    );
}
