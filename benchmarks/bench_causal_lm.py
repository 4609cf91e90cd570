"""Causal LM speed, every figure a ratio measured in one run: qeff_lab's embedded ONNX Runtime backend (its own
compile result: the GroupQueryAttention graph, and the exported graph for comparison) vs HF `generate` (eager,
fp32) and, when installed, onnxruntime-genai's fp32 model of the same weights, on SmolLM2-135M-Instruct: same
prompts, same process, same thread count. EOS is ignored everywhere, so every run decodes the same tokens.

- decode tokens/s, batch 1 and a padded batch (prompts of different lengths, right-padded on qeff_lab, left-padded
  with an attention mask on HF), as ratios and as a fraction of the weight-read floor: (weight bytes one step
  reads) against an fp32 matrix-vector product over 256 MiB on this machine with the same threads;
- time to first token for a 16-token and a 128-token prompt (compiled with prefill_seq_len 128; the GQA graph
  runs only a prompt's real tokens, so a short prompt does not pay for the padding).
- the bound each figure has on this machine: the graph's weight MatMuls alone in ONNX Runtime, one row (a decode
  step) and 16 / 128 rows (a prefill), same shapes and session options (benchmarks/_floors.py).
Each figure is measured until two consecutive medians agree within 5% (benchmarks/_machine.py), or says it could
not; the machine line gives the CPU and the load average before and after.

Run: .venv/bin/python benchmarks/bench_causal_lm.py [--tokens 64] [--threads N] [--batch 4] [--json out.json]
     (--per-round/--max-rounds: samples per median and rounds before it says a figure is not stable)
Optional peer: pip install onnxruntime-genai (its model builder runs offline on the local HF folder; the built
model is cached under the qeff_lab artifact cache).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _floors import MatMulFloor
from _machine import Machine, measure_until_stable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Why is the sky blue?",
             "Give me three tips for learning to code."]
LONG_TEXT = ("The history of computing is a story of people who wanted to calculate faster and with fewer errors. "
             "From the abacus to mechanical calculators, from punched cards to vacuum tubes, every generation of "
             "machines took on work that had been done by hand. ") * 8
GENAI_HINT = "pip install onnxruntime-genai  (then rerun: the fp32 model is built offline from the local HF folder)"


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


def matvec_bandwidth(threads: int, mib: int = 256) -> float:
    """Bytes/s of an fp32 matrix-vector product over a `mib` MiB matrix (far larger than the caches)."""
    torch.set_num_threads(threads)
    n = int((mib * 2**20 / 4) ** 0.5)
    w, x = torch.randn(n, n), torch.randn(n)
    torch.mv(w, x)
    m = measure_until_stable(lambda: _timed(lambda: torch.mv(w, x)), per_round=5)
    return w.numel() * 4 / m.value, m


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ----------------------------------------------------------------------------- one sample of each side
def hf_decode(hf, prompts: list[list[int]], tokens: int) -> tuple[float, float]:
    """(time to first token s, decode tokens/s over all rows): generate(1) is the prefill, generate(N) - generate(1)
    decodes N - 1 tokens per row. Several prompts: left-padded batch with an attention mask."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw = {"attention_mask": mask, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    with torch.no_grad():
        t1 = _timed(lambda: hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw))
        tn = _timed(lambda: hf.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kw))
    return t1, len(prompts) * (tokens - 1) / max(tn - t1, 1e-9)


def hf_tokens(hf, prompt: list[int], tokens: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    return out[0, len(prompt):].tolist()


def qeff_run(runner, prompts: list[list[int]], tokens: int):
    from qeff_lab.runtime.generation import generate_ids

    return generate_ids(runner, prompts, tokens)  # eos_token_ids=None: exactly `tokens` tokens per prompt


class GenaiPeer:
    """onnxruntime-genai's fp32 CPU model of the same weights (built once, cached)."""

    def __init__(self, hf_folder: Path, threads: int):
        import onnxruntime_genai as og

        from qeff_lab.pipeline import cache_root

        key = hashlib.sha256(f"{hf_folder}:{og.__version__}".encode()).hexdigest()[:16]
        out = cache_root() / "peers" / f"ort-genai-fp32-{key}"
        if not (out / "genai_config.json").is_file():
            tmp = out.with_name(out.name + ".tmp")
            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder), "-o",
                            str(tmp), "-p", "fp32", "-e", "cpu", "-c", str(tmp / "_cache")], check=True,
                           stdout=subprocess.DEVNULL)
            tmp.rename(out)
        config = json.loads((out / "genai_config.json").read_text())
        config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
        (out / "genai_config.json").write_text(json.dumps(config, indent=1))
        self.og, self.model, self.version = og, og.Model(str(out)), og.__version__

    def run(self, prompt: list[int], tokens: int) -> tuple[float, float, list[int]]:
        """(time to first token s, decode tokens/s, tokens)."""
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt) + tokens, min_length=len(prompt) + tokens, do_sample=False)
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens([prompt])
        gen.generate_next_token()
        out = [int(gen.get_next_tokens()[0])]
        t1 = time.perf_counter()
        while len(out) < tokens:
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        return t1 - t0, (tokens - 1) / (time.perf_counter() - t1), out


