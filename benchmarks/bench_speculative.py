"""Prompt-lookup speculative decoding vs plain decode on SmolLM2-135M-Instruct (embedded ONNX Runtime backend):
tasks whose answer repeats its input (summarise, rewrite, extract), written as chat messages through the tokenizer's
chat template; same prompts, same process, same threads.

Plain: the model compiled as usual (decode 1 token per step). Prompt lookup: the same weights loaded as a target
(`qaic_config={"speculative_model_type": "target"}`) and compiled with `num_speculative_tokens=K` (decode verifies K + 1
positions per step). Both are greedy, so both produce the same tokens (checked). Reports decode tokens/s of each, their
ratio, the acceptance rate and the tokens per target step, with the machine (benchmarks/_machine.py: CPU, threads,
load average before/after).

Run: .venv/bin/python benchmarks/bench_speculative.py [--k 4] [--tokens 96] [--repeats 3] [--threads N] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

from _machine import Machine

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PASSAGE = ("On 12 March the Riverside Library opened its new reading room on the second floor. The room has forty "
           "desks, six computers and a quiet corner for children. Maria Lopez, the head librarian, said the project "
           "took two years and cost 180,000 euros, most of it paid by the city council. The room is open from 9 am to "
           "8 pm on weekdays and from 10 am to 4 pm on Saturdays. Visitors need a library card, which is free for "
           "residents and costs 15 euros a year for everyone else.")
TASKS = {
    "summarise": f"Summarise this text in two sentences, keeping its wording where you can:\n\n{PASSAGE}",
    "rewrite": f"Rewrite this text in the past tense and keep everything else the same:\n\n{PASSAGE}",
    "extract": f"Copy every sentence of this text that contains a number, one per line:\n\n{PASSAGE}",
}


def decode_rate(model, tok, prompt: str, tokens: int, repeats: int, **speculative):
    """(median decode tokens/s over `repeats` runs, the last run's result); the session is opened before timing."""
    rates, out = [], None
    for _ in range(repeats):
        out = model.generate(tok, [prompt], tokens, verbose=False, **speculative)
        rates.append(out.metrics.decode_tok_s)
    return statistics.median(rates), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens (prompt_lookup_num_tokens)")
    parser.add_argument("--tokens", type=int, default=96, help="new tokens per prompt (EOS may stop earlier)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores)")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args()
    machine = Machine.start(args.threads or os.cpu_count() or 1)
    if args.threads:
        os.environ["QEFF_LAB_THREADS"] = str(args.threads)
    import transformers

    from qeff_lab import QEFFAutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()  # no per-weight loading bars between the figures
    plain = QEFFAutoModelForCausalLM.from_pretrained(MODEL)
    target = QEFFAutoModelForCausalLM.from_pretrained(MODEL, qaic_config={"speculative_model_type": "target"})
    tok = plain.tokenizer
    prompts = {name: tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True) for name, text in TASKS.items()}
    longest = max(len(tok(p)["input_ids"]) for p in prompts.values())
    ctx = 1 << (longest + args.tokens).bit_length()
    plain.compile(prefill_seq_len=32, ctx_len=ctx)
    target.compile(prefill_seq_len=32, ctx_len=ctx, num_speculative_tokens=args.k)
    plain.generate(tok, ["warm-up"], 2, verbose=False)  # open both sessions before timing
    target.generate(tok, ["warm-up"], 2, verbose=False)
    rows = []
    for name, prompt in prompts.items():
        plain_rate, plain_out = decode_rate(plain, tok, prompt, args.tokens, args.repeats)
        pld_rate, pld_out = decode_rate(target, tok, prompt, args.tokens, args.repeats, prompt_lookup_num_tokens=args.k)
        m = pld_out.metrics
        rows.append({"task": name, "prompt_tokens": len(pld_out.prompt_ids[0]), "new_tokens": len(pld_out.ids[0]),
                     "identical": pld_out.ids == plain_out.ids, "plain_decode_tok_s": round(plain_rate, 1),
                     "prompt_lookup_decode_tok_s": round(pld_rate, 1), "ratio": round(pld_rate / plain_rate, 2),
                     "acceptance_rate": round(m.acceptance_rate, 3), "tokens_per_target_step":
                     round(m.mean_tokens_per_step, 2)})
    machine.finish()
    print(f"\nSmolLM2-135M-Instruct, prompt lookup k={args.k} vs plain decode, greedy, median of {args.repeats}")
    header = f"{'task':<10} {'prompt':>6} {'new':>4} {'same':>5} {'plain tok/s':>11} {'lookup tok/s':>12} " \
             f"{'ratio':>6} {'accepted':>8} {'tok/step':>8}"
    print(header)
    for r in rows:
        print(f"{r['task']:<10} {r['prompt_tokens']:>6} {r['new_tokens']:>4} {r['identical']!s:>5} "
              f"{r['plain_decode_tok_s']:>11} {r['prompt_lookup_decode_tok_s']:>12} {r['ratio']:>6} "
              f"{r['acceptance_rate']:>8.1%} {r['tokens_per_target_step']:>8}")
    ratio = statistics.geometric_mean(r["ratio"] for r in rows)
    print(f"geometric mean ratio {ratio:.2f}x")
    print(machine)
    if not all(r["identical"] for r in rows):
        raise SystemExit("prompt lookup changed the greedy tokens: this is a bug")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine.to_json(), "k": args.k, "rows": rows, "geomean_ratio": ratio}, f, indent=1)


if __name__ == "__main__":
    main()
