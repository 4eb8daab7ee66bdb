#!/usr/bin/env bash
# The CUDA check: run on a machine with an NVIDIA GPU (no Rust toolchain needed). It runs
# a real lorafleet deployment on loopback (coordinator, one worker with
# `--devices cuda:0`, file storage) and checks what the GPU trains against ground truth:
#
#   1. trace: the tiny-llama PEFT training trace of the fixtures (f32, full-precision
#      weights): every loss within 1e-4 of PEFT's and every adapter weight within 1e-4 of
#      PEFT's final adapter, the tolerance the CPU tests hold (engine/tests/trace.rs);
#   2. qlora: the QLoRA recipe (NF4 double quantization kept 4-bit on the GPU, bf16
#      compute, LoRA dropout, gradient accumulation, gradient checkpointing) on
#      tiny-llama, against the same spec trained on the CPU by `lorafleet train`:
#      losses within bf16 tolerance (2% relative);
#      2b: the same spec trained by `lorafleet train --devices cuda:0` (the CLI's own CUDA
#      build, no coordinator), against the CPU;
#   3. with two or more GPUs, the qlora job again on two of them (data parallel, NCCL
#      between them), against the one-GPU run;
#   4. with two or more GPUs, the qlora job as a gang of two workers (one GPU each, NCCL
#      between the processes, rendezvous through the coordinator), against the one-GPU run.
#   0. first, the collective itself: NCCL's ordered all-reduce over every GPU (up to 8)
#      for the LoRA gradient sizes of a 7B model (r = 8..64): every rank must get the
#      ordered sum bit for bit, and the bandwidth is printed (on one GPU: skipped, NCCL
#      needs one GPU per rank).
#
# Binaries come from LORAFLEET_BIN (default target/gpu-bundle/bin, unpacked from
# target/gpu-bundle/lorafleet-gpu.tar.xz, which scripts/gpu-bundle.sh makes on a build
# machine: a CUDA lorafleet-worker and the lorafleet and lorafleet-coordinator binaries).
# The CUDA libraries (libcudart.so.13, libcublas.so.13, libcurand.so.10) are looked up in
# the NVIDIA wheels of the machine's Python environment and added to LD_LIBRARY_PATH.
#
# LORAFLEET_GPU_CHECK_DEVICES=cpu runs the same checks with a CPU worker on the portable
# ops (LORAFLEET_OPS=portable, the code path of CUDA devices): how the script itself is
# tested on machines without a GPU (e2e/tests/gpu_check.rs). Exit status 0 only if every
# check passes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DEVICE="${LORAFLEET_GPU_CHECK_DEVICES:-cuda}"
BIN="${LORAFLEET_BIN:-$ROOT/target/gpu-bundle/bin}"
if [[ ! -x "$BIN/lorafleet-worker" && -f "$ROOT/target/gpu-bundle/lorafleet-gpu.tar.xz" ]]; then
    mkdir -p "$BIN"
    tar -xJf "$ROOT/target/gpu-bundle/lorafleet-gpu.tar.xz" -C "$BIN"
fi
for b in lorafleet lorafleet-coordinator lorafleet-worker; do
    [[ -x "$BIN/$b" ]] || { echo "gpu-check: no $BIN/$b (set LORAFLEET_BIN, or run scripts/gpu-bundle.sh on a build machine)" >&2; exit 2; }
done

