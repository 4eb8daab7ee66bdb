"""Drive `lorafleet serve` with the official OpenAI Python client (cli/tests/serve.rs).

Usage: serve_client_check.py BASE_URL EXPECT.json

EXPECT.json: {"models": [ids that must be listed],
              "chat": [{"model", "question", "answer"}],      answers of `lorafleet generate`
              "raw": [{"model", "prompt", "text"}],            answers of `lorafleet generate --raw`
              "max_new_tokens": N, "context": model context length,
              "distinct": [models whose answers to the first question must all differ]}
Prints one line per check; exits non-zero on the first failure.
"""

import json
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
from openai import OpenAI


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", flush=True)
        sys.exit(1)
    print(f"ok: {what}", flush=True)


def main():
    base, expect_path = sys.argv[1], sys.argv[2]
    with open(expect_path) as f:
        exp = json.load(f)
    n = exp["max_new_tokens"]
    client = OpenAI(base_url=base, api_key="test-key", max_retries=0, timeout=300)

    listed = {m.id for m in client.models.list().data}
    check(set(exp["models"]) <= listed, f"models listed {sorted(listed)} include {exp['models']}")

    def chat(case, stream=False):
        msgs = [{"role": "user", "content": case["question"]}]
        if not stream:
            r = client.chat.completions.create(model=case["model"], messages=msgs, temperature=0, max_tokens=n)
            return r.choices[0].message.content, r
        parts, finish = [], None
        for chunk in client.chat.completions.create(model=case["model"], messages=msgs, temperature=0, max_tokens=n, stream=True):
            for c in chunk.choices:
                if c.delta.content:
                    parts.append(c.delta.content)
                finish = c.finish_reason or finish
        return "".join(parts), finish

    first = exp["chat"][0]
    text, r = chat(first)
    check(text == first["answer"], f"chat {first['model']}: {text!r} == generate's {first['answer']!r}")
    check(r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0, f"chat usage {r.usage}")
    text, finish = chat(first, stream=True)
    check(text == first["answer"] and finish in ("stop", "length"), f"streamed chat {text!r} (finish {finish})")

    for case in exp["raw"]:
        r = client.completions.create(model=case["model"], prompt=case["prompt"], temperature=0, max_tokens=n)
        check(r.choices[0].text == case["text"], f"completion {case['model']}: {r.choices[0].text!r} == {case['text']!r}")
        streamed = "".join(c.choices[0].text for c in client.completions.create(model=case["model"], prompt=case["prompt"], temperature=0, max_tokens=n, stream=True) if c.choices)
        check(streamed == case["text"], f"streamed completion {streamed!r}")

    # One concurrent burst: every case at once, adapters mixed in the same batches.
    burst = exp["chat"] * 2
    with ThreadPoolExecutor(max_workers=len(burst)) as pool:
        got = list(pool.map(lambda ic: chat(ic[1], stream=ic[0] % 2 == 1)[0], enumerate(burst)))
    for case, text in zip(burst, got):
        check(text == case["answer"], f"burst {case['model']} {case['question']!r}: {text!r} == {case['answer']!r}")
    answers = {c["model"]: c["answer"] for c in exp["chat"] if c["question"] == first["question"] and c["model"] in exp.get("distinct", [])}
    check(len(set(answers.values())) == len(answers), f"adapters trained on different answers answer differently: {answers}")

    def after_error(what):
        t, _ = chat(first)
        check(t == first["answer"], f"still serving after {what}")

    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
        check(False, "unknown model refused")
    except openai.NotFoundError as e:
        check(e.status_code == 404 and e.body.get("code") == "model_not_found" and "no-such-model" in e.body.get("message", ""), f"unknown model: 404 {e.body}")
    after_error("an unknown model")

    req = urllib.request.Request(base + "/chat/completions", data=b'{"model": "x", "messages": [', headers={"content-type": "application/json", "authorization": "Bearer test-key"})
    try:
        urllib.request.urlopen(req)
        check(False, "malformed JSON refused")
    except urllib.error.HTTPError as e:
        body = json.loads(e.read())
        check(e.code == 400 and "not valid JSON" in body["error"]["message"] and body["error"]["type"] == "invalid_request_error", f"malformed JSON: 400 {body}")
    after_error("malformed JSON")

    long_prompt = "word " * (exp["context"] + 10)
    try:
        client.completions.create(model=first["model"], prompt=long_prompt, max_tokens=4)
        check(False, "over-long prompt refused")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and e.body.get("code") == "context_length_exceeded", f"over-long prompt: 400 {e.body.get('message')}")
    after_error("an over-long prompt")

    try:
        client.chat.completions.create(model=first["model"], messages=[{"role": "user", "content": first["question"]}], max_tokens=exp["context"] * 4)
        check(False, "too many tokens refused")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and e.body.get("param") == "max_tokens", f"too many tokens: 400 {e.body.get('message')}")
    try:
        client.chat.completions.create(model=first["model"], messages=[{"role": "user", "content": "hi"}], temperature=5)
        check(False, "temperature out of range refused")
    except openai.BadRequestError as e:
        check(e.body.get("param") == "temperature", f"bad temperature: 400 {e.body.get('message')}")
    after_error("bad parameters")

    # Sampling is seeded: the same seed gives the same text.
    a = client.completions.create(model=first["model"], prompt="The", temperature=1.0, top_p=0.9, seed=7, max_tokens=12).choices[0].text
    b = client.completions.create(model=first["model"], prompt="The", temperature=1.0, top_p=0.9, seed=7, max_tokens=12).choices[0].text
    check(a == b, f"seeded sampling repeats: {a!r}")
    stop = first["answer"].split()[2] if len(first["answer"].split()) > 2 else None
    if stop:
        r = client.chat.completions.create(model=first["model"], messages=[{"role": "user", "content": first["question"]}], temperature=0, max_tokens=n, stop=[stop])
        want = first["answer"][: first["answer"].index(stop)]
        check(r.choices[0].message.content == want and r.choices[0].finish_reason == "stop", f"stop sequence {stop!r}: {r.choices[0].message.content!r}")
    print("all checks passed", flush=True)


if __name__ == "__main__":
    main()
