//! Wall-clock time as records store it: milliseconds since the Unix epoch. Only for
//! timestamps people read and for how long a remote has been behind; never for seeds or keys.

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
