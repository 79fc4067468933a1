//! Process-level CPU tuning: the glibc allocator and candle's thread count.
//!
//! glibc allocator tuning: candle allocates and frees large buffers on every op, and glibc's
//! default thresholds return them to the kernel each time, so the next op faults in pages the
//! kernel must zero first (about 0.5 GB/s on the test VM). Keeping freed memory in the heap
//! made a DPO step of SmolLM2-135M go from ~7 s to ~3.7 s (CANDLE.md), and turning off the
//! last two ways memory still went back per step from ~3.4 s to ~2.9 s (BENCHMARKS.md).

/// Keeps freed memory in the process for reuse: no buffer is mapped on its own (`M_MMAP_MAX`
/// 0; glibc still maps when the heap cannot grow), and the heap's top is never trimmed
/// (`M_TRIM_THRESHOLD` -1). Before, each buffer over 32 MiB (an embedding-sized gradient) was
/// mapped and unmapped every step, and a heap top over 1 GiB was returned whenever a free
/// happened to leave one, which depended on timing (1.8-2.4 GB of fresh pages a step in
/// runs under a call-graph profiler, 0.1-0.2 GB in plain runs).
///
/// The same for other threads' heaps (`M_TOP_PAD` 64 MiB): a thread other than the main one
/// allocates from heaps of at most 64 MiB, and glibc unmapped such a heap whenever it became
/// wholly free, whatever the trim threshold. Generation runs on a pool worker, so a prompt's
/// prefill faulted in fresh pages for its large attention buffers in every layer: 1.1-1.8
/// million page faults in a 4 x 512-token prefill benchmark, against 0.56 million with the
/// heaps kept, and the prefill took about 1.2x less time (BENCHMARKS.md). A pad as large as
/// such a heap keeps each one.
///
/// Memory is returned by [`release_memory`], which long phases call when they end. Call once
/// at start-up. Returns whether glibc accepted the settings; a no-op returning `false` on
/// non-glibc targets.
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        let mmap_ok = libc::mallopt(libc::M_MMAP_MAX, 0) == 1;
        let trim_ok = libc::mallopt(libc::M_TRIM_THRESHOLD, -1) == 1;
        let pad_ok = libc::mallopt(libc::M_TOP_PAD, THREAD_HEAP_BYTES) == 1;
        mmap_ok && trim_ok && pad_ok
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// The most a heap of a thread other than the main one holds in glibc on 64-bit targets
/// (`HEAP_MAX_SIZE`, twice the largest default mmap threshold of 32 MiB).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const THREAD_HEAP_BYTES: libc::c_int = 64 << 20;

/// Returns the heap's free pages to the kernel (`malloc_trim`): [`tune_allocator`] keeps them
/// for reuse, so a phase that allocated a lot (a DPO training) calls this when it ends, and
/// the process does not hold its peak through the phases after it. A no-op off glibc.
pub fn release_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// [`tune_allocator`], and pins candle's thread count: without `RAYON_NUM_THREADS`, candle
/// recomputes the number of physical cores (parsing `/proc/cpuinfo`) on every matmul; on the
/// 2-core test machine that took batch-16 decoding of SmolLM2-135M from 126 to 158 tok/s.
/// Sets `RAYON_NUM_THREADS` to candle's own count (physical cores) unless already set.
///
/// Also keeps candle's elementwise ops on the calling thread (`CANDLE_NUM_THREADS=1` unless
/// already set). candle runs an elementwise op of 64K elements or more on a second pool of its
/// own, whose workers then spin (25,000 iterations) before they sleep; the products (gemm, on
/// the rayon pool) run on every core meanwhile, so each spin takes a core from them. In a LoRA
/// DPO step on 2 cores that spinning was 10.7% of the samples, and without the second pool
/// the policy step took 1.06-1.18x less time. The values are the same: each element is
/// computed alone either way.
///
/// Call once at the very start of `main`, before other threads exist (it sets environment
/// variables). Returns what [`tune_allocator`] returns.
pub fn tune_runtime() -> bool {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
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

    /// A thread that holds two 40 MB buffers at once (more than one heap of 64 MiB), fills and
    /// frees them, five times, faults their pages in once: its second heap stays mapped once
    /// wholly free. Without the pad, every later round faulted the second buffer's 10,240
    /// pages (4 KiB) in again.
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn another_thread_keeps_its_heap_once_freed() {
        assert!(super::tune_allocator());
        let faults = std::thread::spawn(|| {
            let minflt = || unsafe {
                let mut u: libc::rusage = std::mem::zeroed();
                assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, &mut u), 0);
                u.ru_minflt
            };
            let mut per_round = Vec::new();
            for _ in 0..5 {
                let before = minflt();
                let a = std::hint::black_box(vec![1u8; 40 << 20]);
                let b = std::hint::black_box(vec![1u8; 40 << 20]);
                drop(b);
                drop(a);
                per_round.push(minflt() - before);
            }
            per_round
        })
        .join()
        .unwrap();
        let pages: i64 = (40 << 20) / unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        assert!(
            faults[0] >= pages,
            "the first round faults its pages in: {faults:?}"
        );
        assert!(
            faults[1..].iter().sum::<i64>() < pages / 4,
            "later rounds reuse them: {faults:?}"
        );
    }
}
