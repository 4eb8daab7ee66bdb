//! Helpers shared by the engine's integration tests.

#![allow(dead_code)] // each test binary uses some of these

use std::process::Command;

/// Runs the tests of this test binary whose names contain `filter` again in a child
/// process with `LORAFLEET_BLAS=avx2`, so that the AVX2 kernels (and the fused ops on
/// them) pass the same checks as the AVX-512 ones the default run uses. Returns without
/// running anything where the default run already is the AVX2 path (a CPU without
/// AVX-512), where the CPU has no AVX2, or inside such a child (or any run with
/// `LORAFLEET_BLAS` set). Fails unless at least `at_least` tests ran and all passed.
pub fn rerun_on_avx2(filter: &str, at_least: usize) {
    use lorafleet_engine::kernels::Isa;
    if std::env::var_os("LORAFLEET_BLAS").is_some() || !Isa::Avx512.supported() || !Isa::Avx2.supported() {
        eprintln!("not rerun: LORAFLEET_BLAS is set or the default run already uses AVX2 (or no AVX2)");
        return;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new(exe).args([filter, "--nocapture"]).env("LORAFLEET_BLAS", "avx2").output().expect("rerun the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tests matching {filter:?} failed with LORAFLEET_BLAS=avx2:\n{stdout}\n{stderr}");
    let passed = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("test result: ok. "))
        .filter_map(|l| l.split(' ').next()?.parse::<usize>().ok())
        .sum::<usize>();
    assert!(passed >= at_least, "only {passed} tests matching {filter:?} ran with LORAFLEET_BLAS=avx2 (expected {at_least}):\n{stdout}");
}

/// Whether this run puts its f32 CPU products on the built-in kernels (and so the fused
/// LoRA and attention ops are the ones under test), and checks that a run asked for the
/// AVX2 kernels got them.
pub fn expect_fused() -> bool {
    let blas = std::env::var("LORAFLEET_BLAS").ok();
    if blas.as_deref() == Some("avx2") && lorafleet_engine::kernels::Isa::Avx2.supported() {
        assert_eq!(lorafleet_engine::blas::backend_name(), "avx2 (built-in)");
    }
    lorafleet_engine::kernels::available() && matches!(blas.as_deref(), None | Some("avx512") | Some("avx2"))
}