def genai_peer(hf_folder: Path, threads: int):
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return None
    return GenaiPeer(hf_folder, threads)


# ----------------------------------------------------------------------------- the run
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--ctx-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="rows of the padded batch")
    parser.add_argument("--per-round", type=int, default=3, help="samples per round (a median each)")
    parser.add_argument("--max-rounds", type=int, default=5, help="rounds before giving up on stability")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    machine = Machine.start(args.threads)

    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    os.environ["QEFF_LAB_THREADS"] = str(args.threads)  # ONNX Runtime intra-op threads
    torch.set_num_threads(args.threads)
    from qeff_lab import QEFFAutoModelForCausalLM
    from qeff_lab.runtime.kv_session import OrtKVSession

    bar = tqdm(total=10, desc="bench", unit="step")
    model = QEFFAutoModelForCausalLM.from_pretrained(MODEL)
    tok = model.tokenizer
    chats = [tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                         add_generation_prompt=True))["input_ids"] for q in QUESTIONS]
    long_ids = tok(LONG_TEXT)["input_ids"]
    ttft_prompts = {16: long_ids[:16], 128: long_ids[:128]}
    batch_prompts = (chats * args.batch)[:args.batch]
    model.compile(prefill_seq_len=128, ctx_len=args.ctx_len, batch_size=1)
    graph = model.compile_result.ort_graph
    one = model.runner()
    exported = OrtKVSession(model.compile_result.onnx_path, model.compile_result.specializations)
    model.compile(prefill_seq_len=128, ctx_len=args.ctx_len, batch_size=args.batch)
    batched = model.runner()
    hf = AutoModelForCausalLM.from_pretrained(model.resolved.path, dtype=torch.float32).eval()
    bar.update(1)
    for r in (one, exported, batched):
        qeff_run(r, chats[:1], 2)  # warm-up
    hf_decode(hf, chats[:1], 2)

    p = chats[0]
    figs = {}
    stable = functools.partial(measure_until_stable, per_round=args.per_round, max_rounds=args.max_rounds)

    def rate(runner, prompts):
        return lambda: qeff_run(runner, prompts, args.tokens)[2].decode_tok_s

    figs["decode_1_gqa"] = stable(rate(one, [p]))
    bar.update(1)
    figs["decode_1_exported"] = stable(rate(exported, [p]))
    bar.update(1)
    figs["decode_1_hf"] = stable(lambda: hf_decode(hf, [p], args.tokens)[1])
    bar.update(1)
    figs["decode_b_gqa"] = stable(rate(batched, batch_prompts))
    bar.update(1)
    figs["decode_b_hf"] = stable(lambda: hf_decode(hf, batch_prompts, args.tokens)[1])
    bar.update(1)
    for n, prompt in ttft_prompts.items():
        figs[f"ttft_{n}_gqa"] = stable(lambda prompt=prompt: qeff_run(one, [prompt], 1)[2].ttft_s)
        figs[f"ttft_{n}_hf"] = stable(lambda prompt=prompt: hf_decode(hf, [prompt], 1)[0])
    bar.update(1)
    peer = genai_peer(Path(model.resolved.path), args.threads)
    peer_same = None
    if peer is not None:
        peer.run(p, 2)
        figs["decode_1_genai"] = stable(lambda: peer.run(p, args.tokens)[1])
        peer_same = peer.run(p, args.tokens)[2] == hf_tokens(hf, p, args.tokens)
    bar.update(1)
    bandwidth, bw_m = matvec_bandwidth(args.threads)
    bar.update(1)
    # the graph's weight MatMuls alone in ONNX Runtime (the LM head on one row: the graph computes only the last
    # position's logits): what no graph on these kernels can beat (benchmarks/_floors.py)
    result = model.compile_result
    graph_path = result.folder / graph["path"] if graph.get("graph") == "gqa" else result.onnx_path
    vocab = hf.config.vocab_size
    mm = MatMulFloor(graph_path, result.onnx_path.parent, args.threads, one_row=lambda k, n: n == vocab)
    figs["matmuls_1"] = stable(lambda: mm.seconds(1))
    for n in ttft_prompts:
        figs[f"matmuls_{n}"] = stable(lambda n=n: mm.seconds(n))
    bar.update(1)
    bar.close()

    # the compared runs produce the same tokens (greedy, EOS ignored)
    same_1 = qeff_run(one, [p], args.tokens)[0][0] == hf_tokens(hf, p, args.tokens)
    batch_out = qeff_run(batched, batch_prompts, args.tokens)[0]
    same_b = all(o == hf_tokens(hf, q, args.tokens) for o, q in zip(batch_out, batch_prompts))
    machine.finish()

    per_token = weight_bytes_per_token(hf)
    floor = bandwidth / per_token  # decode steps/s if a step only read the weights once
    v = {k: m.value for k, m in figs.items()}
    ratio = lambda a, b: v[a] / v[b]
    print(f"\nSmolLM2-135M fp32, {args.tokens} new tokens, ctx_len {args.ctx_len}, prefill_seq_len 128")
    print(machine)
    print(f"embedded backend graph: {graph['graph']} ({graph['why']}; max |logit diff| vs exported graph "
          f"{graph['max_logit_diff']})")
    print(f"weight-read floor: {per_token / 2**20:.0f} MiB per step, mat-vec {bandwidth / 1e9:.1f} GB/s "
          f"({bw_m.note}) -> {floor:.1f} steps/s")
    rows = [("decode batch 1      qeff_lab (GQA graph)", "decode_1_gqa", "tok/s"),
            ("decode batch 1      qeff_lab (exported graph)", "decode_1_exported", "tok/s"),
            ("decode batch 1      HF eager", "decode_1_hf", "tok/s"),
            (f"decode batch {args.batch} pad  qeff_lab (GQA graph)", "decode_b_gqa", "tok/s"),
            (f"decode batch {args.batch} pad  HF eager", "decode_b_hf", "tok/s"),
            *((f"TTFT {n:3d}-token     qeff_lab (GQA graph)", f"ttft_{n}_gqa", "ms") for n in ttft_prompts),
            *((f"TTFT {n:3d}-token     HF eager", f"ttft_{n}_hf", "ms") for n in ttft_prompts),
            *((("decode batch 1      onnxruntime-genai fp32", "decode_1_genai", "tok/s"),) if peer else ())]
    for label, key, unit in rows:
        val = v[key] * 1000 if unit == "ms" else v[key]
        print(f"  {label:<46} {val:8.1f} {unit:<5}  [{figs[key].note}]")
    print("ratios (same run):")
    print(f"  decode batch 1: {ratio('decode_1_gqa', 'decode_1_hf'):.2f}x HF (goal >= 1.8x), "
          f"{ratio('decode_1_gqa', 'decode_1_exported'):.2f}x the exported graph, "
          f"{v['decode_1_gqa'] / floor:.0%} of the weight-read floor (goal >= 90%; HF at {v['decode_1_hf'] / floor:.0%})")
    print(f"  decode batch {args.batch} padded: {ratio('decode_b_gqa', 'decode_b_hf'):.2f}x HF (goal >= 1.8x), "
          f"{v['decode_b_gqa'] / args.batch / floor:.0%} of the weight-read floor in steps/s")
    for n in ttft_prompts:
        print(f"  time to first token, {n}-token prompt: {ratio(f'ttft_{n}_gqa', f'ttft_{n}_hf'):.2f}x HF's "
              "time (goal <= 0.7x)")
    if peer:
        print(f"  decode batch 1: {ratio('decode_1_gqa', 'decode_1_genai'):.2f}x onnxruntime-genai {peer.version} "
              f"(goal >= 1.5x); its tokens equal HF's: {peer_same}")
    else:
        print(f"  onnxruntime-genai peer skipped (not installed): {GENAI_HINT}")
    step = v["matmuls_1"]
    print(f"ONNX Runtime's fp32 MatMuls alone ({mm.describe()}, same shapes and session options as the graph; "
          "no graph on these kernels is faster):")
    print(f"  one row (a decode step): {step * 1e3:.1f} ms -> {1 / step:.1f} steps/s, "
          f"{mm.weight_bytes / step / 1e9:.1f} GB/s ({1 / step / floor:.0%} of the weight-read floor); qeff_lab's "
          f"decode runs at {v['decode_1_gqa'] * step:.0%} of it. Bound on this machine: decode batch 1 at most "
          f"{1 / step / v['decode_1_hf']:.2f}x HF" + (f", {1 / step / v['decode_1_genai']:.2f}x onnxruntime-genai"
                                                      if peer else ""))
    for n in ttft_prompts:
        t = v[f"matmuls_{n}"]
        print(f"  {n:3d} rows (a {n}-token prefill): {t * 1e3:.1f} ms ({mm.flops(n) / t / 1e9:.0f} GFLOP/s); qeff_lab's "
              f"TTFT is {v[f'ttft_{n}_gqa'] / t:.2f}x it. Bound: TTFT at least {t / v[f'ttft_{n}_hf']:.2f}x HF's")
    print(f"same tokens as HF greedy: batch 1 {same_1}, padded batch {same_b} ({args.batch} rows)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": MODEL, "machine": machine.to_json(), "graph": graph, "tokens": args.tokens,
                       "ctx_len": args.ctx_len, "weight_bytes_per_step": per_token,
                       "matvec_bandwidth_GBps": bandwidth / 1e9, "floor_steps_per_s": floor,
                       "weight_matmuls": {"count": mm.count, "weight_bytes": mm.weight_bytes},
                       "figures": {k: {"value": m.value, "medians": m.medians, "stable": m.stable}
                                   for k, m in figs.items()},
                       "same_tokens": {"batch_1": same_1, "padded_batch": same_b, "genai": peer_same}},
                      f, indent=1, default=float)


if __name__ == "__main__":
    main()
