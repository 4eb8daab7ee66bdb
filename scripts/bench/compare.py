"""lorafleet against PyTorch + PEFT, side by side: the driver of `scripts/bench-compare.sh`.

Runs every workload on both, interleaved (round 1: workload A lorafleet, A anchor, B
lorafleet, B anchor, ...; then round 2, ...), each run a fresh process, and prints a
Markdown table of medians and ratios (tokens/s, peak RSS) with the machine, the build
and the versions. Every run's JSON goes to --out (JSON lines) as well.

  python compare.py --lorafleet target/release/lorafleet --anchor "python hf_anchor.py" \
      [--rounds 3] [--set full|quick] [--only train|generate] [--min-ratio 0.5]

--min-ratio: exit 1 if a workload's median tokens/s ratio falls below it (the CI guard).
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

# (name, kind, lorafleet args, anchor args)
def workloads(which: str):
    out = []
    if which == "quick":
        for q in ["none", "nf4"]:
            out.append((f"train {q}/f32 seq 128", "train",
                        ["bench", "train", "--quant", q, "--seq", "128", "--steps", "3"],
                        ["train", "--quant", q, "--seq", "128", "--steps", "3"]))
        return out
    for seq, steps in [(256, 10), (1024, 4)]:
        for q, c in [("none", "f32"), ("nf4", "f32"), ("nf4", "bf16")]:
            for ck in ["off", "on"]:
                out.append((f"train {'f32' if q == 'none' else 'nf4'}/{c} ckpt {ck} seq {seq}", "train",
                            ["bench", "train", "--quant", q, "--compute-dtype", c, "--checkpointing", ck, "--seq", str(seq), "--steps", str(steps)],
                            ["train", "--quant", q, "--compute", c, "--checkpointing", ck, "--seq", str(seq), "--steps", str(steps)]))
    for q in ["none", "nf4"]:
        out.append((f"generate {'f32' if q == 'none' else 'nf4'}/f32 128 new", "generate",
                    ["bench", "generate", "--quant", q, "--new-tokens", "128", "--runs", "3"],
                    ["generate", "--quant", q, "--new-tokens", "128", "--runs", "3"]))
    return out


def run(cmd, env):
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {shlex.join(cmd)}\n{p.stderr[-3000:]}")
    line = [l for l in p.stdout.splitlines() if l.startswith("{")][-1]
    r = json.loads(line)
    r["wall_secs"] = time.time() - t0
    return r


def cpu_model():
    try:
        for l in open("/proc/cpuinfo"):
            if l.startswith("model name"):
                return l.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags():
    try:
        for l in open("/proc/cpuinfo"):
            if l.startswith("flags"):
                f = set(l.split(":", 1)[1].split())
                return " ".join(x for x in ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16"] if x in f)
    except OSError:
        pass
    return "unknown"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lorafleet", required=True)
    ap.add_argument("--anchor", required=True, help="command prefix, e.g. '.venv-bench/bin/python scripts/bench/hf_anchor.py'")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--set", choices=["full", "quick"], default="full")
    ap.add_argument("--only", choices=["train", "generate"])
    ap.add_argument("--profile", default="?")
    ap.add_argument("--out", default="bench-compare.jsonl")
    ap.add_argument("--min-ratio", type=float, default=0.0)
    a = ap.parse_args()
    env = dict(os.environ)
    ws = [w for w in workloads(a.set) if a.only is None or w[1] == a.only]
    results = {}
    started = datetime.datetime.now(datetime.timezone.utc)
    with open(a.out, "w") as out:
        for rnd in range(1, a.rounds + 1):
            for name, _, lf, an in ws:
                for system, cmd in [("lorafleet", [a.lorafleet] + lf + ["--json"]), ("anchor", shlex.split(a.anchor) + an)]:
                    r = run(cmd, env)
                    r.update(system=system, workload=name, round=rnd)
                    out.write(json.dumps(r) + "\n")
                    out.flush()
                    results.setdefault((name, system), []).append(r)
                    print(f"round {rnd}/{a.rounds}  {name:<34} {system:<9} {r['tokens_per_sec']:8.1f} tokens/s  "
                          f"peak RSS {r.get('peak_rss_mib') or 0:6.0f} MiB  ({r['wall_secs']:.0f} s)", file=sys.stderr, flush=True)
    anchor_versions = next((r for (n, s), rs in results.items() if s == "anchor" for r in rs), {})
    lf_threads = next((r.get("threads") for (n, s), rs in results.items() if s == "lorafleet" for r in rs), "?")
    print(f"\n**{started:%Y-%m-%d}**, CPU: {cpu_model()} ({os.cpu_count()} logical cores; {cpu_flags()}), "
          f"lorafleet build: {a.profile}, threads: lorafleet {lf_threads}, PyTorch {anchor_versions.get('threads', '?')}; "
          f"anchor: torch {anchor_versions.get('torch')}, transformers {anchor_versions.get('transformers')}, "
          f"peft {anchor_versions.get('peft')}, bitsandbytes {anchor_versions.get('bitsandbytes')}; "
          f"{a.rounds} interleaved round(s), medians.\n")
    print("| workload | lorafleet tokens/s | PyTorch + PEFT tokens/s | ratio | lorafleet peak RSS | PyTorch peak RSS | RSS ratio |")
    print("|---|---|---|---|---|---|---|")
    worst = None
    for name, _, _, _ in ws:
        lf, an = results[(name, "lorafleet")], results[(name, "anchor")]
        med = lambda rs, k: statistics.median([r[k] for r in rs if r.get(k) is not None])
        t_lf, t_an = med(lf, "tokens_per_sec"), med(an, "tokens_per_sec")
        m_lf, m_an = med(lf, "peak_rss_mib"), med(an, "peak_rss_mib")
        ratio = t_lf / t_an
        worst = ratio if worst is None else min(worst, ratio)
        spread = lambda rs: f" ({min(r['tokens_per_sec'] for r in rs):.0f}-{max(r['tokens_per_sec'] for r in rs):.0f})" if len(rs) > 1 else ""
        print(f"| {name} | {t_lf:.0f}{spread(lf)} | {t_an:.0f}{spread(an)} | **{ratio:.2f}x** | {m_lf:.0f} MiB | {m_an:.0f} MiB | {m_lf / m_an:.2f}x |")
    if a.min_ratio > 0 and worst is not None:
        verdict = "ok" if worst >= a.min_ratio else "FAILED"
        print(f"\nregression guard: lowest ratio {worst:.2f}x, floor {a.min_ratio:.2f}x: {verdict}")
        if worst < a.min_ratio:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
