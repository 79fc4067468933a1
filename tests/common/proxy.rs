//! A small HTTP proxy of the tests' own between tsr and a real server: it forwards each request
//! whole to the server (one request per connection, `Connection: close`), counts what it
//! forwarded per request body, and can answer in the server's place with a fault: a status
//! with headers and a body, a body that is not JSON, the server's answer without its
//! log-probabilities, or no answer at all for a while. The server itself stays real.

#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with this status, headers and body.
    Status {
        code: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// 200 with a body that is not JSON.
    Garbage,
    /// The server's answer with `logprobs` removed.
    NoLogprobs,
    /// Hold the connection this long without answering, then close it.
    Stall(Duration),
}

#[derive(Default)]
struct State {
    faults: VecDeque<Fault>,
    /// Every request answered 503 while set.
    down: bool,
    /// Requests that reached the proxy, by blake3 of their body.
    asked: BTreeMap<String, u32>,
    /// Requests the server answered with 200 (paid), by body.
    paid: BTreeMap<String, u32>,
    /// Every `Authorization` header seen.
    authorizations: Vec<String>,
    /// Every request as it reached the proxy: (ms since the Unix epoch, body).
    log: Vec<(u64, String)>,
    /// Added before forwarding each request (a server far away).
    latency: Duration,
    /// Each request's (arrived, answered) in ms since the Unix epoch.
    spans: Vec<(u64, u64)>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

pub struct Proxy {
    pub port: u16,
    state: Arc<Mutex<State>>,
}

/// An HTTP message: the first line, headers (lower-case names), body.
type Message = (String, Vec<(String, String)>, Vec<u8>);

/// One HTTP message read from a stream.
fn read_message(r: &mut BufReader<TcpStream>) -> Option<Message> {
    let mut first = String::new();
    r.read_line(&mut first).ok()?;
    if first.trim().is_empty() {
        return None;
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if let Some(n) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(n, 0);
        r.read_exact(&mut body).ok()?;
    } else if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).ok()?;
            let n = usize::from_str_radix(size.trim().split(';').next()?, 16).ok()?;
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else if !first.starts_with("POST") && !first.starts_with("GET") {
        r.read_to_end(&mut body).ok()?;
    }
    Some((first.trim_end().to_string(), headers, body))
}

fn respond(s: &mut TcpStream, code: u16, headers: &[(String, String)], body: &[u8]) {
    let mut head = format!(
        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
    let _ = s.flush();
}

/// Forwards `path` with `body` to the server; its status and body.
fn forward(upstream: u16, path: &str, body: &[u8]) -> Option<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", upstream)).ok()?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{upstream}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let mut r = BufReader::new(s);
    let (first, _, body) = read_message(&mut r)?;
    let code = first.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body))
}

impl Proxy {
    /// A proxy on a free loopback port in front of the server on `upstream`.
    pub fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || handle(conn, upstream, &st));
            }
        });
        Proxy { port, state }
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    /// Answers the next request in the server's place with `f` (faults are used in order).
    pub fn push(&self, f: Fault) {
        self.state.lock().unwrap().faults.push_back(f);
    }

    pub fn set_down(&self, down: bool) {
        self.state.lock().unwrap().down = down;
    }

    /// Requests the server answered (paid for), by body.
    pub fn paid(&self) -> BTreeMap<String, u32> {
        self.state.lock().unwrap().paid.clone()
    }

    pub fn paid_total(&self) -> u32 {
        self.state.lock().unwrap().paid.values().sum()
    }

    /// Requests that reached the proxy, in all.
    pub fn asked_total(&self) -> u32 {
        self.state.lock().unwrap().asked.values().sum()
    }

    /// Wait this long before forwarding each request from now on.
    pub fn set_latency(&self, d: Duration) {
        self.state.lock().unwrap().latency = d;
    }

    /// Each request's (arrived, answered), ms since the Unix epoch.
    pub fn spans(&self) -> Vec<(u64, u64)> {
        self.state.lock().unwrap().spans.clone()
    }

    /// Every request that reached the proxy: when (ms since the Unix epoch) and its body.
    pub fn log(&self) -> Vec<(u64, String)> {
        self.state.lock().unwrap().log.clone()
    }

    pub fn authorizations(&self) -> Vec<String> {
        self.state.lock().unwrap().authorizations.clone()
    }
}

fn handle(conn: TcpStream, upstream: u16, st: &Mutex<State>) {
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    let Some((first, headers, body)) = read_message(&mut r) else {
        return;
    };
    let path = first.split_whitespace().nth(1).unwrap_or("/").to_string();
    let digest = blake3::hash(&body).to_hex().to_string();
    let arrived = now_ms();
    let fault = {
        let mut s = st.lock().unwrap();
        *s.asked.entry(digest.clone()).or_default() += 1;
        s.log
            .push((now_ms(), String::from_utf8_lossy(&body).into_owned()));
        if let Some((_, a)) = headers.iter().find(|(k, _)| k == "authorization") {
            s.authorizations.push(a.clone());
        }
        if s.down {
            Some(Fault::Status {
                code: 503,
                headers: vec![],
                body: r#"{"error": {"message": "the test proxy says the server is down"}}"#.into(),
            })
        } else {
            s.faults.pop_front()
        }
    };
    match fault {
        Some(Fault::Status {
            code,
            headers,
            body,
        }) => respond(&mut w, code, &headers, body.as_bytes()),
        Some(Fault::Garbage) => respond(&mut w, 200, &[], b"{\"choices\": ["),
        Some(Fault::Stall(d)) => std::thread::sleep(d),
        Some(Fault::NoLogprobs) | None => {
            let strip = matches!(fault, Some(Fault::NoLogprobs));
            let latency = st.lock().unwrap().latency;
            std::thread::sleep(latency);
            match forward(upstream, &path, &body) {
                Some((code, mut answer)) => {
                    if code == 200 {
                        *st.lock().unwrap().paid.entry(digest).or_default() += 1;
                        if strip {
                            let mut v: serde_json::Value = serde_json::from_slice(&answer).unwrap();
                            if let Some(c) = v["choices"][0].as_object_mut() {
                                c.remove("logprobs");
                            }
                            answer = serde_json::to_vec(&v).unwrap();
                        }
                    }
                    respond(&mut w, code, &[], &answer);
                }
                None => respond(
                    &mut w,
                    502,
                    &[],
                    br#"{"error": {"message": "the test proxy could not reach the server"}}"#,
                ),
            }
        }
    }
    st.lock().unwrap().spans.push((arrived, now_ms()));
}
