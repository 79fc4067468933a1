//! Process-level CPU tuning: the glibc allocator and candle's thread count.
//!
//! glibc allocator tuning: candle allocates and frees large buffers on every op, and glibc's
//! default thresholds return them to the kernel each time (mmap/munmap + page faults). Raising
//! the thresholds keeps them in the heap; CANDLE.md measured a DPO step going from ~7 s to ~3.7 s.

/// Raises glibc's `M_MMAP_THRESHOLD` (to its maximum, 32 MiB on 64-bit glibc: larger values are
/// rejected) and `M_TRIM_THRESHOLD` (1 GiB) so big tensors are reused instead of being mapped and
/// unmapped on every operation. Call once at start-up. Returns whether glibc accepted both
/// settings; a no-op returning `false` on non-glibc targets.
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        let mmap_ok = libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1;
        let trim_ok = libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30) == 1;
        mmap_ok && trim_ok
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// [`tune_allocator`], and pins candle's thread count: without `RAYON_NUM_THREADS`, candle
/// recomputes the number of physical cores (parsing `/proc/cpuinfo`) on every matmul; on the
/// 2-core test machine that took batch-16 decoding of SmolLM2-135M from 126 to 158 tok/s.
/// Sets `RAYON_NUM_THREADS` to candle's own count (physical cores) unless already set.
/// Call once at the very start of `main`, before other threads exist (it sets an environment
/// variable). Returns what [`tune_allocator`] returns.
pub fn tune_runtime() -> bool {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    tune_allocator()
}

/// The number of threads candle's CPU kernels use (`RAYON_NUM_THREADS`, else the physical
/// cores), as benchmarks report it.
pub fn cpu_threads() -> usize {
    candle_core::utils::get_num_threads()
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_accepts_the_settings() {
        assert!(super::tune_allocator());
    }
}
