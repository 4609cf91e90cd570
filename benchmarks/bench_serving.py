"""Serving throughput on SmolLM2-135M-Instruct: 32 chat prompts of mixed lengths, each with its own number of new
tokens, served three ways in one process with the same threads:

    continuous batching   qeff_lab, compile(full_batch_size=F): a finished request hands its slot on at once
    static batches        qeff_lab, compile(batch_size=F): successive batches of F, each waits for its longest
    HF generate           transformers, batches of F left-padded, max_new_tokens = the batch's longest

Every run produces the same useful tokens (each prompt's own count, EOS ignored); total tokens/s = those tokens
over the wall time, reported with the ratios. Greedy, so continuous batching and static batches must give the
same tokens (checked). Prints the machine (benchmarks/_machine.py: CPU model, threads, load average before and
after): figures on a busy machine are noisy.

Run: .venv/bin/python benchmarks/bench_serving.py [--prompts 32] [--full-batch-size 4] [--threads N] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time

from _machine import Machine

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TOPICS = ["the sea", "a city at night", "learning to code", "the history of bread", "why the sky is blue",
          "a dragon and a knight", "how bicycles stay upright", "the planet Mars", "a rainy Sunday", "chess openings",
          "the water cycle", "a lighthouse keeper", "volcanoes", "the first computers", "autumn leaves", "honeybees"]
ASKS = ["Answer in one word: what colour is {t}?", "Write one sentence about {t}.",
        "Explain {t} to a ten-year-old, in a short paragraph with an example and a question at the end.",
        "Write a short poem about {t}. Use vivid images, a clear rhythm, and end on a surprising line that makes "
        "the reader think again about everything before it."]


def workload(tok, n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """`n` chat prompts of mixed lengths and, per prompt, a number of new tokens between 4 and 64."""
    rng = random.Random(seed)
    texts = [tok.apply_chat_template([{"role": "user", "content": ASKS[i % len(ASKS)].format(t=TOPICS[i % len(TOPICS)])}],
                                     tokenize=False, add_generation_prompt=True) for i in range(n)]
    return texts, [rng.choice([4, 8, 16, 32, 64]) for _ in range(n)]


def run_hf(hf, tok, prompt_ids: list[list[int]], gen: list[int], batch: int) -> tuple[float, list[list[int]]]:
    import torch

    out, start = [], time.perf_counter()
    for s in range(0, len(prompt_ids), batch):
        rows, lens = prompt_ids[s:s + batch], gen[s:s + batch]
        width = max(map(len, rows))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        with torch.no_grad():
            new = hf.generate(ids, attention_mask=mask, max_new_tokens=max(lens), min_new_tokens=max(lens),
                              do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)[:, width:]
        out += [new[i, :n].tolist() for i, n in enumerate(lens)]
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--full-batch-size", type=int, default=4)
    parser.add_argument("--prefill-seq-len", type=int, default=32)
    parser.add_argument("--ctx-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    machine = Machine.start(args.threads)
    os.environ["QEFF_LAB_THREADS"] = str(args.threads)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qeff_lab import QEFFAutoModelForCausalLM
    from qeff_lab.loading import resolve

    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    path = str(resolve(MODEL).path)
    tok = AutoTokenizer.from_pretrained(path)
    texts, gen = workload(tok, args.prompts)
    prompt_ids = [tok(t)["input_ids"] for t in texts]
    F, shapes = args.full_batch_size, dict(prefill_seq_len=args.prefill_seq_len, ctx_len=args.ctx_len)
    print(f"workload: {len(texts)} prompts of {min(map(len, prompt_ids))}-{max(map(len, prompt_ids))} tokens, "
          f"{min(gen)}-{max(gen)} new tokens each ({sum(gen)} in all); {F} at a time")

    cb = QEFFAutoModelForCausalLM.from_pretrained(path, continuous_batching=True)
    cb.compile(full_batch_size=F, **shapes)
    static = QEFFAutoModelForCausalLM.from_pretrained(path)
    static.compile(batch_size=F, **shapes)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for m in (cb, static):  # warm up the sessions (first-call allocation)
        m.generate_from_ids(prompt_ids[:1], 2)

    results = {}
    for name, fn in [("continuous batching", lambda: cb.generate_from_ids(prompt_ids, gen)),
                     ("static batches", lambda: static.generate_from_ids(prompt_ids, gen))]:
        t = time.perf_counter()
        out = fn()
        results[name] = (time.perf_counter() - t, out.ids)
    results["HF generate (padded)"] = run_hf(hf, tok, prompt_ids, gen, F)
    assert all(len(ids) == n for _, o in results.values() for ids, n in zip(o, gen))
    same = results["continuous batching"][1] == results["static batches"][1]

    machine.finish()
    useful = sum(gen)
    rates = {name: useful / seconds for name, (seconds, _) in results.items()}
    base = rates["continuous batching"]
    print(f"{'':24s} {'seconds':>8s} {'tokens/s':>9s} {'CB speed-up':>12s}")
    for name, (seconds, _) in results.items():
        print(f"{name:24s} {seconds:8.2f} {rates[name]:9.1f} {base / rates[name]:11.2f}x")
    print(f"continuous batching and static batches give identical tokens: {same}")
    print(machine)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine.to_json(), "prompts": len(texts), "new_tokens": gen, "full_batch_size": F,
                       "seconds": {k: v[0] for k, v in results.items()}, "tokens_per_s": rates,
                       "identical_cb_static": same}, f, indent=1)


if __name__ == "__main__":
    main()
