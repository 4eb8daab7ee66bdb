//! Helpers shared by the engine's integration tests.

#![allow(dead_code)] // each test binary uses some of these

use std::process::Command;

/// The variables a rerun sets; a process with any of them set is such a child and
/// reruns nothing itself.
const RERUN_VARS: [&str; 3] = ["LORAFLEET_BLAS", "LORAFLEET_OPS", "LORAFLEET_CPU_ACTIVATIONS"];

/// Runs the tests of this test binary whose names contain `filter` again in a child
/// process with `LORAFLEET_BLAS=avx2`, so that the AVX2 kernels (and the fused ops on
/// them) pass the same checks as the AVX-512 ones the default run uses. Returns without
/// running anything where the default run already is the AVX2 path (a CPU without
/// AVX-512), where the CPU has no AVX2, or inside a rerun child (or any run with
/// `LORAFLEET_BLAS` or `LORAFLEET_OPS` set). Fails unless at least `at_least` tests ran
/// and all passed.
pub fn rerun_on_avx2(filter: &str, at_least: usize) {
    use lorafleet_engine::kernels::Isa;
    if !Isa::Avx512.supported() || !Isa::Avx2.supported() {
        eprintln!("not rerun: the default run already uses AVX2 (or there is no AVX2)");
        return;
    }
    rerun(filter, ("LORAFLEET_BLAS", "avx2"), at_least);
}

/// Runs the tests of this test binary whose names contain `filter` again in a child
/// process with `LORAFLEET_OPS=portable`: on the portable ops (candle's device-generic
/// tensor ops, NF4 dequantized by them), the path CUDA devices take, so that it passes
/// the same checks on a machine without a GPU. Fails unless at least `at_least` tests
/// ran and all passed; returns at once inside a rerun child.
pub fn rerun_portable(filter: &str, at_least: usize) {
    rerun(filter, ("LORAFLEET_OPS", "portable"), at_least);
}

/// Runs the tests of this test binary whose names contain `filter` again in a child
/// process with `LORAFLEET_CPU_ACTIVATIONS=bf16` (bf16 compute keeps bf16 activations on
/// a CPU with bf16 dot products too). Fails like [`rerun_portable`].
pub fn rerun_bf16_activations(filter: &str, at_least: usize) {
    rerun(filter, ("LORAFLEET_CPU_ACTIVATIONS", "bf16"), at_least);
}

fn rerun(filter: &str, (var, value): (&str, &str), at_least: usize) {
    // In a child: the variable reached the engine (the CPU runs the portable ops there).
    assert_eq!(lorafleet_engine::ops::cpu_ops(&candle_core::Device::Cpu), !portable());
    if RERUN_VARS.iter().any(|v| std::env::var_os(v).is_some()) {
        eprintln!("not rerun: this process already has one of {RERUN_VARS:?} set");
        return;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new(exe).args([filter, "--nocapture"]).env(var, value).output().expect("rerun the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tests matching {filter:?} failed with {var}={value}:\n{stdout}\n{stderr}");
    let passed = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("test result: ok. "))
        .filter_map(|l| l.split(' ').next()?.parse::<usize>().ok())
        .sum::<usize>();
    assert!(passed >= at_least, "only {passed} tests matching {filter:?} ran with {var}={value} (expected {at_least}):\n{stdout}");
}

/// Whether this run is on the portable ops (`LORAFLEET_OPS=portable`).
pub fn portable() -> bool {
    std::env::var("LORAFLEET_OPS").is_ok_and(|v| v == "portable")
}

/// Whether this run puts its f32 CPU products on the built-in kernels (and so the fused
/// LoRA and attention ops are the ones under test), and checks that a run asked for the
/// AVX2 kernels got them.
pub fn expect_fused() -> bool {
    let blas = std::env::var("LORAFLEET_BLAS").ok();
    if blas.as_deref() == Some("avx2") && lorafleet_engine::kernels::Isa::Avx2.supported() {
        assert_eq!(lorafleet_engine::blas::backend_name(), "avx2 (built-in)");
    }
    lorafleet_engine::kernels::available() && matches!(blas.as_deref(), None | Some("avx512") | Some("avx2")) && !portable()
}
