//! Device selection from a string ("cpu", "cuda", "cuda:N").

use candle_core::Device;

use super::ModelError;

/// Parses `"cpu"`, `"cuda"` or `"cuda:N"`. CUDA needs the `cuda` cargo feature; without it the
/// error says so instead of silently falling back to the CPU.
pub fn parse_device(spec: &str) -> Result<Device, ModelError> {
    let s = spec.trim().to_ascii_lowercase();
    if s.is_empty() || s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = if s == "cuda" {
        Some(0)
    } else {
        s.strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
    };
    let Some(ordinal) = ordinal else {
        return Err(ModelError::Device {
            spec: spec.to_string(),
            msg: "expected \"cpu\", \"cuda\" or \"cuda:N\"".into(),
        });
    };
    cuda_device(spec, ordinal)
}

#[cfg(feature = "cuda")]
fn cuda_device(spec: &str, ordinal: usize) -> Result<Device, ModelError> {
    // cudarc (built with `dynamic-loading`, see scripts/build-cuda.sh) dlopens libcuda, libcublas,
    // libcublasLt and libcurand on first use and panics when one is missing. Catch that and turn
    // it into an error naming the library; the default hook would print a "panicked at" trace
    // first, so it is swapped out for the call (the hook is process-wide, but device set-up
    // happens once, before any worker thread).
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(|| Device::new_cuda(ordinal));
    std::panic::set_hook(hook);
    match r {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => Err(ModelError::Device {
            spec: spec.to_string(),
            msg: format!(
                "cannot open CUDA device {ordinal}: {}",
                super::error::candle_text(e)
            ),
        }),
        Err(payload) => {
            let why = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            // cudarc appends every file name it tried (dozens); the library's name comes first.
            let why = why.split(" - searched for").next().unwrap_or(&why).trim();
            Err(ModelError::Device {
                spec: spec.to_string(),
                msg: format!(
                    "CUDA is not usable on this machine: {why} (needs an NVIDIA driver (libcuda.so.1) \
                     and the CUDA 13 libraries libcublas, libcublasLt and libcurand; on the GPU \
                     machine set LD_LIBRARY_PATH=/usr/local/cuda/lib64)"
                ),
            })
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(spec: &str, _ordinal: usize) -> Result<Device, ModelError> {
    Err(ModelError::Device {
        spec: spec.to_string(),
        msg: "this tsr was built without CUDA; build with scripts/build-cuda.sh".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_garbage() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("tpu:0").is_err());
        #[cfg(not(feature = "cuda"))]
        assert!(parse_device("cuda:0")
            .unwrap_err()
            .to_string()
            .contains("built without CUDA; build with scripts/build-cuda.sh"));
    }
}