if [[ "$DEVICE" == cuda ]]; then
    NV="$(python3 -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))' 2>/dev/null || true)"
    if [[ -n "$NV" ]]; then
        for d in "$NV"/nvidia/*/lib "$NV"/nvidia/cu13/lib; do
            [[ -d "$d" ]] && LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        done
        export LD_LIBRARY_PATH
    fi
    echo "==> GPUs"
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || true
    for lib in libcudart.so.13 libcublas.so.13 libcurand.so.10 libnccl.so.2; do
        found=""
        for d in ${LD_LIBRARY_PATH//:/ } /usr/lib/x86_64-linux-gnu /usr/local/cuda/lib64; do
            [[ -e "$d/$lib" ]] && found="$d/$lib" && break
        done
        echo "    $lib: ${found:-NOT FOUND}"
    done
    NGPU="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
else
    NGPU=0
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/lorafleet-gpu-check.XXXXXX")"
PORT="${LORAFLEET_GPU_CHECK_PORT:-50091}"
export LORAFLEET_COORDINATOR="http://127.0.0.1:$PORT"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [[ -n "${KEEP:-}" ]] || rm -rf "$WORK"
}
trap cleanup EXIT

"$BIN/lorafleet-coordinator" --listen "127.0.0.1:$PORT" --insecure --allow-local-model-paths --db "$WORK/db.sqlite" --storage "file://$WORK/store" > "$WORK/coordinator.log" 2>&1 &
PIDS+=($!)
if [[ "$DEVICE" == cuda ]]; then
    DEVICES="cuda:0"
    [[ "$NGPU" -ge 2 ]] && DEVICES="cuda:0,1"
else
    # The CPU worker runs the portable ops, the code path of CUDA devices, so that check 2
    # compares two paths here too.
    DEVICES="cpu"
    export LORAFLEET_OPS=portable
fi
"$BIN/lorafleet-worker" --coordinator "$LORAFLEET_COORDINATOR" --name check-worker --devices "$DEVICES" --storage "file://$WORK/store" --cache "$WORK/cache" > "$WORK/worker.log" 2>&1 &
PIDS+=($!)
unset LORAFLEET_OPS
for _ in $(seq 1 150); do
    "$BIN/lorafleet" workers --json 2>/dev/null | grep -q check-worker && break
    sleep 0.2
done
"$BIN/lorafleet" workers || { tail -20 "$WORK/worker.log"; exit 1; }

FIX="$ROOT/tests/fixtures/hf"
# Model and adapter paths relative to the repository, where the worker runs (a remote
# spec may not name absolute paths); the dataset is uploaded by `lorafleet submit`.
python3 - "$FIX" "$WORK" "$DEVICE" <<'EOF'
import json, sys
fixabs, work, device = sys.argv[1:]
fix = "tests/fixtures/hf"
t = json.load(open(f"{fixabs}/train/tiny-llama/trace.json"))
kind = "cuda" if device == "cuda" else "cpu"
trace = f"""name: gpu-check-trace
model: {{ source: {fix}/models/tiny-llama }}
quantization: {{ method: none, compute_dtype: f32 }}
lora: {{ r: {t['r']}, alpha: {t['lora_alpha']}, dropout: 0.0, target_modules: {json.dumps(t['target_modules'])}, init_adapter: {fix}/train/tiny-llama/init_adapter }}
data: {{ train: {fix}/train/tiny-llama/data.jsonl, shuffle: false, max_seq_len: 512 }}
training: {{ max_steps: {t['steps']}, micro_batch_size: 1, grad_accum: 1, lr: {t['lr']}, schedule: constant, warmup_steps: 0, weight_decay: 0.0, betas: [0.9, 0.999], eps: 1.0e-8, max_grad_norm: 0.0, gradient_checkpointing: false, seed: 0 }}
output: {{ dir: out/trace }}
resources: {{ device: {kind} }}
"""
open(f"{work}/trace.yaml", "w").write(trace)
for n in (1, 2):
    qlora = f"""name: gpu-check-qlora-{n}
model: {{ source: {fix}/models/tiny-llama }}
quantization: {{ method: nf4, double_quant: true, compute_dtype: bf16 }}
lora: {{ r: 8, alpha: 16, dropout: 0.05, target_modules: all-linear }}
data: {{ train: {fix}/train/tiny-llama/data.jsonl, max_seq_len: 256 }}
training: {{ max_steps: 20, micro_batch_size: 1, grad_accum: 4, lr: 2.0e-3, schedule: cosine, warmup_steps: 2, gradient_checkpointing: true, seed: 7 }}
output: {{ dir: out/qlora-{n} }}
resources: {{ device: {kind}, count: {n} }}
"""
    open(f"{work}/qlora-{n}.yaml", "w").write(qlora)
    if n == 1:  # the same as a gang of two workers with one device each
        gang = qlora.replace("gpu-check-qlora-1", "gpu-check-qlora-gang").replace("out/qlora-1", "out/qlora-gang")
        open(f"{work}/qlora-gang.yaml", "w").write(gang.replace(f"count: 1 }}", "count: 1, nodes: 2 }"))
    if n == 1:  # the same spec for `lorafleet train` here, writing into the work folder
        open(f"{work}/qlora-1-local.yaml", "w").write(qlora.replace("dir: out/qlora-1", f"dir: {work}/out/qlora-1"))
        open(f"{work}/qlora-1-local-device.yaml", "w").write(qlora.replace("dir: out/qlora-1", f"dir: {work}/out/qlora-1-device"))
EOF

run_job() { # spec -> fetched adapter dir
    local spec="$1" out="$2" job
    job=$("$BIN/lorafleet" submit "$spec" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])') || return 1
    echo "    job $job"
    "$BIN/lorafleet" watch "$job" || true
    "$BIN/lorafleet" status "$job"
    "$BIN/lorafleet" fetch "$job" -o "$out"
}

losses() { python3 -c 'import json,sys; print(json.dumps([json.loads(l)["loss"] for l in open(sys.argv[1]) if json.loads(l).get("type") == "step" and not json.loads(l).get("resumed")]))' "$1"; }

FAIL=0
if [[ "$DEVICE" == cuda && "$NGPU" -ge 2 ]]; then
    W=$(( NGPU > 8 ? 8 : NGPU ))
    echo "==> 0. NCCL ordered all-reduce on $W GPUs (7B-shape LoRA gradients, r = 8..64)"
    "$BIN/lorafleet" bench allreduce --collective nccl --world "$W" --rounds 5 || FAIL=1
elif [[ "$DEVICE" == cuda ]]; then
    echo "==> 0. NCCL: skipped (one GPU; NCCL needs one GPU per rank)"
else
    echo "==> 0. TCP ring ordered all-reduce (the CPU collective; NCCL needs GPUs)"
    "$BIN/lorafleet" bench allreduce --world 2 --rounds 2 || FAIL=1
fi

echo "==> 1. PEFT trace on $DEVICES"
run_job "$WORK/trace.yaml" "$WORK/fetched-trace"
python3 - "$FIX" "$WORK" <<'EOF' || FAIL=1
import json, struct, sys
fix, work = sys.argv[1:]
want = json.load(open(f"{fix}/train/tiny-llama/trace.json"))["losses"]
got = [json.loads(l)["loss"] for l in open(f"{work}/fetched-trace/metrics.jsonl") if json.loads(l).get("type") == "step"]
worst = max(abs(a - b) for a, b in zip(got, want))
print(f"    losses: {len(got)} steps, worst difference from PEFT {worst:.2e} (tolerance 1e-4)")
def tensors(p):
    b = open(p, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n])
    out = {}
    for k, v in h.items():
        if k == "__metadata__":
            continue
        s, e = v["data_offsets"]
        raw = b[8 + n + s: 8 + n + e]
        assert v["dtype"] == "F32", v["dtype"]
        out[k] = struct.unpack(f"<{len(raw) // 4}f", raw)
    return out
g = tensors(f"{work}/fetched-trace/adapter_model.safetensors")
e = tensors(f"{fix}/train/tiny-llama/final_adapter/adapter_model.safetensors")
wa = max(max(abs(x - y) for x, y in zip(g[k], e[k])) for k in e)
print(f"    adapter: {len(g)} tensors, worst difference from PEFT {wa:.2e} (tolerance 1e-4)")
ok = len(got) == len(want) and worst < 1e-4 and set(g) == set(e) and wa < 1e-4
print("    PASS" if ok else "    FAIL")
sys.exit(0 if ok else 1)
EOF

echo "==> 2. QLoRA recipe on $DEVICES (1 device) vs the CPU"
run_job "$WORK/qlora-1.yaml" "$WORK/fetched-qlora-1"
"$BIN/lorafleet" train "$WORK/qlora-1-local.yaml" > "$WORK/cpu-train.log" 2>&1 || { tail -20 "$WORK/cpu-train.log"; FAIL=1; }
cmp_losses() { # a b tolerance label
    python3 - "$1" "$2" "$3" "$4" <<'EOF'
import json, sys
a, b, tol, label = json.loads(sys.argv[1]), json.loads(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
worst = max(abs(x - y) / max(abs(y), 1e-6) for x, y in zip(a, b)) if a and b else float("inf")
print(f"    {label}: {len(a)} vs {len(b)} steps, first {a[0]:.4f} vs {b[0]:.4f}, last {a[-1]:.4f} vs {b[-1]:.4f}, worst relative difference {worst:.2e} (tolerance {tol})")
ok = len(a) == len(b) and worst < tol and a[-1] < a[0]
print("    PASS" if ok else "    FAIL")
sys.exit(0 if ok else 1)
EOF
}
cmp_losses "$(losses "$WORK/fetched-qlora-1/metrics.jsonl")" "$(losses "$WORK/out/qlora-1/metrics.jsonl")" 0.02 "device vs CPU" || FAIL=1

echo "==> 2b. the same with \`lorafleet train --devices ${DEVICES%%,*}\` (no coordinator) vs the CPU"
if [[ "$DEVICE" == cuda ]]; then
    "$BIN/lorafleet" train --no-progress --devices cuda:0 "$WORK/qlora-1-local-device.yaml" > "$WORK/device-train.log" 2>&1 || { tail -20 "$WORK/device-train.log"; FAIL=1; }
else
    LORAFLEET_OPS=portable "$BIN/lorafleet" train --no-progress --devices cpu "$WORK/qlora-1-local-device.yaml" > "$WORK/device-train.log" 2>&1 || { tail -20 "$WORK/device-train.log"; FAIL=1; }
fi
cmp_losses "$(losses "$WORK/out/qlora-1-device/metrics.jsonl")" "$(losses "$WORK/out/qlora-1/metrics.jsonl")" 0.02 "local device vs CPU" || FAIL=1

if [[ "$DEVICES" == *,* ]]; then
    echo "==> 3. QLoRA recipe data parallel on $DEVICES vs one device"
    run_job "$WORK/qlora-2.yaml" "$WORK/fetched-qlora-2"
    cmp_losses "$(losses "$WORK/fetched-qlora-2/metrics.jsonl")" "$(losses "$WORK/fetched-qlora-1/metrics.jsonl")" 0.001 "2 devices vs 1" || FAIL=1
else
    echo "==> 3. data parallel: skipped (one device)"
fi

# A gang: a second worker, and the one-device spec with `nodes: 2`.
GANG2=""
if [[ "$DEVICE" == cuda && "$NGPU" -ge 2 ]]; then
    GANG2="cuda:1"
elif [[ "$DEVICE" != cuda ]]; then
    GANG2="cpu"
fi
if [[ -n "$GANG2" ]]; then
    echo "==> 4. QLoRA recipe as a gang of two workers ($DEVICES + $GANG2) vs one device"
    [[ "$DEVICE" == cuda ]] || export LORAFLEET_OPS=portable
    "$BIN/lorafleet-worker" --coordinator "$LORAFLEET_COORDINATOR" --name check-worker-2 --devices "$GANG2" --storage "file://$WORK/store" --cache "$WORK/cache-2" > "$WORK/worker-2.log" 2>&1 &
    PIDS+=($!)
    unset LORAFLEET_OPS
    if run_job "$WORK/qlora-gang.yaml" "$WORK/fetched-qlora-gang"; then
        cmp_losses "$(losses "$WORK/fetched-qlora-gang/metrics.jsonl")" "$(losses "$WORK/fetched-qlora-1/metrics.jsonl")" 0.001 "gang of 2 vs 1 device" || FAIL=1
    else
        tail -20 "$WORK/worker-2.log"
        FAIL=1
    fi
    grep -E "gang (ring connected|NCCL communicator joined)" "$WORK/worker.log" "$WORK/worker-2.log" | tail -2 || true
else
    echo "==> 4. gang: skipped (one GPU)"
fi

echo "==> worker log (last lines)"
tail -5 "$WORK/worker.log"
if [[ "$FAIL" == 0 ]]; then echo "gpu-check: all checks passed on $DEVICES"; else echo "gpu-check: FAILED (KEEP=1 keeps $WORK)"; fi
exit "$FAIL"
