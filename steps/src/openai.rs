//! A client of OpenAI-compatible chat completion servers (the OpenAI API, vLLM, SGLang,
//! llama.cpp's server, a gateway), for the evaluation's API judge.
//!
//! One call is one request, retried while the server cannot answer it now: 429 and 5xx
//! (honouring `Retry-After`), a timeout, a connection that fails. A 400-class refusal of that
//! request's content (400, 413, 422) is an answer for that request only; 401, 403 and 404
//! mean no request can succeed. The key is read from the environment once, sent only in the
//! `Authorization` header, and never put into a message.

use std::time::Duration;

/// Where requests go and how patiently; none of it changes what a request asks.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiSettings {
    /// `http(s)://host[:port][/path]`, up to (not including) `/chat/completions`.
    pub base_url: String,
    /// The environment variable holding the key (`None`: no `Authorization` header, as a
    /// local server needs).
    pub api_key_env: Option<String>,
    pub max_concurrency: usize,
    pub timeout_s: f64,
    /// Tries after the first for one request that the server cannot answer now.
    pub max_retries: u32,
}

/// Why the settings cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SettingsError {
    #[error("`{0}` is not an http(s) URL; give the server's base, such as https://api.openai.com/v1 or http://127.0.0.1:8000/v1")]
    NotHttp(String),
    #[error("the base URL carries credentials (user:password@); put the key in the environment variable named by api_key_env instead")]
    Credentials,
    #[error("the environment variable `{0}` (api_key_env) is not set; export the key in it, or leave api_key_env out for a server without keys")]
    NoKey(String),
    #[error("max_concurrency must be at least 1")]
    Concurrency,
    #[error("timeout_s must be a positive number of seconds")]
    Timeout,
}

impl ApiSettings {
    /// Checks the settings and reads the key (before any work).
    pub fn check(&self) -> Result<Option<String>, SettingsError> {
        self.check_form()?;
        self.key()
    }

    /// Checks the settings without the environment.
    pub fn check_form(&self) -> Result<(), SettingsError> {
        let url = url::Url::parse(&self.base_url)
            .map_err(|_| SettingsError::NotHttp(self.base_url.clone()))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(SettingsError::NotHttp(self.base_url.clone()));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(SettingsError::Credentials);
        }
        if self.max_concurrency == 0 {
            return Err(SettingsError::Concurrency);
        }
        if !(self.timeout_s > 0.0 && self.timeout_s.is_finite()) {
            return Err(SettingsError::Timeout);
        }
        Ok(())
    }

    /// The key from the environment variable `api_key_env` names (`None` without one).
    pub fn key(&self) -> Result<Option<String>, SettingsError> {
        match &self.api_key_env {
            None => Ok(None),
            Some(var) => match std::env::var(var) {
                Ok(k) if !k.is_empty() => Ok(Some(k)),
                _ => Err(SettingsError::NoKey(var.clone())),
            },
        }
    }

    /// The chat completions endpoint.
    pub fn endpoint(&self) -> String {
        format!("{}/chat/completions", self.base_url.trim_end_matches('/'))
    }
}

/// What the server said to one request.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    /// A 2xx answer: its body as received.
    Answered { status: u16, body: String },
    /// The request itself was refused (400, 413, 422: a content filter, a context too long):
    /// the server's message.
    Refused { status: u16, message: String },
}

/// Why a request has no reply.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// 401, 403, 404: the key, the permissions or the model or URL is wrong; no request can
    /// succeed.
    #[error(
        "the server answered {status} ({message}); check the key, the model name and base_url"
    )]
    Fatal { status: u16, message: String },
    /// The server could not answer within the retries.
    #[error("the server did not answer after {tries} tries ({last}); start it or wait, then run again (max_retries, timeout_s)")]
    Unavailable { tries: u32, last: String },
}

/// One request's outcome, with how many tries it took.
pub struct Called {
    pub reply: Reply,
    pub tries: u32,
}

/// The server's own message in an error body (`{"error": {"message": ...}}`), else the body's
/// start.
pub fn error_message(body: &str) -> String {
    let from_json = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            let e = v.get("error")?;
            e.get("message")
                .and_then(|m| m.as_str())
                .map(str::to_string)
                .or_else(|| e.as_str().map(str::to_string))
        });
    let text = from_json.unwrap_or_else(|| body.trim().to_string());
    let mut out: String = text.chars().take(500).collect();
    if text.chars().count() > 500 {
        out.push('…');
    }
    if out.is_empty() {
        "no message".into()
    } else {
        out
    }
}

