//! A real S3-compatible server on loopback for the tests: `s3s-fs` (crates.io), which
//! `scripts/test.sh` installs (the tests install nothing). It keeps objects as files under a
//! folder, checks SigV4 signatures and honours conditional writes.

#![allow(dead_code)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "AKIATSRTESTKEY0001";
pub const SECRET_KEY: &str = "tsr-test-secret-Zq8xV3";
pub const BUCKET: &str = "tsr-test";

fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("TSR_S3S_FS") {
        return PathBuf::from(p);
    }
    // Where scripts/test.sh installs it.
    let cached = super::cache_dir().join("s3s-fs/bin/s3s-fs");
    if cached.exists() {
        return cached;
    }
    panic!(
        "the S3 server for these tests (s3s-fs) is missing: run the tests with scripts/test.sh, which installs it"
    );
}

pub struct S3Server {
    child: Option<Child>,
    pub port: u16,
    /// The folder the server keeps objects in (`<root>/<bucket>/<key>`).
    pub root: PathBuf,
}

impl S3Server {
    pub fn start(root: &Path) -> S3Server {
        std::fs::create_dir_all(root.join(BUCKET)).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = S3Server {
            child: None,
            port,
            root: root.to_path_buf(),
        };
        s.restart();
        s
    }

    /// Start (again, on the same port and folder).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::File::create(self.root.with_extension("log")).unwrap();
        let child = Command::new(binary())
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&self.root)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "s3s-fs did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    /// The environment a client needs (as a user would set it).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_ENDPOINT", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }

    /// Where the server keeps an object.
    pub fn object_path(&self, prefix: &str, rel: &str) -> PathBuf {
        self.root.join(BUCKET).join(prefix).join(rel)
    }

    /// `tsr ARGS --store STORE` with this server's environment.
    pub fn tsr(&self, args: &[&str], store: &Path) -> Output {
        self.command(args, store).output().unwrap()
    }

    pub fn command(&self, args: &[&str], store: &Path) -> Command {
        let mut c = Command::new(super::tsr_exe());
        c.args(args).arg("--store").arg(store);
        for (k, v) in self.env() {
            c.env(k, v);
        }
        c
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}
