"""`lorafleet serve` against Hugging Face `generate` (sequential) on the same model and
adapters, side by side in one run (scripts/bench-serve.sh sets it up).

For each round, and in each round for every (streams, adapters) pair, interleaved:
  lorafleet: a burst of `streams` concurrent streaming /v1/completions requests (request
             i uses adapter i % adapters), greedy, --new-tokens at most (eos ends early);
  HF:        the same requests one after the other with PEFT (`set_adapter` per
             request), greedy `generate` with the KV cache, the same token ids in.
Both count the tokens they generated (equal when both decode the same greedy tokens).
Throughput: generated tokens / wall time of the burst. Time to first token: from the
burst's start to each request's first token, averaged (for HF this includes waiting for
the requests before it, as a server doing one request at a time would).
Prints a markdown table of medians (ranges in brackets) and the ratios.
"""
import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from urllib.parse import urlparse

import torch


def start_server(a):
    cmd = [a.lorafleet, "serve", "--model", a.model, "--listen", "127.0.0.1:0", "--max-batch", "32"]
    for i, d in enumerate(a.adapters):
        cmd += ["--adapter", f"a{i}={d}"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    url = next(w for w in line.split() if w.startswith("http://"))
    return p, urlparse(url)


def one_request(url, body, t0, out, i):
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"content-type": "application/json"})
    r = conn.getresponse()
    first, tokens = None, 0
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("choices") and first is None:
            first = time.perf_counter() - t0
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    conn.close()
    out[i] = (first if first is not None else time.perf_counter() - t0, tokens)


def lorafleet_burst(url, prompts, streams, adapters, new_tokens):
    out = [None] * streams
    t0 = time.perf_counter()
    threads = []
    for i in range(streams):
        body = {"model": f"a{i % adapters}", "prompt": prompts[i % len(prompts)], "max_tokens": new_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        t = threading.Thread(target=one_request, args=(url, body, t0, out, i))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return sum(o[1] for o in out) / wall, statistics.mean(o[0] for o in out), sum(o[1] for o in out)


class FirstToken:
    """A logits processor that notes when the first token's logits arrive."""

    def __init__(self):
        self.at = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            self.at = time.perf_counter()
        return scores


def hf_burst(pm, tok, eos, prompts, streams, adapters, new_tokens):
    from transformers import LogitsProcessorList
    t0 = time.perf_counter()
    firsts, total = [], 0
    for i in range(streams):
        pm.set_adapter(f"a{i % adapters}")
        ids = torch.tensor([tok.encode(prompts[i % len(prompts)], add_special_tokens=True).ids])
        ft = FirstToken()
        with torch.no_grad():
            out = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=eos, pad_token_id=eos, logits_processor=LogitsProcessorList([ft]))
        new = out[0, ids.shape[1]:].tolist()
        total += len([t for t in new if t != eos]) if eos in new else len(new)
        firsts.append(ft.at - t0)
    wall = time.perf_counter() - t0
    return total / wall, statistics.mean(firsts), total


def load_hf(a):
    from peft import PeftModel
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    pm = PeftModel.from_pretrained(base, a.adapters[0], adapter_name="a0")
    for i, d in enumerate(a.adapters[1:], start=1):
        pm.load_adapter(d, adapter_name=f"a{i}")
    pm.eval()
    cfg = json.load(open(os.path.join(a.model, "config.json")))
    eos = cfg["eos_token_id"][0] if isinstance(cfg["eos_token_id"], list) else cfg["eos_token_id"]
    return pm, Tokenizer.from_file(os.path.join(a.model, "tokenizer.json")), eos


def fmt(vals, digits):
    return f"{statistics.median(vals):.{digits}f} [{min(vals):.{digits}f}-{max(vals):.{digits}f}]"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lorafleet", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--adapters", nargs="+", required=True)
    p.add_argument("--prompts", required=True, help="JSON file: a list of prompt strings")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--streams", default="1,8,32")
    p.add_argument("--adapter-counts", default="1,4")
    a = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    prompts = json.load(open(a.prompts))
    server, url = start_server(a)
    try:
        pm, tok, eos = load_hf(a)
        configs = [(s, n) for n in map(int, a.adapter_counts.split(",")) for s in map(int, a.streams.split(","))]
        # warm-up: both sides once
        lorafleet_burst(url, prompts, 2, 1, 8)
        hf_burst(pm, tok, eos, prompts, 2, 1, 8)
        res = {c: {"lf": [], "hf": []} for c in configs}
        for r in range(a.rounds):
            for c in configs:
                res[c]["lf"].append(lorafleet_burst(url, prompts, c[0], c[1], a.new_tokens))
                res[c]["hf"].append(hf_burst(pm, tok, eos, prompts, c[0], c[1], a.new_tokens))
                print(f"round {r + 1}: streams {c[0]} adapters {c[1]}: lorafleet {res[c]['lf'][-1][0]:.0f} tok/s, HF {res[c]['hf'][-1][0]:.0f} tok/s", file=sys.stderr, flush=True)
    finally:
        server.terminate()
        server.wait()
    print("| streams | adapters | lorafleet tokens/s | HF tokens/s | ratio | lorafleet TTFT ms | HF TTFT ms | tokens (lorafleet / HF) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in configs:
        lf, hf = res[c]["lf"], res[c]["hf"]
        ratios = [x[0] / y[0] for x, y in zip(lf, hf)]
        print(f"| {c[0]} | {c[1]} | {fmt([x[0] for x in lf], 0)} | {fmt([y[0] for y in hf], 0)} | {statistics.median(ratios):.2f}x | "
              f"{fmt([x[1] * 1e3 for x in lf], 0)} | {fmt([y[1] * 1e3 for y in hf], 0)} | {lf[0][2]} / {hf[0][2]} |")


if __name__ == "__main__":
    main()
