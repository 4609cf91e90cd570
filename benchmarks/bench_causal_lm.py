"""Causal LM speed: qeff_lab (compiled, embedded ONNX Runtime backend, KV cache retained between steps) vs HF
`generate` (eager, fp32) on SmolLM2-135M-Instruct: same prompts, same process, same thread count.

Reports decode tokens/s and time to first token for both, as ratios, and the decode rate as a fraction of the
memory-bandwidth bound: (weight bytes read per token) against a matrix-vector bandwidth measured on this machine
with the same threads. EOS is ignored on both sides so every run decodes the same number of tokens.

Run: .venv/bin/python benchmarks/bench_causal_lm.py [--tokens 64] [--repeats 3] [--threads N] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Why is the sky blue?",
             "Give me three tips for learning to code."]


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step must read: every Linear (the LM head included, once even when tied) and
    norm; an embedding lookup reads one row, so the table counts only through a tied LM head."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total


def matvec_bandwidth(threads: int, mib: int = 256, repeats: int = 7) -> float:
    """Bytes/s of an fp32 matrix-vector product over a `mib` MiB matrix (far larger than the caches)."""
    torch.set_num_threads(threads)
    n = int((mib * 2**20 / 4) ** 0.5)
    w, x = torch.randn(n, n), torch.randn(n)
    torch.mv(w, x)
    best = min(_timed(lambda: torch.mv(w, x)) for _ in range(repeats))
    return w.numel() * 4 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def hf_rates(hf, prompt_ids: list[list[int]], tokens: int, repeats: int) -> tuple[float, float]:
    """(median TTFT s, median decode tokens/s): generate(1) is the prefill; generate(N) - generate(1) decodes N-1."""
    ttfts, rates = [], []
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        for ids in prompt_ids:
            x = torch.tensor([ids])
            mask = torch.ones_like(x)
            hf.generate(x, attention_mask=mask, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
            for _ in range(repeats):
                t1 = _timed(lambda: hf.generate(x, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, **kw))
                tn = _timed(lambda: hf.generate(x, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                                                **kw))
                ttfts.append(t1)
                rates.append((tokens - 1) / max(tn - t1, 1e-9))
    return statistics.median(ttfts), statistics.median(rates)


def qeff_rates(model, prompt_ids: list[list[int]], tokens: int, repeats: int) -> tuple[float, float, list]:
    from qeff_lab.runtime.generation import generate_ids

    runner = model.runner()
    generate_ids(runner, prompt_ids[:1], 2)  # warm-up
    ttfts, rates, outputs = [], [], []
    for ids in prompt_ids:
        for _ in range(repeats):
            out, _, m = generate_ids(runner, [ids], tokens)  # eos_token_ids=None: exactly `tokens` tokens
            ttfts.append(m.ttft_s)
            rates.append(m.decode_tok_s)
        outputs.append(out[0])
    return statistics.median(ttfts), statistics.median(rates), outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--ctx-len", type=int, default=256)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()

    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    os.environ["QEFF_LAB_THREADS"] = str(args.threads)  # ONNX Runtime intra-op threads
    torch.set_num_threads(args.threads)
    from qeff_lab import QEFFAutoModelForCausalLM

    steps = tqdm(total=5, desc="bench", unit="step")
    model = QEFFAutoModelForCausalLM.from_pretrained(MODEL)
    model.compile(prefill_seq_len=32, ctx_len=args.ctx_len, batch_size=1)
    steps.update(1)
    tok = model.tokenizer
    prompt_ids = [tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                              add_generation_prompt=True))["input_ids"] for q in QUESTIONS]
    hf = AutoModelForCausalLM.from_pretrained(model.resolved.path, dtype=torch.float32).eval()
    steps.update(1)
    q_ttft, q_rate, q_out = qeff_rates(model, prompt_ids, args.tokens, args.repeats)
    steps.update(1)
    h_ttft, h_rate = hf_rates(hf, prompt_ids, args.tokens, args.repeats)
    steps.update(1)
    bandwidth = matvec_bandwidth(args.threads)
    steps.update(1)
    steps.close()

    with torch.no_grad():  # the compared runs produce the same tokens
        same = all(hf.generate(torch.tensor([p]), max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() == o
                   for p, o in zip(prompt_ids[:1], q_out[:1]))
    per_token = weight_bytes_per_token(hf)
    bound = bandwidth / per_token
    figures = {
        "model": MODEL, "threads": args.threads, "tokens": args.tokens, "ctx_len": args.ctx_len,
        "prompts": len(prompt_ids), "prompt_tokens": [len(p) for p in prompt_ids], "load_average": os.getloadavg(),
        "qeff_ttft_s": q_ttft, "hf_ttft_s": h_ttft, "ttft_speedup": h_ttft / q_ttft,
        "qeff_decode_tok_s": q_rate, "hf_decode_tok_s": h_rate, "decode_ratio": q_rate / h_rate,
        "weight_bytes_per_token": per_token, "matvec_bandwidth_GBps": bandwidth / 1e9,
        "bandwidth_bound_tok_s": bound, "qeff_fraction_of_bound": q_rate / bound, "hf_fraction_of_bound": h_rate / bound,
        "first_prompt_tokens_identical": same,
    }
    print(f"\nSmolLM2-135M, {args.threads} thread(s), {args.tokens} new tokens x {len(prompt_ids)} prompts, "
          f"median of {args.repeats} (load average {figures['load_average'][0]:.1f})")
    print(f"  time to first token  qeff_lab {q_ttft * 1000:7.1f} ms   HF {h_ttft * 1000:7.1f} ms   "
          f"-> ratio {figures['ttft_speedup']:.2f}x (HF time / qeff_lab time; > 1 is faster)")
    print(f"  decode               qeff_lab {q_rate:7.1f} tok/s  HF {h_rate:7.1f} tok/s  -> ratio {figures['decode_ratio']:.2f}x (goal >= 1.5x)")
    print(f"  bandwidth bound      {per_token / 2**20:.0f} MiB of weights per token, mat-vec {bandwidth / 1e9:.1f} GB/s "
          f"-> {bound:.1f} tok/s; qeff_lab at {figures['qeff_fraction_of_bound']:.0%}, HF at "
          f"{figures['hf_fraction_of_bound']:.0%}")
    print(f"  same tokens as HF (first prompt): {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