/// How long to wait before try `tries + 1`: the server's `Retry-After` (seconds) when it gave
/// one (at most 10 minutes), else 1, 2, 4, ... seconds up to 60.
pub fn wait_before_retry(tries: u32, retry_after: Option<&str>) -> Duration {
    if let Some(s) = retry_after.and_then(|v| v.trim().parse::<f64>().ok()) {
        if s.is_finite() && s >= 0.0 {
            return Duration::from_secs_f64(s.min(600.0));
        }
    }
    Duration::from_secs(1u64 << tries.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

/// A client for one server.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    endpoint: String,
    key: Option<String>,
    max_retries: u32,
}

impl Client {
    /// A client with checked settings and the key they name.
    pub fn new(settings: &ApiSettings, key: Option<String>) -> Result<Client, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs_f64(settings.timeout_s))
            .build()?;
        Ok(Client {
            http,
            endpoint: settings.endpoint(),
            key,
            max_retries: settings.max_retries,
        })
    }

    /// Sends `body` (a JSON request) until the server answers it or refuses it, or gives up.
    /// `on_retry(tries, why, wait)` hears of each retry.
    pub async fn call(
        &self,
        body: &[u8],
        on_retry: &(dyn Fn(u32, &str, Duration) + Send + Sync),
    ) -> Result<Called, CallError> {
        let mut tries = 0u32;
        loop {
            tries += 1;
            let mut req = self
                .http
                .post(&self.endpoint)
                .header("content-type", "application/json")
                .body(body.to_vec());
            if let Some(k) = &self.key {
                req = req.header("authorization", format!("Bearer {k}"));
            }
            let (why, retry_after) = match req.send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let retry_after = resp
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    let text = match resp.text().await {
                        Ok(t) => t,
                        Err(e) => {
                            let why = format!("reading the answer: {}", without_url(&e));
                            self.retry_or_give_up(tries, &why, None, on_retry).await?;
                            continue;
                        }
                    };
                    match status {
                        200..=299 => {
                            return Ok(Called {
                                reply: Reply::Answered { status, body: text },
                                tries,
                            })
                        }
                        400 | 413 | 422 => {
                            return Ok(Called {
                                reply: Reply::Refused {
                                    status,
                                    message: error_message(&text),
                                },
                                tries,
                            })
                        }
                        401 | 403 | 404 => {
                            return Err(CallError::Fatal {
                                status,
                                message: error_message(&text),
                            })
                        }
                        _ => (format!("{status}: {}", error_message(&text)), retry_after),
                    }
                }
                Err(e) if e.is_timeout() => ("no answer within timeout_s".to_string(), None),
                Err(e) => (format!("the request failed: {}", without_url(&e)), None),
            };
            self.retry_or_give_up(tries, &why, retry_after.as_deref(), on_retry)
                .await?;
        }
    }

    async fn retry_or_give_up(
        &self,
        tries: u32,
        why: &str,
        retry_after: Option<&str>,
        on_retry: &(dyn Fn(u32, &str, Duration) + Send + Sync),
    ) -> Result<(), CallError> {
        if tries > self.max_retries {
            return Err(CallError::Unavailable {
                tries,
                last: why.to_string(),
            });
        }
        let wait = wait_before_retry(tries, retry_after);
        on_retry(tries, why, wait);
        tokio::time::sleep(wait).await;
        Ok(())
    }
}

/// A request error's own words and causes, without the URL (which holds no key, but the
/// message is shorter without it).
fn without_url(e: &reqwest::Error) -> String {
    let mut parts = vec![];
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if !parts.iter().any(|p: &String| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str) -> ApiSettings {
        ApiSettings {
            base_url: url.into(),
            api_key_env: None,
            max_concurrency: 4,
            timeout_s: 30.0,
            max_retries: 3,
        }
    }

    #[test]
    fn settings_are_refused_before_any_work() {
        assert_eq!(settings("http://127.0.0.1:8000/v1").check(), Ok(None));
        assert_eq!(
            settings("http://127.0.0.1:8000/v1/").endpoint(),
            "http://127.0.0.1:8000/v1/chat/completions"
        );
        assert!(matches!(
            settings("127.0.0.1:8000").check(),
            Err(SettingsError::NotHttp(_))
        ));
        assert_eq!(
            settings("https://me:secret@api.example.com/v1").check(),
            Err(SettingsError::Credentials)
        );
        let mut s = settings("https://api.example.com/v1");
        s.api_key_env = Some("TSR_TEST_SURELY_UNSET_KEY".into());
        assert_eq!(
            s.check(),
            Err(SettingsError::NoKey("TSR_TEST_SURELY_UNSET_KEY".into()))
        );
        s.api_key_env = None;
        s.max_concurrency = 0;
        assert_eq!(s.check(), Err(SettingsError::Concurrency));
    }

    #[test]
    fn retry_waits_follow_the_server_then_double() {
        assert_eq!(wait_before_retry(1, Some("7")), Duration::from_secs(7));
        assert_eq!(
            wait_before_retry(1, Some("0.5")),
            Duration::from_millis(500)
        );
        assert_eq!(
            wait_before_retry(1, Some("86400")),
            Duration::from_secs(600)
        );
        // An HTTP date is not read: the doubling applies.
        assert_eq!(
            wait_before_retry(3, Some("Wed, 21 Oct 2015 07:28:00 GMT")),
            Duration::from_secs(4)
        );
        assert_eq!(wait_before_retry(1, None), Duration::from_secs(1));
        assert_eq!(wait_before_retry(2, None), Duration::from_secs(2));
        assert_eq!(wait_before_retry(30, None), Duration::from_secs(60));
    }

    #[test]
    fn error_messages_come_from_the_body() {
        assert_eq!(
            error_message(r#"{"error": {"message": "context too long", "type": "x"}}"#),
            "context too long"
        );
        assert_eq!(error_message(r#"{"error": "bad model"}"#), "bad model");
        assert_eq!(error_message("  plain text "), "plain text");
        assert_eq!(error_message(""), "no message");
        assert_eq!(error_message(&"x".repeat(600)).chars().count(), 501);
    }
}
