"""The anchor of `scripts/bench-compare.sh`: the workloads of `lorafleet bench train` and
`lorafleet bench generate` in PyTorch + transformers + PEFT (+ bitsandbytes for NF4), on
the CPU. Extends `shared/bench/hf_peft_cpu.py` (same model, same LoRA) with the
sequence length, gradient checkpointing, bf16 compute and decoding.

Model: random Llama, 4 layers, hidden 512, intermediate 1408, 8 heads, vocab 32000;
LoRA r=8 alpha=16 dropout 0 on q/k/v/o/gate/up/down (unmerged, as PEFT runs it).

  train:    one sequence of --seq random tokens per step, loss on every next token,
            AdamW; 2 warm-up steps, then --steps timed ones.
  generate: greedy `generate` with the KV cache, --new-tokens after a random prompt of
            --prompt-tokens (never stopped early), one warm-up run, then --runs timed.

Prints one JSON object: tokens_per_sec (train: input tokens; generate: new tokens, the
prompt's forward pass included), peak_rss_mib (ru_maxrss of the whole run), threads and
versions.
"""
import argparse
import json
import os
import resource
import sys
import tempfile
import time

import torch


def build(quant: str, compute: str, max_pos: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=max_pos,
                      tie_word_embeddings=False)
    dtype = torch.bfloat16 if compute == "bf16" else torch.float32
    if quant == "nf4":
        from transformers import BitsAndBytesConfig
        # bitsandbytes quantizes on load: save, load quantized, then remove the files
        # (every NF4 run would otherwise leave a 175 MB model in the temp dir).
        with tempfile.TemporaryDirectory(prefix="lorafleet-anchor-") as d:
            LlamaForCausalLM(cfg).save_pretrained(d)
            m = LlamaForCausalLM.from_pretrained(d, dtype=dtype, device_map="cpu", quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
    else:
        m = LlamaForCausalLM(cfg).to(dtype)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(m, lora)


def train(a) -> float:
    pm = build(a.quant, a.compute, max(2048, a.seq))
    if a.checkpointing == "on":
        pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        pm.enable_input_require_grads()
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(1, 32000, (1, a.seq))

    def step():
        out = pm(input_ids=ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()

    for _ in range(2):
        step()
    if a.profile:
        # Where PyTorch's step goes, to set beside `lorafleet bench train --ops`: the
        # operators with the most self CPU time over the timed steps, per step.
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.time()
            for _ in range(a.steps):
                step()
            dt = time.time() - t0
        rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        print(f"{'op (self CPU time, all threads)':<56} {'ms/step':>10} {'calls':>8}", file=sys.stderr)
        for e in rows[:a.profile]:
            print(f"{e.key[:56]:<56} {e.self_cpu_time_total / 1e3 / a.steps:>10.1f} {e.count / a.steps:>8.0f}", file=sys.stderr)
        print(f"{'step (wall)':<56} {dt * 1e3 / a.steps:>10.1f}", file=sys.stderr)
        return a.steps * a.seq / dt
    t0 = time.time()
    for _ in range(a.steps):
        step()
    return a.steps * a.seq / (time.time() - t0)


def generate(a) -> float:
    pm = build(a.quant, a.compute, 2048)
    pm.eval()
    ids = torch.randint(1, 32000, (1, a.prompt_tokens))
    kw = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False, use_cache=True,
              pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        pm.generate(input_ids=ids, **kw)
        t0 = time.time()
        for _ in range(a.runs):
            out = pm.generate(input_ids=ids, **kw)
            assert out.shape[1] == a.prompt_tokens + a.new_tokens, out.shape
    return a.runs * a.new_tokens / (time.time() - t0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["train", "generate"])
    p.add_argument("--quant", choices=["none", "nf4"], default="none")
    p.add_argument("--compute", choices=["f32", "bf16"], default="f32")
    p.add_argument("--checkpointing", choices=["on", "off"], default="off")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="train: profile the timed steps with torch.profiler and print the N operators with the most self CPU time (stderr)")
    a = p.parse_args()
    tps = train(a) if a.what == "train" else generate(a)
    import peft
    import transformers
    try:
        import bitsandbytes
        bnb = bitsandbytes.__version__
    except Exception:  # noqa: BLE001 - reported, not needed for the f32 workloads
        bnb = None
    print(json.dumps({
        "tokens_per_sec": tps,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__, "bitsandbytes": bnb,
    }))


if __name__ == "__main__":
    sys.exit(main())
