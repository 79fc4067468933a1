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
    // cudarc may panic when a CUDA library is missing: turn that into an error.
    let r = std::panic::catch_unwind(|| Device::new_cuda(ordinal));
    match r {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => Err(ModelError::Device {
            spec: spec.to_string(),
            msg: e.to_string(),
        }),
        Err(_) => Err(ModelError::Device {
            spec: spec.to_string(),
            msg: "CUDA initialisation panicked (is libcuda / libcublas on LD_LIBRARY_PATH?)".into(),
        }),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(spec: &str, _ordinal: usize) -> Result<Device, ModelError> {
    Err(ModelError::Device {
        spec: spec.to_string(),
        msg: "this binary was built without CUDA support (rebuild with --features cuda)".into(),
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
            .contains("without CUDA"));
    }
}
