"""`qeff-lab infer`: generate with a causal LM on the embedded (or device) backend; also the demo's LM section."""
from __future__ import annotations

import argparse
import json
import sys

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def register(subparsers) -> None:
    p = subparsers.add_parser("infer", help="generate text with a causal LM (KV cache retained between steps)")
    p.add_argument("--model", "--model-name", dest="model", default=SMOLLM2, help="hub card or local folder")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompts-file", default=None, help="a text file with one prompt per line (blank lines skipped)")
    p.add_argument("--prompt-len", type=int, default=32, help="compiled prefill chunk length (seq_len)")
    p.add_argument("--ctx-len", type=int, default=128, help="compiled context length (KV cache size)")
    p.add_argument("--generation-len", type=int, default=None,
                   help="new tokens per prompt (default: as many as the context allows; clamped to it)")
    p.add_argument("--batch-size", type=int, default=1, help="compiled batch size (more prompts: several batches)")
    p.add_argument("--num-cores", type=int, default=16)
    p.add_argument("--backend", default=None, choices=["qaic", "onnxruntime"])
    p.add_argument("--mxfp6-matmul", action="store_true")
    p.add_argument("--mxint8-kv-cache", action="store_true")
    p.add_argument("--full-batch-size", type=int, default=None,
                   help="continuous batching: this many KV slots; requests share them, a finished one hands its slot "
                        "to the next waiting prompt")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy (HF's meanings below)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="makes sampled runs reproducible")
    p.add_argument("--prompt-lookup", type=int, default=None, metavar="K",
                   help="speculative decoding by prompt lookup: K tokens proposed per step from an n-gram match in the "
                        "prompt and text so far (no draft model); greedy, batch 1, same tokens as plain greedy")
    p.add_argument("--draft-model", default=None, metavar="CARD",
                   help="speculative decoding with this draft model (same tokenizer as --model)")
    p.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                   help="with --draft-model: tokens the draft proposes per target step (default 4)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--stream", action="store_true", help="print text as it is produced")
    p.add_argument("--json", action="store_true", help="print JSON (texts, ids, metrics) instead of a summary")
    p.set_defaults(func=cmd_infer)


def _chat(tokenizer, prompts: list[str]) -> list[str]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat: this tokenizer has no chat template; leave --chat out.")
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts]


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE (one prompt per line).")
    return prompts


def _speculative(args: argparse.Namespace) -> int | None:
    """k, the tokens verified per target step, when speculative decoding was asked for (checked before loading)."""
    if args.num_speculative_tokens is not None and args.draft_model is None:
        raise ValueError("--num-speculative-tokens goes with --draft-model CARD (with --prompt-lookup K, K is the "
                         "number of tokens proposed).")
    if args.prompt_lookup is not None and args.draft_model is not None:
        raise ValueError("give either --prompt-lookup K (no draft model) or --draft-model CARD, not both.")
    k = args.prompt_lookup if args.draft_model is None else (args.num_speculative_tokens or 4)
    if k is None:
        return None
    if k < 1:
        raise ValueError(f"{'--prompt-lookup' if args.draft_model is None else '--num-speculative-tokens'} must be at "
                         f"least 1 (tokens proposed per target step), got {k}.")
    clash = [flag for flag, on in (("--full-batch-size", args.full_batch_size is not None),
                                   ("--do-sample", args.do_sample), ("--batch-size", args.batch_size != 1)) if on]
    if clash:
        raise ValueError(f"speculative decoding (greedy, batch 1) does not combine with {', '.join(clash)}: leave "
                         f"{'it' if len(clash) == 1 else 'them'} out, or drop --prompt-lookup / --draft-model.")
    return k


