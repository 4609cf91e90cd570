"""The accuracy ladder: the same prompts and text through each step towards the device, measured against HF fp32.

Decoders: HF fp32 -> transformed fp32 -> ONNX Runtime fp32 -> fp16 (no fixes) -> fp16 (fixes)
-> + MXFP6 weights -> + MXINT8 KV cache. Per rung: greedy token match rate against the first rung, the
first divergent step with the reference's top-2 logit margin there; teacher-forced on a shipped
public-domain text: KL divergence against the reference's logits (mean, 99th percentile, max) and top-1
agreement (as llama.cpp's `--kl-divergence`), max / mean abs logit difference, and perplexity.
Encoders: the distribution of cosine similarities (min, 1st percentile, median, mean) of the embeddings of
at least 100 sentences against HF fp32.

`LadderReport.table()` is the text form: counts and rates exact, noise-level values shown as below a stated
tolerance, the rest to 2 significant digits, so it reads the same on every CPU.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from qeff_lab.accuracy.metrics import (cosine_similarity, first_divergence, kl_stats, logit_errors, perplexity,
                                       token_match_rate)
from qeff_lab.accuracy.runners import EmulatedRunner, HFCausalRunner, RetainedStateRunner, teacher_forced_logits
from qeff_lab.precision.emulate import Fp16Emulation, fp16_weights
from qeff_lab.precision.findings import Findings
from qeff_lab.precision.fixes import apply_fixes, revert_fixes, safe_norm_transform
from qeff_lab.precision.mx import mxfp6_weights
from qeff_lab.pipeline import HtmlRepr

TEXT = "coriolanus.txt"


def shipped_text(name: str = TEXT) -> str:
    """A public-domain text shipped in qeff_lab/data (see SOURCES.md there)."""
    return resources.files("qeff_lab").joinpath("data", name).read_text(encoding="utf-8")


@dataclass
class Rung:
    """One step of the ladder. `make()` builds its runner when its turn comes (rungs may share a model
    copy and change it in order: a fix switched on, weights quantized)."""

    name: str
    make: Callable[[], Any]
    note: str = ""


SUMMARY_COLUMNS = ["rung", "token_match", "first_divergence", "margin_at_divergence", "top1_agreement", "kl_mean",
                   "kl_p99", "kl_max", "max_abs_logit_diff", "mean_abs_logit_diff", "perplexity", "seconds", "note"]
ENCODER_COLUMNS = ["rung", "sentences", "min_cosine", "p1_cosine", "median_cosine", "mean_cosine", "max_abs_diff",
                   "seconds", "note"]
# Below these a difference is numerical noise (it changes with the CPU and the thread count): table() shows
# "<tol" instead of its digits.
TOLERANCES = {"max_abs_logit_diff": 1e-3, "mean_abs_logit_diff": 1e-3, "kl_mean": 1e-6, "kl_p99": 1e-6,
              "kl_max": 1e-6, "max_abs_diff": 1e-4}
COSINE_TOLERANCE = 1e-6  # 1 - cosine below this shows as ">1-1e-06"


def _sig(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    v = float(v)
    if np.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.{digits}g}"


@dataclass
class LadderReport(HtmlRepr):
    """Per rung (summary) and per rung x prompt (per_prompt) accuracy against the first rung."""

    summary: pd.DataFrame
    per_prompt: pd.DataFrame
    reference: str
    text_tokens: int = 0
    generation_len: int = 0
    kind: str = "causal-lm"
    notes: list[str] = field(default_factory=list)

    def to_frame(self) -> pd.DataFrame:
        return self.summary

    def table(self, tolerances: dict[str, float] | None = None) -> pd.DataFrame:
        """The summary as text that reads the same on every CPU: token match, divergence step and top-1
        agreement exact; differences below their tolerance (TOLERANCES, or `tolerances`) shown as "<tol";
        other values to 2 significant digits (perplexity 3); no timings."""
        tol = {**TOLERANCES, **(tolerances or {})}
        rows = []
        for _, r in self.summary.iterrows():
            row = {}
            for c in self.summary.columns:
                v = r[c]
                if c in ("rung", "note"):
                    row[c] = v
                elif c == "seconds":
                    continue
                elif c in ("token_match", "top1_agreement"):
                    row[c] = "-" if v is None or np.isnan(v) else f"{v:.1%}".replace(".0%", "%")
                elif c in ("first_divergence", "sentences"):
                    row[c] = "-" if v is None or (isinstance(v, float) and np.isnan(v)) else str(int(v))
                elif c.endswith("cosine"):
                    row[c] = f">1-{COSINE_TOLERANCE:.0e}" if v is not None and 1 - float(v) < COSINE_TOLERANCE \
                        else _sig(v, 3)
                elif c in tol and isinstance(v, (int, float)) and np.isfinite(v) and abs(v) < tol[c]:
                    row[c] = f"<{tol[c]:.0e}"
                else:
                    row[c] = _sig(v, 3 if c == "perplexity" else 2)
            rows.append(row)
        return pd.DataFrame(rows)

    def rung(self, name: str) -> pd.Series:
        return self.summary.set_index("rung").loc[name]

    def __repr__(self) -> str:
        return f"<LadderReport {self.kind}: {len(self.summary)} rungs vs {self.reference!r}>"


def run_ladder(rungs: Sequence[Rung], prompt_ids: Sequence[Sequence[int]], text_ids: Sequence[int],
               generation_len: int = 16, progress: bool = True) -> LadderReport:
    """Run every rung on the same prompts (greedy, `generation_len` new tokens, no early stop) and the same
    text (teacher-forced); the first rung is the reference."""
    from tqdm.auto import tqdm

    from qeff_lab.runtime.generation import generate_ids

    prompt_ids = [list(map(int, p)) for p in prompt_ids]
    text_ids = list(map(int, text_ids))
    rows, per_prompt = [], []
    ref_gen = ref_text_logits = None
    ref_choice: list[np.ndarray] = []
    for i, rung in enumerate(tqdm(rungs, desc="accuracy ladder", disable=not progress)):
        t0 = time.perf_counter()
        runner = rung.make()
        gen, _, _ = generate_ids(runner, prompt_ids, generation_len, None, progress=False)
        text_logits = teacher_forced_logits(runner, text_ids)
        if i == 0:
            ref_gen, ref_text_logits = gen, text_logits
            for p, g in zip(prompt_ids, gen):  # the logits that chose each reference token
                seq = p + g[:-1]
                ref_choice.append(teacher_forced_logits(runner, seq)[len(p) - 1:])
        errs = logit_errors(ref_text_logits, text_logits)
        kl = kl_stats(ref_text_logits, text_logits)
        divs = [first_divergence(r, g, c) for r, g, c in zip(ref_gen, gen, ref_choice)]
        matches = [token_match_rate(r, g) for r, g in zip(ref_gen, gen)]
        first = min((d for d in divs if d.step is not None), key=lambda d: d.step, default=None)
        for k, (g, d, m) in enumerate(zip(gen, divs, matches)):
            per_prompt.append({"rung": rung.name, "prompt": k, "token_match": m, "divergence_step": d.step,
                               "margin": d.margin, "tokens": g})
        rows.append({"rung": rung.name, "token_match": float(np.mean(matches)),
                     "first_divergence": None if first is None else first.step,
                     "margin_at_divergence": None if first is None else first.margin,
                     "top1_agreement": kl["top1_agreement"], "kl_mean": kl["kl_mean"], "kl_p99": kl["kl_p99"],
                     "kl_max": kl["kl_max"], "max_abs_logit_diff": errs["max_abs_logit_diff"],
                     "mean_abs_logit_diff": errs["mean_abs_logit_diff"],
                     "perplexity": perplexity(text_logits, text_ids), "seconds": time.perf_counter() - t0,
                     "note": rung.note})
        del runner
    return LadderReport(pd.DataFrame(rows, columns=SUMMARY_COLUMNS),
                        pd.DataFrame(per_prompt, columns=["rung", "prompt", "token_match", "divergence_step", "margin",
                                                          "tokens"]),
                        rungs[0].name if rungs else "", len(text_ids), generation_len)


def causal_lm_rungs(hf_model: torch.nn.Module, qeff_model=None, *, fixes: Sequence[str] | None = None,
                    prefill_seq_len: int = 32, ctx_len: int = 512, ort: bool = True, mxfp6: bool = True,
                    mxint8: bool = True, mx_format: str = "fp6_e2m3") -> list[Rung]:
    """The standard ladder. `qeff_model` (a QEFFAutoModelForCausalLM) gives the transformed, retained-state
    model and its ONNX Runtime compile; without it the transformed rung is HF + the fixes and there
    is no ONNX Runtime rung. `fixes`: a precision report's Findings (every exact fix they call for: safe
    norms, pre-scaled attention, safe GELU; precision.apply_fixes), or module paths for the safe-norm fix
    (e.g. `report.findings.modules("norm-square")`); None: every norm. The fp16 rungs share one fp16 copy
    of the transformed model, changed in order (fix on, MXFP6 weights)."""
    def fix(model):
        if isinstance(fixes, Findings):
            apply_fixes(model, fixes)
        else:
            safe_norm_transform(model, only=fixes)

    def kv_runner(model):
        if qeff_model is not None:
            return RetainedStateRunner(model, prefill_seq_len, ctx_len)
        return HFCausalRunner(model, prefill_seq_len, ctx_len)

    state: dict[str, Any] = {}

    def transformed():
        if qeff_model is not None:
            return qeff_model.model
        if "fixed32" not in state:
            state["fixed32"] = copy.deepcopy(hf_model)
            fix(state["fixed32"])
        return state["fixed32"]

    def fp16_model():
        if "m16" not in state:
            state["m16"] = fp16_weights(transformed())
            revert_fixes(state["m16"])
            state.pop("fixed32", None)
        return state["m16"]

    def no_fixes():
        revert_fixes(fp16_model())
        return EmulatedRunner(kv_runner(fp16_model()))

    def with_fixes():
        fix(fp16_model())
        return EmulatedRunner(kv_runner(fp16_model()))

    def with_mxfp6():
        m = fp16_model()
        fix(m)
        if not state.get("mx"):
            state["mx"] = mxfp6_weights(m, mx_format, inplace=True)[1]
        return EmulatedRunner(kv_runner(m))

    def with_mx_kv():
        with_mxfp6()
        return EmulatedRunner(kv_runner(fp16_model()), mxint8_kv=True)

    def ort_runner():
        if qeff_model.compile_result is None or (qeff_model.compile_shapes or {}).get("ctx_len", 0) < ctx_len:
            qeff_model.compile(prefill_seq_len=prefill_seq_len, ctx_len=ctx_len, backend="onnxruntime")
        return qeff_model.runner("compiled")

    rungs = [Rung("HF fp32", lambda: HFCausalRunner(hf_model, prefill_seq_len, ctx_len), "reference"),
             Rung("transformed fp32", lambda: kv_runner(transformed()),
                  "retained-state KV blocks" if qeff_model is not None else "HF + precision fixes (fp32)")]
    if ort and qeff_model is not None:
        rungs.append(Rung("ORT fp32", ort_runner, "exported graph, embedded ONNX Runtime"))
    rungs += [Rung("fp16 (no fixes)", no_fixes, "every op rounded to fp16, fp16 weights"),
              Rung("fp16 (fixes)", with_fixes,
                   "+ precision fixes" if isinstance(fixes, Findings) else "+ safe-norm fix")]
    if mxfp6:
        rungs.append(Rung("fp16 + MXFP6", with_mxfp6, f"+ MatMul weights MX {mx_format}, blocks of 32"))
    if mxint8:
        rungs.append(Rung("fp16 + MXFP6 + MXINT8 KV" if mxfp6 else "fp16 + MXINT8 KV",
                          with_mx_kv if mxfp6 else (lambda: EmulatedRunner(kv_runner(fp16_model()), mxint8_kv=True)),
                          "+ KV cache MXINT8 between steps"))
    return rungs


def causal_lm_ladder(hf_model: torch.nn.Module, tokenizer, prompts: Sequence[str], qeff_model=None, *,
                     generation_len: int = 16, text_tokens: int = 256, chat: bool = True, progress: bool = True,
                     **rung_options) -> LadderReport:
    """Tokenize `prompts` (with the chat template when `chat` and the tokenizer has one) and the first
    `text_tokens` tokens of the shipped text, build the standard rungs and run them."""
    prompt_ids = []
    for p in prompts:
        if chat and getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        else:
            ids = tokenizer(p)["input_ids"]
        prompt_ids.append(list(ids))
    text_ids = tokenizer(shipped_text())["input_ids"][:text_tokens]
    ctx = max(max(map(len, prompt_ids)) + generation_len, len(text_ids))
    rung_options.setdefault("ctx_len", 1 << (ctx - 1).bit_length())
    report = run_ladder(causal_lm_rungs(hf_model, qeff_model, **rung_options), prompt_ids, text_ids, generation_len,
                        progress)
    report.per_prompt["text"] = [tokenizer.decode(t) for t in report.per_prompt["tokens"]]  # each rung's own words
    report.notes.append(f"{len(prompts)} prompt(s), {generation_len} new tokens each; perplexity and logit "
                        f"differences over the first {len(text_ids)} tokens of {TEXT}")
    return report


# ----------------------------------------------------------------------------- encoders
def shipped_sentences(n: int = 128, name: str = TEXT) -> list[str]:
    """The first `n` distinct lines of at least four words of the shipped text (speaker names left out)."""
    out: list[str] = []
    for line in shipped_text(name).splitlines():
        line = line.strip()
        if len(line.split()) >= 4 and not line.endswith(":") and line not in out:
            out.append(line)
            if len(out) == n:
                break
    return out


def encoder_ladder(qeff_model, texts: Sequence[str] | None = None, *, mxfp6: bool = True, ort: bool = True,
                   progress: bool = True) -> LadderReport:
    """Cosine similarity of pooled embeddings against HF fp32 (the same encoder with the qeff_lab swaps
    undone), for: transformed fp32, ONNX Runtime fp32, fp16 without / with fixes (safe LayerNorm), + MXFP6.
    Per rung the distribution over the sentences: min, 1st percentile, median, mean (a sentence whose
    embedding is not finite counts as cosine -1). `texts`: default 128 lines of the shipped text."""
    from tqdm.auto import tqdm

    texts = list(texts) if texts is not None else shipped_sentences()

    from qeff_lab.transforms.base import unswap_modules
    from qeff_lab.transforms.encoders import PooledEncoder

    enc = qeff_model.tokenizer(list(texts), padding=True, truncation=True, max_length=128, return_tensors="pt")
    hf = copy.deepcopy(qeff_model.model)  # HF's own encoder: every qeff_lab swap undone, newest first
    revert_fixes(hf)
    unswap_modules(hf, "Fp16SafeAttentionMask")

    def embed(model, fp16=False):
        wrapper = PooledEncoder(model, qeff_model.pooling).eval()
        with torch.no_grad(), (Fp16Emulation() if fp16 else torch.no_grad()):
            return wrapper(enc["input_ids"], enc["attention_mask"]).float().numpy()

    def ort_embed():
        if qeff_model.compile_result is None:
            qeff_model.compile(seq_len=[128], backend="onnxruntime")
        return qeff_model.generate({k: v.numpy() for k, v in enc.items()})["output"]

    m16 = fp16_weights(hf)
    steps: list[tuple[str, Callable[[], np.ndarray], str]] = [
        ("HF fp32", lambda: embed(hf), "reference"),
        ("transformed fp32", lambda: embed(qeff_model.model), "fp16-safe mask"),
    ]
    if ort:
        steps.append(("ORT fp32", ort_embed, "exported graph, embedded ONNX Runtime"))

    def fixed():
        from qeff_lab.transforms.encoders import fp16_safe_mask_transform

        fp16_safe_mask_transform(m16)
        safe_norm_transform(m16)
        return embed(m16, fp16=True)

    def mx():
        mxfp6_weights(m16, inplace=True)
        return embed(m16, fp16=True)

    steps += [("fp16 (no fixes)", lambda: embed(m16, fp16=True), "HF mask, plain LayerNorm"),
              ("fp16 (fixes)", fixed, "+ fp16-safe mask, safe LayerNorm")]
    if mxfp6:
        steps.append(("fp16 + MXFP6", mx, "+ MatMul weights MX fp6_e2m3"))
    rows, ref = [], None
    for name, fn, note in tqdm(steps, desc="accuracy ladder", disable=not progress):
        t0 = time.perf_counter()
        out = fn()
        ref = out if ref is None else ref
        cos = cosine_similarity(ref, out)
        cos = np.where(np.isfinite(cos), cos, -1.0)
        rows.append({"rung": name, "sentences": len(cos), "min_cosine": float(cos.min()),
                     "p1_cosine": float(np.percentile(cos, 1, method="lower")),
                     "median_cosine": float(np.median(cos)), "mean_cosine": float(cos.mean()),
                     "max_abs_diff": float(np.abs(ref - out).max()), "seconds": time.perf_counter() - t0,
                     "note": note})
    summary = pd.DataFrame(rows, columns=ENCODER_COLUMNS)
    report = LadderReport(summary, pd.DataFrame(), "HF fp32", kind="encoder")
    report.notes.append(f"cosine over {len(texts)} sentences")
    return report
