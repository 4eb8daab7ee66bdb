//! `scripts/gpu-check.sh`, the CUDA check a session with a GPU runs, run here with a CPU
//! worker on the portable ops (the code path of CUDA devices): a real coordinator,
//! worker and CLI on loopback train the PEFT trace (losses and adapter within 1e-4 of
//! PEFT's), the QLoRA recipe (against `lorafleet train` on the CPU ops) and the same
//! recipe as a gang of two workers (against one device), after checking the collective's
//! ordered sum, so the script is known to work before a GPU is at hand.

use std::process::Command;

#[test]
fn gpu_check_script_passes_on_a_cpu_worker() {
    let bins = lorafleet_e2e::binaries();
    let out = Command::new(lorafleet_e2e::workspace_root().join("scripts/gpu-check.sh"))
        .env("LORAFLEET_BIN", bins)
        .env("LORAFLEET_GPU_CHECK_DEVICES", "cpu")
        .env("LORAFLEET_GPU_CHECK_PORT", lorafleet_e2e::free_port().to_string())
        .output()
        .expect("run scripts/gpu-check.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "gpu-check.sh failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("gpu-check: all checks passed on cpu"), "{stdout}");
    assert_eq!(stdout.matches("    PASS").count(), 4, "{stdout}");
    assert!(stdout.contains("gang of 2 vs 1 device") && stdout.contains("gang ring connected"), "{stdout}");
    assert!(stdout.matches("  exact").count() == 4 && !stdout.contains("WRONG"), "{stdout}");
    assert!(stdout.contains("worst difference from PEFT"), "{stdout}");
}