def cmd_infer(args: argparse.Namespace) -> int:
    from qeff_lab import QEFFAutoModelForCausalLM

    args.prompt = _prompts(args)
    k = _speculative(args)
    cb = args.full_batch_size is not None
    model = QEFFAutoModelForCausalLM.from_pretrained(
        args.model, continuous_batching=cb, **({"qaic_config": {"speculative_model_type": "target"}} if k else {}))
    shapes = {"prefill_seq_len": args.prompt_len, "ctx_len": args.ctx_len, "num_cores": args.num_cores,
              "mxfp6_matmul": args.mxfp6_matmul, "mxint8_kv_cache": args.mxint8_kv_cache, "backend": args.backend}
    model.compile(batch_size=args.batch_size, **shapes, **({"full_batch_size": args.full_batch_size} if cb else {}),
                  **({"num_speculative_tokens": k} if k else {}))
    speculative = {}
    if args.draft_model is not None:
        draft = QEFFAutoModelForCausalLM.from_pretrained(args.draft_model)
        model.check_draft_model(draft, model.tokenizer)  # before compiling it
        draft.compile(**shapes)
        speculative = {"draft_model": draft, "num_speculative_tokens": k}
    elif k:
        speculative = {"prompt_lookup_num_tokens": k}
    tokenizer = model.tokenizer
    prompts = _chat(tokenizer, args.prompt) if args.chat else args.prompt
    out = model.generate(tokenizer, prompts, generation_len=args.generation_len,
                         stream=args.stream and not args.json, verbose=not args.json,
                         do_sample=args.do_sample or None, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, **speculative)
    if args.json:
        m = out.metrics
        metrics = {"ttft_s": m.ttft_s, "decode_tok_s": m.decode_tok_s, "total_tok_s": m.total_tok_s, "e2e_s": m.e2e_s,
                   "generated_tokens": m.generated_tokens}
        if k:
            metrics.update(drafter=m.drafter, num_speculative_tokens=m.num_speculative_tokens,
                           proposed_tokens=m.proposed_tokens, accepted_tokens=m.accepted_tokens,
                           acceptance_rate=m.acceptance_rate, target_steps=m.target_steps,
                           mean_tokens_per_step=m.mean_tokens_per_step)
        json.dump({"model": args.model, "backend": m.backend, "prompts": args.prompt, "texts": out.texts,
                   "ids": out.ids, "metrics": metrics}, sys.stdout)
        print()
        return 0
    if not args.stream:
        for prompt, text in zip(args.prompt, out.texts):
            print(f"Prompt: {prompt}\nCompletion: {text}\n")
    return 0


def demo() -> None:
    """The demo's causal-LM section: SmolLM2, transformed, exported, compiled, one short chat answer, and the
    same answer from HF generate for comparison."""
    import torch
    from transformers import AutoModelForCausalLM

    from qeff_lab import QEFFAutoModelForCausalLM

    print(f"\n== Causal LM: {SMOLLM2}, KV cache retained between steps, embedded backend ==")
    model = QEFFAutoModelForCausalLM.from_pretrained(SMOLLM2)
    model.compile(prefill_seq_len=32, ctx_len=128)
    tokenizer = model.tokenizer
    prompt = _chat(tokenizer, ["What is the capital of France?"])
    out = model.generate(tokenizer, prompt, generation_len=32, verbose=False)
    for report in model.steps.values():
        print(f"  {report.step:<10} {report.status:<7} {report.seconds:6.2f}s  {report.summary}")
    for row in model.swap_report.summary_frame().itertuples():
        print(f"    {row.before} -> {row.after} ({row.status}) x{row.count}")
    print(f"  compile folder: {model.compile_result.folder}")
    print(f"  answer: {out.texts[0]!r}")
    m = out.metrics
    print(f"  time to first token {m.ttft_s:.3f} s, decode {m.decode_tok_s:.1f} tokens/s, "
          f"{m.generated_tokens} tokens in {m.e2e_s:.2f} s")
    hf = AutoModelForCausalLM.from_pretrained(model.resolved.path, dtype=torch.float32).eval()
    ids = tokenizer(prompt[0], return_tensors="pt")
    with torch.no_grad():
        ref = hf.generate(**ids, max_new_tokens=len(out.ids[0]), do_sample=False)[0, ids["input_ids"].shape[1]:].tolist()
    same = sum(a == b for a, b in zip(out.ids[0], ref))
    print(f"  parity vs HF generate: {same}/{len(out.ids[0])} tokens identical")
