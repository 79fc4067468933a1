//! Prints the kind of CPU this machine makes the tests' fixtures of digests for
//! (`tsr_model::testing::fixture_kind_to_make`): what `scripts/old_store_golden.sh` writes for.
//! A machine whose gemm is no known kind's gets a new name, said on the standard error.
fn main() {
    let kind = tsr_model::testing::fixture_kind_to_make();
    if !tsr_model::testing::fixture_kind_is_known() {
        eprintln!(
            "fixture_kind: this CPU's gemm probe {} is no known kind's: its sets go to `{kind}`; \
             add the probe and that name to FIXTURE_KINDS in model/src/testing.rs",
            tsr_model::testing::gemm_probe()
        );
    }
    println!("{kind}");
}
