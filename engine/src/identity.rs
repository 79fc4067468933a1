//! Who computes a batch: this process's host, thread count, CPU, device and build, kept with
//! each committed batch (see [`tsr_state::WorkerRecord`]) so that lineage can say where an
//! item was made. A step's outputs never contain it.

use std::sync::OnceLock;
use tsr_state::WorkerRecord;

/// The executable this process runs, even when its file was replaced or removed since it
/// started (a rebuild while a run goes on): workers are started from it.
pub const SELF_EXE: &str = "/proc/self/exe";

/// This program's identity: the blake3 of the executable it runs (hex), which a worker
/// compares with the driver's (a different build could compute other bytes). Read once.
pub fn build_id() -> Result<String, std::io::Error> {
    static ID: OnceLock<Result<String, (std::io::ErrorKind, String)>> = OnceLock::new();
    let hash = || -> Result<String, std::io::Error> {
        let mut h = blake3::Hasher::new();
        h.update_reader(std::fs::File::open(SELF_EXE)?)?;
        Ok(h.finalize().to_hex().to_string())
    };
    ID.get_or_init(|| hash().map_err(|e| (e.kind(), e.to_string())))
        .clone()
        .map_err(|(kind, text)| std::io::Error::new(kind, text))
}

/// The machine's host name.
pub fn host() -> String {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown-host".into())
    })
    .clone()
}

/// The CPU's model, the vector features that choose kernels and the L1 data cache's geometry
/// (`AMD EPYC 9R14 (avx512f avx2 fma f16c; L1d 32K 8-way)`). gemm sizes the slices of a
/// product's inner dimension it adds at a time from the L1d's size and ways, so two CPUs with
/// the same features but another L1d can add a long product (a judge prompt's attention over
/// its tokens) in another order.
pub fn cpu() -> String {
    static CPU: OnceLock<String> = OnceLock::new();
    CPU.get_or_init(|| {
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            info.lines()
                .find(|l| l.split(':').next().map(str::trim) == Some(name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        };
        let model = field("model name")
            .or_else(|| field("CPU part"))
            .unwrap_or_else(|| std::env::consts::ARCH.to_string());
        let flags = field("flags")
            .or_else(|| field("Features"))
            .unwrap_or_default();
        let have: Vec<&str> = [
            "avx512f",
            "avx512_bf16",
            "avx2",
            "fma",
            "f16c",
            "asimd",
            "sve",
        ]
        .into_iter()
        .filter(|f| flags.split_whitespace().any(|x| x == *f))
        .collect();
        let mut about = have.join(" ");
        if let Some(l1d) = l1d_geometry() {
            if !about.is_empty() {
                about.push_str("; ");
            }
            about.push_str(&l1d);
        }
        if about.is_empty() {
            model
        } else {
            format!("{model} ({about})")
        }
    })
    .clone()
}

/// The first CPU's level-1 data cache as Linux describes it (`L1d 48K 12-way`), where it does.
fn l1d_geometry() -> Option<String> {
    let caches = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    let mut dirs: Vec<_> = caches.filter_map(|e| e.ok().map(|e| e.path())).collect();
    dirs.sort();
    let read = |d: &std::path::Path, f: &str| {
        std::fs::read_to_string(d.join(f))
            .ok()
            .map(|v| v.trim().to_string())
    };
    dirs.iter().find_map(|d| {
        (read(d, "level")? == "1" && read(d, "type")? == "Data").then_some(())?;
        Some(format!(
            "L1d {} {}-way",
            read(d, "size")?,
            read(d, "ways_of_associativity")?
        ))
    })
}

/// The CPU threads this process's kernels use: `RAYON_NUM_THREADS` (tsr sets it at start),
/// else the cores it may run on.
pub fn threads() -> u32 {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|n: &u32| *n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1)
        })
}

/// This process as the computer of a batch: `executor` (`local`, `processes`, `slurm`), the
/// executor's name for it, its attempt and its device (with the GPUs it was given, if any).
pub fn here(executor: &str, job: Option<String>, attempt: u32, device: &str) -> WorkerRecord {
    let device = match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(v) if device != "cpu" && !v.is_empty() => format!("{device} (CUDA_VISIBLE_DEVICES={v})"),
        _ => device.to_string(),
    };
    WorkerRecord {
        executor: executor.to_string(),
        host: host(),
        pid: std::process::id(),
        job,
        attempt,
        threads: threads(),
        device,
        cpu: cpu(),
        build: build_id()
            .map(|b| b[..16].to_string())
            .unwrap_or_else(|_| "unknown".into()),
        last: 0,
        finished_ms: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_described() {
        let w = here("local", None, 1, "cpu");
        assert!(!w.host.is_empty());
        assert_eq!(w.pid, std::process::id());
        assert!(w.threads >= 1);
        assert_eq!(w.build.len(), 16, "{}", w.build);
        assert_eq!(build_id().unwrap(), build_id().unwrap());
        let text = w.describe();
        assert!(text.starts_with("the driver (attempt 1) on "), "{text}");
        assert!(text.contains(&w.cpu), "{text}");
        // Where Linux describes the caches, the L1d's geometry (it can change gemm's sums).
        if l1d_geometry().is_some() {
            assert!(
                w.cpu.contains("; L1d ") || w.cpu.contains("(L1d "),
                "{}",
                w.cpu
            );
            assert!(w.cpu.ends_with("-way)"), "{}", w.cpu);
        }
    }
}
