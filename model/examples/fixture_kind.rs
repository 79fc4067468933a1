//! Prints this machine's kind of CPU for the tests' fixtures of digests
//! (`tsr_model::testing::fixture_kind`): what `scripts/old_store_golden.sh` writes for.
fn main() {
    println!("{}", tsr_model::testing::fixture_kind());
}
