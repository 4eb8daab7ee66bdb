#!/usr/bin/env python3
"""Check a GGUF file written by `lorafleet export` / `lorafleet merge --format gguf`
with llama.cpp's own reader (the `gguf` package, gguf.GGUFReader), against expectations
computed here in numpy from the Hugging Face fixture files.

    check_gguf.py adapter FILE --adapter DIR --model DIR --dtype f32|f16|bf16|q8_0
    check_gguf.py merged  FILE --adapter DIR --model DIR --dtype f32|f16|bf16|q8_0

Everything expected is derived independently of lorafleet: tensor names from gguf-py's
tensor map, the q/k permutation and Falcon's qkv regrouping as llama.cpp's converter
writes them (reshape/swapaxes, view/cat), Q8_0/BF16 from gguf-py's quantizers. Exit 0
when every check passes; otherwise every failure is printed and the exit status is 1.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

import gguf
from gguf import GGMLQuantizationType as Q

FAILURES: list[str] = []


def check(cond: bool, msg: str) -> None:
    if not cond:
        FAILURES.append(msg)


def field(reader: gguf.GGUFReader, key: str):
    f = reader.fields.get(key)
    if f is None:
        FAILURES.append(f"metadata {key}: missing")
        return None
    return f.contents()


def expect_kv(reader, key, want, rel=0.0):
    got = field(reader, key)
    if got is None:
        return
    if isinstance(want, float):
        check(abs(float(got) - want) <= rel * abs(want) + 1e-12, f"metadata {key}: {got!r}, want {want!r}")
    else:
        check(got == want, f"metadata {key}: {str(got)[:200]!r}, want {str(want)[:200]!r}")


# --- the converter's facts, restated in numpy ---------------------------------------

ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "falcon": gguf.MODEL_ARCH.FALCON}


def effective_kv_heads(cfg: dict) -> int:
    """Falcon's K/V head count as the weights have it (multi-query: 1)."""
    n_head = cfg.get("num_attention_heads", cfg.get("n_head"))
    if cfg["model_type"] == "falcon":
        if cfg.get("new_decoder_architecture", False):
            return cfg.get("num_kv_heads", cfg.get("n_head_kv", n_head))
        return 1 if cfg.get("multi_query", True) else n_head
    return cfg.get("num_key_value_heads", n_head)


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def falcon_qkv(w: np.ndarray, cfg: dict) -> np.ndarray:
    """convert_hf_to_gguf.py FalconModel.modify_tensors (with the effective K/V heads)."""
    n_head = cfg["num_attention_heads"]
    n_kv = effective_kv_heads(cfg)
    hd = cfg["hidden_size"] // n_head
    tail = w.shape[1:]
    qkv = w.reshape(n_kv, n_head // n_kv + 2, hd, *tail)
    q = qkv[:, :-2].reshape(n_head * hd, *tail)
    k = qkv[:, [-2]].reshape(n_kv * hd, *tail)
    v = qkv[:, [-1]].reshape(n_kv * hd, *tail)
    return np.concatenate((q, k, v))


def reorder_rows(gguf_name: str, w: np.ndarray, cfg: dict) -> np.ndarray:
    mt = cfg["model_type"]
    if mt in ("llama", "mistral") and ".attn_q." in gguf_name:
        return llama_permute(w, cfg["num_attention_heads"])
    if mt in ("llama", "mistral") and ".attn_k." in gguf_name:
        return llama_permute(w, effective_kv_heads(cfg))
    if mt == "falcon" and ".attn_qkv." in gguf_name:
        return falcon_qkv(w, cfg)
    return w


def gguf_name(tmap, hf_name: str) -> str:
    name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise SystemExit(f"gguf-py maps no name for {hf_name}")
    return name


def stored_type(name: str, shape: tuple, want: str) -> Q:
    """prepare_tensors' type choice."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or name[-7:] not in (".weight", ".lora_a", ".lora_b"):
        return Q.F32
    t = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[want]
    if t == Q.Q8_0 and shape[-1] % 32 != 0:
        return Q.F16
    return t


def compare(name: str, t, want: np.ndarray, qtype: Q, exact: bool) -> None:
    """Values of reader tensor `t` against f32 `want` (numpy order)."""
    check(tuple(int(d) for d in t.shape) == tuple(reversed(want.shape)), f"{name}: ggml shape {list(t.shape)}, want {list(reversed(want.shape))}")
    check(t.tensor_type == qtype, f"{name}: type {t.tensor_type.name}, want {qtype.name}")
    if t.tensor_type != qtype or tuple(int(d) for d in t.shape) != tuple(reversed(want.shape)):
        return
    got = gguf.quants.dequantize(t.data, qtype).reshape(want.shape).astype(np.float32)
    want = want.astype(np.float32)
    if qtype == Q.F32:
        if exact:
            check(np.array_equal(got, want), f"{name}: f32 values differ (max {np.abs(got - want).max()})")
        else:
            check(np.allclose(got, want, rtol=1e-5, atol=1e-6), f"{name}: f32 values differ (max {np.abs(got - want).max()})")
    elif qtype in (Q.F16, Q.BF16):
        ref = gguf.quants.dequantize(gguf.quants.quantize(want, qtype), qtype).reshape(want.shape)
        if exact:
            check(np.array_equal(got, ref), f"{name}: {qtype.name} values are not the rounded PEFT values (max {np.abs(got - ref).max()})")
        else:
            # a merged value from numpy's and candle's sums may sit across a rounding
            # boundary: allow one unit in the last place of the 16-bit type
            ulp = np.abs(ref) * (2.0 ** -10 if qtype == Q.F16 else 2.0 ** -7) + 1e-7
            check(bool(np.all(np.abs(got - ref) <= ulp * 1.0001)), f"{name}: {qtype.name} values off by more than an ulp (max {np.abs(got - ref).max()})")
    elif qtype == Q.Q8_0:
        blocks = want.reshape(-1, 32)
        amax = np.abs(blocks).max(axis=1, keepdims=True)
        # |x - q d16| <= d/2 (rounding) + 127 |d - d16| (f16 scale) + float noise
        bound = amax / 127 * 0.5 + amax * 2.0 ** -11 * 1.01 + 1e-6
        err = np.abs(got.reshape(-1, 32) - blocks)
        check(bool(np.all(err <= bound)), f"{name}: q8_0 error {err.max()} beyond the block bound")
        if exact:
            check(np.array_equal(np.asarray(t.data).reshape(-1), gguf.quants.quantize(want, Q.Q8_0).reshape(-1)), f"{name}: q8_0 bytes differ from gguf-py's quantizer")


# --- the two file kinds ---------------------------------------------------------------


def load(args):
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    acfg = json.loads((Path(args.adapter) / "adapter_config.json").read_text())
    lora = load_file(str(Path(args.adapter) / "adapter_model.safetensors"))
    return cfg, acfg, lora


def lora_pairs(lora: dict) -> dict:
    pairs = {}
    for k, v in lora.items():
        mod = k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        pairs.setdefault(mod, {})["A" if ".lora_A." in k else "B"] = v.astype(np.float32)
    return pairs


def check_adapter(reader, args) -> None:
    cfg, acfg, lora = load(args)
    arch = ARCH[cfg["model_type"]]
    tmap = gguf.get_tensor_name_map(arch, cfg.get("num_hidden_layers", cfg.get("n_layer")))
    r = acfg["r"]
    alpha = float(acfg["lora_alpha"]) * (math.sqrt(r) if acfg.get("use_rslora") else 1.0)
    expect_kv(reader, "general.architecture", gguf.MODEL_ARCH_NAMES[arch])
    expect_kv(reader, "general.type", "adapter")
    expect_kv(reader, "adapter.type", "lora")
    expect_kv(reader, "adapter.lora.alpha", alpha, rel=1e-6)
    want = {}
    for mod, ab in lora_pairs(lora).items():
        name = gguf_name(tmap, mod + ".weight")
        want[name + ".lora_a"] = ab["A"]
        want[name + ".lora_b"] = reorder_rows(name, ab["B"], cfg)
    tensors = {t.name: t for t in reader.tensors}
    check(set(tensors) == set(want), f"tensor names: extra {sorted(set(tensors) - set(want))[:5]}, missing {sorted(set(want) - set(tensors))[:5]}")
    for name, w in want.items():
        if name in tensors:
            compare(name, tensors[name], w, stored_type(name, w.shape, args.dtype), exact=True)


def check_vocab(reader, args, cfg) -> None:
    tok = json.loads((Path(args.model) / "tokenizer.json").read_text())
    n = cfg["vocab_size"]
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    types = [5 if i not in by_id else (3 if i in added and added[i]["special"] else 1) for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    expect_kv(reader, "tokenizer.ggml.model", "gpt2")
    expect_kv(reader, "tokenizer.ggml.pre", "gpt-2")
    expect_kv(reader, "tokenizer.ggml.tokens", tokens)
    expect_kv(reader, "tokenizer.ggml.token_type", types)
    expect_kv(reader, "tokenizer.ggml.merges", merges)
    expect_kv(reader, "tokenizer.ggml.bos_token_id", cfg["bos_token_id"])
    expect_kv(reader, "tokenizer.ggml.eos_token_id", cfg["eos_token_id"])
    expect_kv(reader, "tokenizer.ggml.padding_token_id", cfg["pad_token_id"])
    expect_kv(reader, "tokenizer.ggml.add_bos_token", False)


def check_arch_kv(reader, cfg) -> None:
    a = gguf.MODEL_ARCH_NAMES[ARCH[cfg["model_type"]]]
    rope = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    n_head = cfg["num_attention_heads"]
    common = {
        "block_count": cfg["num_hidden_layers"],
        "context_length": cfg["max_position_embeddings"],
        "embedding_length": cfg["hidden_size"],
        "attention.head_count": n_head,
        "attention.head_count_kv": effective_kv_heads(cfg),
        "rope.freq_base": float(rope),
    }
    if cfg["model_type"] == "falcon":
        common["feed_forward_length"] = cfg.get("ffn_hidden_size", 4 * cfg["hidden_size"])
        common["attention.layer_norm_epsilon"] = float(cfg["layer_norm_epsilon"])
        common["tensor_data_layout"] = "jploski"
    else:
        common["feed_forward_length"] = cfg["intermediate_size"]
        common["attention.layer_norm_rms_epsilon"] = float(cfg["rms_norm_eps"])
        common["vocab_size"] = cfg["vocab_size"]
        common["rope.dimension_count"] = cfg.get("head_dim", cfg["hidden_size"] // n_head)
    for k, v in common.items():
        expect_kv(reader, f"{a}.{k}", v, rel=1e-6)


def check_merged(reader, args) -> None:
    cfg, acfg, lora = load(args)
    arch = ARCH[cfg["model_type"]]
    tmap = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    r = acfg["r"]
    scaling = acfg["lora_alpha"] / (math.sqrt(r) if acfg.get("use_rslora") else r)
    base = load_file(str(Path(args.model) / "model.safetensors"))
    pairs = lora_pairs(lora)
    expect_kv(reader, "general.architecture", gguf.MODEL_ARCH_NAMES[arch])
    expect_kv(reader, "general.type", "model")
    expect_kv(reader, "general.file_type", {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}[args.dtype])
    check_arch_kv(reader, cfg)
    check_vocab(reader, args, cfg)
    want, merged = {}, set()
    for hf_name, w in base.items():
        w = w.astype(np.float32)
        mod = hf_name.removesuffix(".weight")
        if hf_name.endswith(".weight") and mod in pairs:
            w = w + scaling * (pairs[mod]["B"].astype(np.float64) @ pairs[mod]["A"].astype(np.float64)).astype(np.float32)
            merged.add(hf_name)
        name = gguf_name(tmap, hf_name)
        want[name] = (reorder_rows(name, w, cfg), hf_name in merged)
    check(len(merged) == len(pairs), f"{len(pairs) - len(merged)} adapted modules have no base weight")
    tensors = {t.name: t for t in reader.tensors}
    check(set(tensors) == set(want), f"tensor names: extra {sorted(set(tensors) - set(want))[:5]}, missing {sorted(set(want) - set(tensors))[:5]}")
    for name, (w, was_merged) in want.items():
        if name in tensors:
            compare(name, tensors[name], w, stored_type(name, w.shape, args.dtype), exact=not was_merged)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["adapter", "merged"])
    p.add_argument("file")
    p.add_argument("--adapter", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"])
    args = p.parse_args()
    reader = gguf.GGUFReader(args.file)
    check(int(reader.fields["GGUF.version"].contents()) == 3, "GGUF version is not 3")
    (check_adapter if args.kind == "adapter" else check_merged)(reader, args)
    if FAILURES:
        for f in FAILURES:
            print(f"FAIL {args.file}: {f}", file=sys.stderr)
        return 1
    print(f"ok {args.kind} {args.file}: {len(reader.tensors)} tensors, {len(reader.fields)} metadata fields")
    return 0


if __name__ == "__main__":
    sys.exit(main())
