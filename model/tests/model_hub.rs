//! Hub ids resolve through the local Hugging Face cache layout. Its own test binary because it
//! sets `HF_HUB_CACHE` for the process.

use candle_core::{DType, Device};
use tsr_model::testing::write_tiny_hf_model;
use tsr_model::{LanguageModel, ModelError, ModelSource};

#[test]
fn hub_id_loads_from_cache_or_names_the_missing_path() {
    let tmp = tempfile::tempdir().unwrap();
    std::env::set_var("HF_HUB_CACHE", tmp.path());
    let src = ModelSource::parse("TinyOrg/Tiny-Model").unwrap();
    let e = LanguageModel::load(&src, &Device::Cpu, DType::F32).unwrap_err();
    assert!(matches!(&e, ModelError::HubNotFound { .. }), "{e}");
    assert!(
        e.to_string().contains(
            &tmp.path()
                .join("models--TinyOrg--Tiny-Model")
                .display()
                .to_string()
        ),
        "{e}"
    );

    let repo = tmp.path().join("models--TinyOrg--Tiny-Model");
    write_tiny_hf_model(&repo.join("snapshots/0123abcd"), 1);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    let m = LanguageModel::load(&src, &Device::Cpu, DType::F32).unwrap();
    let direct = LanguageModel::load(
        &ModelSource::HfDir(repo.join("snapshots/0123abcd")),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    assert_eq!(m.digest().unwrap(), direct.digest().unwrap());
}
