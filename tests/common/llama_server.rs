//! A real OpenAI-compatible server on loopback for the API judge's tests: llama-cpp-python's
//! (`python -m llama_cpp.server`, pinned in `scripts/requirements-llama-server.txt`) serving the
//! default model. `scripts/test.sh` installs it into a cached virtual environment; the tests
//! install nothing. Each test starts its own and stops it by PID.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The server's Python: `$TSR_LLAMA_SERVER_PYTHON`, else the cached virtual environment.
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("TSR_LLAMA_SERVER_PYTHON") {
        return PathBuf::from(p);
    }
    let cached = super::cache_dir().join("llama-cpp-server/bin/python");
    if cached.exists() {
        return cached;
    }
    panic!(
        "the OpenAI-compatible server for these tests (llama-cpp-python) is missing: run the tests with scripts/test.sh, which installs it"
    );
}

pub struct LlamaServer {
    child: Child,
    pub port: u16,
}

/// `GET path` on loopback `port`: the status and body, or `None` when nothing answers.
pub fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

impl LlamaServer {
    /// Starts the server on a free port with the default model, its log in `dir`, and waits
    /// until it lists its model.
    pub fn start(dir: &Path) -> LlamaServer {
        std::fs::create_dir_all(dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(dir.join("llama-server.log")).unwrap();
        let child = Command::new(python())
            .args(["-m", "llama_cpp.server", "--model"])
            .arg(tsr_model::testing::default_model_path())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--model_alias",
                "smollm2",
                "--n_ctx",
                "4096",
                "--n_threads",
                "1",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut server = LlamaServer { child, port };
        let t0 = Instant::now();
        loop {
            if let Some((200, _)) = get(port, "/v1/models") {
                break;
            }
            if let Ok(Some(st)) = server.child.try_wait() {
                panic!(
                    "the llama-cpp-python server ended ({st}): {}",
                    std::fs::read_to_string(dir.join("llama-server.log")).unwrap_or_default()
                );
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "the llama-cpp-python server did not answer within 120 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server.port = port;
        server
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
