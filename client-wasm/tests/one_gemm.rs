//! The tab's matrix kernels use simd128 only because client-wasm turns on
//! gemm-common's `wasm-simd128-enable` (client-wasm/Cargo.toml); that
//! reaches burn-flex's gemm only while both use the same gemm-common.
//! A burn upgrade to another gemm would leave two in the lock and the tab
//! back on gemm's scalar kernels, at a third of its speed, silently.

#[test]
fn the_lock_holds_one_gemm_common_so_the_simd128_feature_reaches_burns_gemm() {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock"))
        .expect("the workspace's Cargo.lock");
    let versions: Vec<&str> = lock
        .split("[[package]]")
        .filter(|package| package.contains("\nname = \"gemm-common\"\n"))
        .filter_map(|package| package.lines().find_map(|l| l.strip_prefix("version = ")))
        .collect();
    assert_eq!(
        versions.len(),
        1,
        "gemm-common versions in Cargo.lock: {versions:?}"
    );
}
