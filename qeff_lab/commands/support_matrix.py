"""`qeff-lab support-matrix`: which model types of the installed transformers qeff_lab prepares exactly.

For every decoder-only type (transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) and every encoder type
(MODEL_FOR_MASKED_LM_MAPPING_NAMES) a tiny random model is built from the config class's defaults, shrunk
generically (hidden 64, 2 layers, 4 heads, 2 KV heads, FFN 128, vocab 128, windows 6, 4 experts / top-2, ...):

- decoders: HF eager greedy tokens (model.generate, plain argmax, 16 new tokens, EOS neither stops nor is banned,
  each prompt alone; all-zero weight matrices such as a zero-initialised router drawn at random first) ==
  QEFFAutoModelForCausalLM.from_model(...) on the transformed PyTorch model == the same model compiled for ONNX
  Runtime; one right-padded batch of 2 prompts of 5 and 13 tokens (shorter and longer than prefill_seq_len=8),
  ctx_len 48, batch_size 2;
- encoders: HF last hidden states == transformed PyTorch == ONNX Runtime within 1e-4 (absolute), on a padded
  batch of 2 (5 and 13 tokens), at the real tokens.

Status: pass (all identical), fail (first divergence or the exception, one line), unsupported (qeff_lab refuses
the model at load, with its reason), skipped (not a decoder-only / encoder model -- encoder-decoder or
multimodal --, or the tiny config / the HF reference could not be built; with the reason). Each type runs in a
worker process with a time limit (a hang or a crash costs one row, not the run); torch and ONNX Runtime use one
thread. Each compiled row also names the graph the embedded ONNX Runtime backend runs (its own compile result:
"gqa" / "packed", or "exported: why"). The rows go to a markdown table (docs/support_matrix.md) and, with --json,
to stdout.

This module imports nothing heavy at import time: `qeff-lab --help` stays fast.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass

STATUSES = ("pass", "fail", "unsupported", "skipped")
NEW_TOKENS = 16
PROMPT_LENGTHS = (5, 13)
PREFILL, CTX, BATCH = 8, 48, 2
VOCAB = 128
ENCODER_ATOL = 1e-4
DEFAULT_OUTPUT = "docs/support_matrix.md"
RECYCLE_AFTER = 40  # worker processes are replaced after this many types (bounded memory growth)

# ----------------------------------------------------------------------------------------------- the shrinker
HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN, MOE_FFN = 64, 2, 4, 2, 16, 128, 32
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")  # how configs name their depth
SIZES: dict[str, int] = {
    **dict.fromkeys(("hidden_size", "n_embd", "n_embed", "d_model", "dim", "embed_dim", "emb_dim",
                     "word_embed_proj_dim", "embedding_size", "attention_hidden_size", "true_hidden_size",
                     "intra_bottleneck_size"), HIDDEN),
    **dict.fromkeys(LAYER_COUNT_KEYS, LAYERS),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads", "attention_heads",
                     "swa_num_attention_heads", "decoder_attention_heads"), HEADS),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num",
                     "num_query_groups", "swa_num_key_value_heads", "kv_n_heads"), KV_HEADS),
    **dict.fromkeys(("head_dim", "attention_head_dim", "swa_head_dim", "d_head", "dim_head", "kv_channels",
                     "attention_head_size", "index_head_dim", "qk_nope_head_dim", "v_head_dim"), HEAD_DIM),
    "qk_rope_head_dim": 8, "qk_head_dim": HEAD_DIM + 8, "kv_lora_rank": 16, "q_lora_rank": 32, "rotary_dim": 8,
    **dict.fromkeys(("intermediate_size", "ffn_dim", "n_inner", "d_ff", "dim_ff", "dff", "d_inner",
                     "ffn_hidden_size", "feed_forward_size", "hidden_dim", "intermediate_size_mlp",
                     "dense_intermediate_size"), FFN),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "shared_intermediate_size",
                     "shared_experts_intermediate_size", "moe_shared_expert_intermediate_size",
                     "expert_ffn_hidden_size", "expert_intermediate_size"), MOE_FFN),
    **dict.fromkeys(("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "moe_top_k"), 2),
    "n_shared_experts": 1,
    **dict.fromkeys(("n_group", "topk_group", "num_expert_group"), 1),
    "vocab_size": VOCAB, "mask_token_id": VOCAB - 1, "vocab_size_per_layer_input": VOCAB,
    "hidden_size_per_layer_input": HEAD_DIM,
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_sequence_length"), 256),
    **dict.fromkeys(("sliding_window", "sliding_window_size", "attention_chunk_size"), 6),
}
# None here is "not given" (the modeling code then fails or derives a default size): give it the tiny value
SET_WHEN_NONE = {"vocab_size", "mask_token_id", "num_key_value_heads", "head_dim", "num_local_experts", "n_routed_experts",
                 "num_experts_per_tok", "moe_k", "n_shared_experts"}
SPECIAL_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
MULTIMODAL_SUBCONFIGS = ("text_config", "vision_config", "audio_config", "vq_config", "speech_config",
                         "audio_encoder_config", "depth_decoder_config", "vision_tower_config")


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _two_of(seq):
    """A per-layer list (or pattern string) cut to 2 layers, keeping its first two distinct kinds when it has them."""
    first = seq[0]
    other = next((x for x in seq if x != first), first)
    return first + other if isinstance(seq, str) else [first, other]


def shrink_overrides(defaults: dict, default_layers: int | None) -> dict:
    """The constructor overrides that make a config tiny, from a default config's to_dict()."""
    out: dict = {}
    for key, value in defaults.items():
        if key in SIZES and (_int(value) or (value is None and key in SET_WHEN_NONE)):
            out[key] = SIZES[key]
        elif key in SIZES and isinstance(value, list) and value and all(_int(v) for v in value):  # per layer
            out[key] = [SIZES[key]] * (LAYERS if default_layers and len(value) == default_layers else len(value))
        elif key in SPECIAL_TOKENS and value is not None:
            out[key] = SPECIAL_TOKENS[key]
        elif key.endswith(("_token_id", "_token_index")) and _int(value) and value >= VOCAB:
            out[key] = VOCAB - 1 - len([k for k in out if k.endswith(("_token_id", "_token_index"))]) % 16
        elif key == "first_k_dense_replace" and _int(value) and value > 1:
            out[key] = 1  # layer 0 dense, layer 1 MoE
        elif key in ("initializer_range", "init_std") and isinstance(value, float):
            out[key] = 0.1  # livelier logits than 0.02: fewer near-ties in the greedy comparison
        elif (default_layers and isinstance(value, (list, str)) and len(value) == default_layers
              and key not in ("architectures",) and default_layers > LAYERS
              and (isinstance(value, list) or len(set(value)) <= 3)):  # a pattern string ("MMM*"), not a word
            out[key] = _two_of(value)
        elif (isinstance(value, dict) and value and all(str(k).isdigit() for k in value)
              and key not in ("id2label", "label2id")):  # per-layer overrides: keep (or move) one onto layer 1
            kept = {k: v for k, v in value.items() if int(k) < LAYERS}
            kept = kept or {1 if _int(next(iter(value))) else "1": next(iter(value.values()))}
            out[key] = {k: {**v, **shrink_overrides(v, None)} if isinstance(v, dict) else v for k, v in kept.items()}
        elif (isinstance(value, dict) and key.endswith("_config") and key not in MULTIMODAL_SUBCONFIGS):
            inner_layers = next((value[k] for k in ("num_hidden_layers", "n_layers", "num_layers") if _int(value.get(k))),
                                default_layers)
            out[key] = {**value, **shrink_overrides(value, inner_layers)}
    heads = next((k for k in ("num_attention_heads", "n_head", "n_heads", "num_heads") if _int(defaults.get(k))), None)
    for kv in ("num_key_value_heads", "num_kv_heads", "n_kv_heads"):
        if heads and kv in out and defaults.get(kv) == defaults[heads]:
            out[kv] = HEADS  # multi-head by default: stays so (some validators insist)
    shared = defaults.get("num_kv_shared_layers")
    if _int(shared) and 0 < shared and default_layers and default_layers > LAYERS + 1:
        # layers that reuse an earlier layer's KV cache (gemma3n) need a producer of each kind below them: the two
        # layers keep every kind and one consumer layer (of the last layer's kind) goes on top
        out["num_hidden_layers"], out["num_kv_shared_layers"] = LAYERS + 1, 1
        for key, value in list(out.items()):
            if isinstance(value, (list, str)) and len(value) == LAYERS and len(defaults[key]) == default_layers:
                out[key] = value + (value[-1:] if key in SIZES else defaults[key][-1:])
    if _int(defaults.get("expand")) and _int(defaults.get("num_heads")) and _int(defaults.get("head_dim")):
        out["num_heads"] = HIDDEN * defaults["expand"] // HEAD_DIM  # mamba2: hidden * expand == heads * head_dim
    return out


# What the generic rules above cannot derive, by model type: overrides applied last (a dict merges into a sub-config)
CONFIG_TWEAKS: dict[str, tuple[dict, str]] = {
    "dbrx": ({"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
             "DbrxAttention reads attn_config.rope_theta (undeclared) and clamps by clip_qkv (None by default, "
             "which torch.clamp refuses); released checkpoints set both, as here"),
    "dory": ({"num_hidden_layers": 3, "n_input_layers": 1, "n_recurrent_layers": 1, "n_output_layers": 1,
              "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
             "its input / recurrent (looped) / output stages must sum to num_hidden_layers, and to_dict() doubles "
             "every layer count (attention and mlp listed as separate blocks): one layer per stage, both kinds"),
}


def tiny_config(model_type: str):
    """The config class's defaults, shrunk. Raises when the class cannot be built that way."""
    from transformers import CONFIG_MAPPING

    config_cls = CONFIG_MAPPING[model_type]
    defaults = config_cls().to_dict()
    layers = next((defaults[k] for k in LAYER_COUNT_KEYS
                   if _int(defaults.get(k))), None)
    overrides = shrink_overrides(defaults, layers)
    for key, value in CONFIG_TWEAKS.get(model_type, ({}, ""))[0].items():
        base = overrides.get(key, defaults.get(key))
        overrides[key] = {**base, **value} if isinstance(value, dict) and isinstance(base, dict) else value
    try:
        return config_cls(**overrides)
    except Exception as first:
        # a validator may tie two sizes together (mamba2: hidden * expand == heads * head_dim), or refuse one value
        # (no GQA, top-1 routing only): drop one override at a time, then the per-layer lists, then all but the core
        core = {k: v for k, v in overrides.items() if k in ("vocab_size", "hidden_size", "num_hidden_layers")}
        fewer = {k: v for k, v in overrides.items() if not isinstance(v, (list, str, dict))}
        core_names = {"hidden_size", "n_embd", "d_model", "num_hidden_layers", "n_layer", "num_attention_heads",
                      "n_head", "vocab_size", "intermediate_size"}
        order = sorted(overrides, key=lambda k: k in core_names)  # the main sizes are the last ones given up
        for attempt in [{k: v for k, v in overrides.items() if k != drop} for drop in order] + [fewer, core]:
            try:
                return config_cls(**attempt)
            except Exception:
                continue
        raise first


def composite_reason(config_cls) -> str | None:
    """Why a config is not a plain decoder-only / encoder config (multimodal, or stacks in sub-configs only, e.g.
    blt's patcher / local encoder / global / local decoder), else None."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    subs = getattr(config_cls, "sub_configs", None) or {}
    mm = [k for k in subs if k in MULTIMODAL_SUBCONFIGS]
    if mm:
        text = subs.get("text_config")
        text_type = getattr(text, "model_type", None) if isinstance(text, type) else None
        also = (f"; its text model {text_type!r} has its own row" if text_type and text_type != config_cls.model_type
                and text_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else "")
        return f"multimodal / composite config ({', '.join(mm)}): not a text-only model{also}"
    if subs:
        try:
            config = config_cls()
        except Exception:
            return None
        if not any(_int(getattr(config, k, None)) for k in LAYER_COUNT_KEYS):
            return (f"composite of several stacks ({', '.join(subs)}) with no layer count of its own: not one "
                    "decoder-only stack with a KV cache per layer")
    return None


# ----------------------------------------------------------------------------------------------- one type
@dataclass
class Row:
    model_type: str
    kind: str  # decoder / encoder / other
    status: str
    seconds: float = 0.0
    reason: str = ""
    model_class: str = ""
    path: str = ""  # "family X" / "generic" / "encoder"
    graph: str = ""  # what the embedded backend runs once compiled: "gqa", "packed" or "exported: why"

    def line(self) -> str:
        return f"{self.model_type}: {self.status}" + (f" ({self.reason})" if self.reason else "")


def embedded_graph(compile_result) -> str:
    """The graph the embedded ONNX Runtime backend runs for a compile (qeff_lab.compile.ort_rewrite /
    ort_encoder): "gqa" (GroupQueryAttention, KV cache updated in place), "packed" (encoder, real tokens only),
    or "exported: <why the rewrite did not apply>"."""
    from qeff_lab.compile.ort_rewrite import kept_reason

    plan = getattr(compile_result, "ort_graph", None) or {}
    graph = plan.get("graph", "exported")
    if graph != "exported":
        return graph
    return "exported" + (f": {kept_reason(plan['why'])}" if plan.get("why") else "")


def one_line(exc: BaseException, limit: int = 220) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    cache = os.environ.get("QEFF_LAB_CACHE")
    if cache:
        text = text.replace(cache, "<cache>")  # the run's own temporary folder: not part of the reason
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def classify(model_type: str) -> str:
    """decoder / encoder / other, by transformers' mappings (encoder-only masked-LM types are encoders even when
    they have an LM-head decoder variant, e.g. bert)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "decoder"
    return "other"


def prompt_ids(seed: int = 1) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 100, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def _first_divergence(got: list[list[int]], ref: list[list[int]], what: str) -> str | None:
    for i, (a, b) in enumerate(zip(got, ref)):
        if a != b:
            j = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            x = a[j] if j < len(a) else "end"
            y = b[j] if j < len(b) else "end"
            return (f"{what} differs from HF eager: prompt {i} ({PROMPT_LENGTHS[i]} tokens), new token {j}: "
                    f"{x} vs HF {y}")
    return None


def _hf_greedy(model, prompts) -> list[list[int]]:
    """Plain argmax decoding, NEW_TOKENS each (qeff_lab.accuracy.runners.hf_greedy: EOS is an ordinary token)."""
    from qeff_lab.accuracy.runners import hf_greedy

    return hf_greedy(model, prompts, NEW_TOKENS)


def randomize_zero_matrices(model, std: float) -> list[str]:
    """Draw every all-zero weight matrix from normal(0, std); returns their names. Why: a zero-initialised router
    (afmoe's `router.gate`) gives every expert the same score, and TopK's choice among exact ties is
    implementation-defined (PyTorch CPU and ONNX Runtime pick different experts), which says nothing about a
    trained checkpoint. Biases and 1-D weights (norms) keep their initialisation."""
    import torch

    names = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.dim() >= 2 and not param.any():
                param.normal_(0.0, std)
                names.append(name)
    return names


def _record_failure(row: Row, stage: str, exc: Exception) -> None:
    """A qeff_lab step raised: `unsupported` when from_model refused the model (the reason is its message), else
    `fail` with the stage named."""
    from qeff_lab.models.base import UnsupportedModelError
    from qeff_lab.transforms.generic import UnsupportedArchitectureError

    if stage == "from_model" and isinstance(exc, (UnsupportedModelError, UnsupportedArchitectureError)):
        row.status, row.reason = "unsupported", " ".join(str(exc).split())
    else:
        row.status, row.reason = "fail", f"{stage}: {one_line(exc)}"


def check_decoder(model_type: str, row: Row) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from qeff_lab.models.base import UnsupportedModelError
    from qeff_lab.models.causal_lm import QEFFAutoModelForCausalLM
    from qeff_lab.runtime.generation import TorchKVRunner, generate_ids

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = tiny_config(model_type)
    try:
        family = QEFFAutoModelForCausalLM.family_for(config, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    except UnsupportedModelError as e:
        row.status, row.reason = "unsupported", " ".join(str(e).split())
        return
    row.path = f"family {family.name}" if family is not None else "generic"
    stage = "build"
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
        randomize_zero_matrices(model, getattr(config, "initializer_range", None) or 0.02)
        row.model_class = type(model).__name__
        stage = "HF eager generate"
        prompts = prompt_ids()
        reference = _hf_greedy(model, prompts)
    except Exception as e:  # the reference itself: nothing of qeff_lab's ran yet
        row.status, row.reason = "skipped", f"{stage} failed (no reference): {one_line(e)}"
        return
    stage = "from_model"
    try:
        qeff = QEFFAutoModelForCausalLM.from_model(model, name=f"tiny-{model_type}")
        stage = "transformed PyTorch"
        ids, _, _ = generate_ids(TorchKVRunner(qeff.model, BATCH, PREFILL, CTX), prompts, NEW_TOKENS)
        diff = _first_divergence(ids, reference, "transformed PyTorch")
        if diff:
            limit, why = qeff.max_ctx_len()
            beyond = f" (ctx_len {CTX} > this path's limit {limit}: {why})" if limit and CTX > limit else ""
            row.status, row.reason = "fail", diff + beyond
            return
        stage = "compile (export + ONNX Runtime)"
        qeff.compile(prefill_seq_len=PREFILL, ctx_len=CTX, batch_size=BATCH, backend="onnxruntime")
        row.graph = embedded_graph(qeff.compile_result)
        stage = "ONNX Runtime generate"
        ids = qeff.generate_from_ids(prompts, NEW_TOKENS, runtime="compiled").ids
        diff = _first_divergence(ids, reference, "ONNX Runtime")
        row.status, row.reason = ("fail", diff) if diff else ("pass", "")
    except Exception as e:
        _record_failure(row, stage, e)


def check_encoder(model_type: str, row: Row) -> None:
    import numpy as np
    import torch
    from transformers import AutoModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    from qeff_lab.models.base import UnsupportedModelError
    from qeff_lab.models.encoder import QEFFAutoModel
    from qeff_lab.transforms.encoders import ENCODER_SWAPS

    config = tiny_config(model_type)
    try:
        QEFFAutoModel.check_supported(config, model_type)
    except UnsupportedModelError as e:
        row.status, row.reason = "unsupported", " ".join(str(e).split())
        return
    stage = "build"
    try:
        if getattr(config, "pad_token_id", 0) is None:
            config.pad_token_id = 0  # the padded batch needs a padding id (esm derives positions from it)
        if not config.architectures:  # AutoModel picks among several classes by it (funnel)
            base = MODEL_MAPPING_NAMES.get(model_type)
            config.architectures = [base[0] if isinstance(base, (tuple, list)) else base]
        torch.manual_seed(0)
        model = AutoModel.from_config(config, attn_implementation="eager").float().eval()
        if getattr(config, "languages", None) and hasattr(model, "set_default_language"):
            model.set_default_language(config.languages[0])  # X-MOD: one adapter per language, the model's own API
        row.model_class = type(model).__name__
        row.path = "encoder family" if type(model) in ENCODER_SWAPS else "generic encoder"
        prompts = prompt_ids()
        width = max(PROMPT_LENGTHS)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, :len(p)], mask[i, :len(p)] = torch.tensor(p), 1
        stage = "HF eager forward"
        with torch.no_grad():
            reference = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    except Exception as e:
        row.status, row.reason = "skipped", f"{stage} failed (no reference): {one_line(e)}"
        return
    valid = mask.numpy().astype(bool)

    def compare(got, what: str) -> str | None:
        err = float(np.abs(np.asarray(got)[valid] - reference[valid]).max())
        return None if err <= ENCODER_ATOL else f"{what} hidden states differ from HF: max abs {err:.2e} > {ENCODER_ATOL:g}"

    stage = "from_model"
    try:
        qeff = QEFFAutoModel.from_model(model, name=f"tiny-{model_type}", pooling=None)
        stage = "transformed PyTorch"
        with torch.no_grad():
            ours = qeff.export_spec().module.eval()(ids, mask)
        diff = compare(ours.numpy(), "transformed PyTorch")
        if diff:
            row.status, row.reason = "fail", diff
            return
        stage = "compile (export + ONNX Runtime)"
        qeff.compile(seq_len=width, batch_size=BATCH, backend="onnxruntime")  # the width HF saw (conv layers see padding)
        row.graph = embedded_graph(qeff.compile_result)
        stage = "ONNX Runtime generate"
        out = qeff.generate({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})["output"]
        diff = compare(out, "ONNX Runtime")
        row.status, row.reason = ("fail", diff) if diff else ("pass", "")
    except Exception as e:
        _record_failure(row, stage, e)


def check_type(model_type: str) -> Row:
    """One row: build, compare, classify. Exceptions from qeff_lab's steps become `fail` with the stage named."""
    import warnings

    from transformers import CONFIG_MAPPING

    kind = classify(model_type)
    row = Row(model_type, kind, "fail")
    start = time.perf_counter()
    try:
        config_cls = CONFIG_MAPPING[model_type]
        try:
            enc_dec = bool(getattr(config_cls(), "is_encoder_decoder", False))
        except Exception:
            enc_dec = False
        if enc_dec:
            row.status, row.reason = "skipped", "encoder-decoder config: not a decoder-only or encoder-only model"
        elif (why := composite_reason(config_cls)) is not None:
            row.status, row.reason = "skipped", why
        elif kind == "other":
            row.status, row.reason = "skipped", ("neither a causal-LM nor a masked-LM model type in transformers' "
                                                 "auto mappings")
        else:
            try:
                tiny_config(model_type)
            except Exception as e:
                row.status, row.reason = "skipped", f"tiny config did not build: {one_line(e)}"
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    (check_decoder if kind == "decoder" else check_encoder)(model_type, row)
    except Exception as e:
        row.status, row.reason = "fail", one_line(e)
    row.seconds = round(time.perf_counter() - start, 2)
    return row


# ----------------------------------------------------------------------------------------------- workers
STARTUP_S = 300.0  # a new worker's imports (torch, transformers, qeff_lab) do not count against the first type
FAULT_ENV = "QEFF_LAB_MATRIX_FAULT"  # "TYPE:hang" / "TYPE:crash": the worker misbehaves on TYPE (isolation tests)


def _fault(model_type: str) -> None:
    for spec in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        name, _, what = spec.partition(":")
        if name == model_type and what == "hang":
            time.sleep(10 ** 6)
        if name == model_type and what == "crash":
            os._exit(3)


def _worker(conn, log_path: str | None) -> None:
    """A worker process: model types in, ("start", type) then ("row", dict) out, until it gets None."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "QEFF_LAB_THREADS"):
        os.environ[var] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sink = os.open(log_path or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(sink, 1)
    os.dup2(sink, 2)
    import torch
    import transformers

    import qeff_lab.models.causal_lm  # noqa: F401  (imports paid before the first type's clock starts)

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    conn.send(("ready", None))
    while True:
        model_type = conn.recv()
        if model_type is None:
            return
        conn.send(("start", model_type))
        print(f"==== {model_type}", flush=True)
        _fault(model_type)
        row = check_type(model_type)
        print(f"==== {row.line()} [{row.seconds}s]", flush=True)
        conn.send(("row", asdict(row)))


class _Worker:
    def __init__(self, ctx, log_path: str | None):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, log_path), daemon=True)
        self.proc.start()
        child.close()
        self.task: str | None = None
        self.running = False  # the worker has begun self.task (its clock runs)
        self.started = time.perf_counter()
        self.done = 0

    def submit(self, model_type: str) -> None:
        self.task, self.running = model_type, False
        self.conn.send(model_type)  # queued in the pipe until the worker is ready

    def deadline(self, timeout: float) -> float:
        return self.started + (timeout if self.running else max(timeout, STARTUP_S))

    def stop(self, kill: bool = False) -> None:
        if not kill:
            try:
                self.conn.send(None)
                self.proc.join(10)
            except (OSError, BrokenPipeError):
                pass
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()


def run_matrix(types: list[str], timeout: float = 120.0, jobs: int = 1, log_path: str | None = None,
               progress: bool = True, on_row=None) -> list[Row]:
    """Check every type in worker processes (`jobs` at a time, `timeout` seconds each: a hang or a crash is that
    type's `fail` row, and a fresh worker takes the next type). Rows in `types` order."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    from tqdm.auto import tqdm

    ctx = mp.get_context("spawn")
    todo = list(types)
    rows: dict[str, Row] = {}
    workers: list[_Worker] = []
    counts = dict.fromkeys(STATUSES, 0)
    bar = tqdm(total=len(types), desc="support-matrix", unit="type", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)

    def finish(row: Row) -> None:
        rows[row.model_type] = row
        counts[row.status] = counts.get(row.status, 0) + 1
        bar.set_postfix({k: v for k, v in counts.items() if v}, refresh=False)
        bar.update(1)
        if on_row is not None:
            on_row(row)

    try:
        while todo or any(w.task for w in workers):
            while todo and sum(1 for w in workers if w.task) < jobs:  # hand out work
                idle = next((w for w in workers if w.task is None), None)
                if idle is None:
                    idle = _Worker(ctx, log_path)
                    workers.append(idle)
                idle.submit(todo.pop(0))
            busy = [w for w in workers if w.task]
            bar.set_description(f"support-matrix [{', '.join(w.task for w in busy)}]")
            ready = wait([w.conn for w in busy] + [w.proc.sentinel for w in busy],
                         timeout=max(0.0, min(w.deadline(timeout) for w in busy) - time.perf_counter()))
            for w in busy:
                try:
                    while w.conn.poll():
                        what, payload = w.conn.recv()
                        if what in ("ready", "start"):
                            w.started, w.running = time.perf_counter(), what == "start"
                        elif what == "row":
                            finish(Row(**payload))
                            w.task, w.running, w.done = None, False, w.done + 1
                            break
                except (EOFError, OSError):
                    pass
                if w.task is None:
                    if w.done >= RECYCLE_AFTER:
                        w.stop()
                        workers.remove(w)
                    continue
                now = time.perf_counter()
                if not w.proc.is_alive() or now >= w.deadline(timeout):
                    if not w.proc.is_alive():
                        reason = f"worker process died (exit code {w.proc.exitcode})"
                    elif w.running:
                        reason = f"timed out after {timeout:g} s"
                    else:
                        reason = f"worker did not start within {max(timeout, STARTUP_S):g} s"
                    elapsed = round(now - w.started, 2) if w.running else 0.0
                    task = w.task
                    w.stop(kill=True)
                    workers.remove(w)
                    finish(Row(task, classify_safe(task), "fail", elapsed, reason))
            del ready
    finally:
        for w in workers:
            w.stop(kill=bool(w.task))
        bar.close()
    return [rows[t] for t in types]


def classify_safe(model_type: str) -> str:
    try:
        return classify(model_type)
    except Exception:
        return "other"


# ----------------------------------------------------------------------------------------------- enumerate, write
def all_types() -> list[str]:
    """Decoder-only candidates (causal-LM mapping) then encoders (masked-LM mapping), each sorted, no repeats."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    encoders = sorted(MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    decoders = sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) - set(encoders))
    return decoders + encoders


def select_types(only: list[str] | None) -> list[str]:
    from transformers import CONFIG_MAPPING

    if not only:
        return all_types()
    unknown = [t for t in only if t not in CONFIG_MAPPING]
    if unknown:
        raise ValueError(f"unknown model type(s) {', '.join(unknown)} (not in transformers' CONFIG_MAPPING; "
                         "e.g. llama, qwen3, gpt2, bert).")
    return list(dict.fromkeys(only))


def counts_of(rows: list[Row]) -> dict[str, int]:
    counts = dict.fromkeys(STATUSES, 0)
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    return counts


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def render_markdown(rows: list[Row], command: str, wall_s: float, timeout: float, note: str = "") -> str:
    import datetime

    import transformers

    try:
        import torch
        torch_version = torch.__version__
    except ImportError:  # pragma: no cover
        torch_version = "?"
    counts = counts_of(rows)
    by_kind = {k: counts_of([r for r in rows if r.kind == k]) for k in ("decoder", "encoder", "other")}
    lines = [
        "# Support matrix",
        "",
        f"Generated by `{command}` on {datetime.date.today().isoformat()} in {wall_s / 60:.1f} min "
        f"(transformers {transformers.__version__}, torch {torch_version}; per-type limit {timeout:g} s).",
        "",
        "Every decoder-only model type (transformers' causal-LM mapping) and encoder type (masked-LM mapping), as a "
        "tiny random model built from its config class's defaults, shrunk (hidden 64, 2 layers, 4 heads, 2 KV "
        "heads, FFN 128, vocab 128, sliding windows 6, 4 experts / top-2).",
        f"Decoders: HF eager greedy tokens ({NEW_TOKENS} new, plain argmax: EOS neither stops nor is banned; "
        "all-zero weight matrices, e.g. a zero-initialised router, drawn at random) == transformed PyTorch == "
        "ONNX Runtime, "
        f"one batch of {BATCH} prompts of {' and '.join(map(str, PROMPT_LENGTHS))} tokens "
        f"(prefill_seq_len {PREFILL}, ctx_len {CTX}). Encoders: last hidden states within {ENCODER_ATOL:g} (abs) "
        "at the real tokens of a padded batch of 2.",
        "",
        "Status: **pass** (all identical), **fail** (first divergence or error), **unsupported** (qeff_lab refuses "
        "it at load, with its reason), **skipped** (not a decoder-only / encoder model, or no tiny model / HF "
        "reference could be built).",
        "",
        "| | " + " | ".join(STATUSES) + " | total |",
        "|---|" + "---:|" * (len(STATUSES) + 1),
        "| all | " + " | ".join(str(counts[s]) for s in STATUSES) + f" | {len(rows)} |",
    ]
    for kind, c in by_kind.items():
        if sum(c.values()):
            lines.append(f"| {kind}s | " + " | ".join(str(c[s]) for s in STATUSES) + f" | {sum(c.values())} |")
    graphs = _graph_paragraph(rows)
    if graphs:
        lines += ["", graphs]
    if note:
        lines += ["", note]
    lines += ["", "| model type | kind | path | status | graph | time (s) | reason |", "|---|---|---|---|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r.model_type} | {r.kind} | {_cell(r.path)} | {r.status} | {_cell(r.graph)} | "
                     f"{r.seconds:.1f} | {_cell(r.reason)} |")
    return "\n".join(lines) + "\n"


FAST_GRAPH = {"decoder": "gqa", "encoder": "packed"}  # the embedded backend's own graph per kind


def _graph_paragraph(rows: list[Row]) -> str:
    """What the graph column means, and how many passing types of each kind run the fast graph ("" when none pass)."""
    counts = []
    for kind, fast in FAST_GRAPH.items():
        passing = [r for r in rows if r.status == "pass" and r.kind == kind]
        if passing:
            counts.append(f"{sum(r.graph == fast for r in passing)} of {len(passing)} {kind}s on the {fast} graph")
    if not counts:
        return ""
    return ("Graph: what ONNX Runtime runs once compiled (the embedded backend's own compile result; the exported "
            "graph itself is what goes to the device): **gqa** (decoders: attention replaced by GroupQueryAttention, "
            "KV cache updated in place), **packed** (encoders: per-token ops on real tokens only), or **exported** "
            "with the reason the rewrite did not apply. Of the passing types: " + ", ".join(counts) + ". (The "
            "encoders here are checked on their per-token states, whose padding positions the packed graph does not "
            "reproduce, so they keep the exported graph; the packed graph serves pooled embeddings, e.g. MiniLM with "
            "mean pooling in `QEFFAutoModel(..., pooling=\"mean\")`.)")


def read_matrix(path: str = DEFAULT_OUTPUT):
    """The rows of a written support matrix (markdown) as a pandas DataFrame: model type, kind, path, status,
    graph, time (s), reason. Reads the committed file, so a notebook's output does not depend on the machine."""
    import pandas as pd
    from pathlib import Path

    lines = Path(path).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| model type |"))
    header = [h.strip() for h in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
        rows.append(dict(zip(header, cells)))
    frame = pd.DataFrame(rows, columns=header)
    frame["time (s)"] = frame["time (s)"].astype(float)
    return frame


def merged_markdown(path, rows: list[Row], command: str, wall_s: float) -> str:
    """The matrix at `path` with `rows` re-checked in place (counts recomputed); the header keeps the full run's
    command and time and says which rows were re-run, by which command, in how long."""
    header = (path.read_text().splitlines() + [""] * 3)[2]  # "Generated by `...` on ... in ... min (...)."
    match = re.match(r"Generated by `(.+?)` on \S+ in ([\d.]+) min .*per-type limit ([\d.]+) s", header)
    if match is None:
        raise ValueError(f"{path}: not a support matrix written by this command (no 'Generated by' line).")
    old = read_matrix(str(path))
    new = {r.model_type: r for r in rows}
    merged = [new.pop(r["model type"], None) or Row(r["model type"], r["kind"], r["status"], float(r["time (s)"]),
                                                    r["reason"], "", r["path"], r.get("graph", ""))
              for r in old.to_dict("records")]
    merged += list(new.values())
    note = (f"Re-run after the full run: {', '.join(r.model_type for r in rows)} (`{command}`, "
            f"{wall_s / 60:.1f} min).")
    return render_markdown(merged, match.group(1), float(match.group(2)) * 60, float(match.group(3)), note)


def command_line(args: argparse.Namespace) -> str:
    parts = ["qeff-lab support-matrix"]
    if args.only:
        parts.append("--only " + " ".join(args.only))
    if args.timeout != 120:
        parts.append(f"--timeout {args.timeout:g}")
    if args.jobs != 1:
        parts.append(f"--jobs {args.jobs}")
    if args.json:
        parts.append("--json")
    if getattr(args, "update", False):
        parts.append("--update")
    return " ".join(parts)


def cmd_support_matrix(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    types = select_types(args.only)
    if args.update and not (args.only and args.output and os.path.exists(args.output)):
        raise ValueError("--update re-checks the --only types in an existing --output matrix: give --only TYPE ... "
                         "and an --output file that exists (run the full matrix first).")
    own_cache = None
    if not os.environ.get("QEFF_LAB_MATRIX_KEEP_CACHE"):
        own_cache = tempfile.mkdtemp(prefix="qeff_lab-matrix-cache-")
    saved = os.environ.get("QEFF_LAB_CACHE")
    if own_cache:
        os.environ["QEFF_LAB_CACHE"] = own_cache  # the workers inherit it; exports of tiny models, then removed
    start = time.perf_counter()

    def echo(row: Row) -> None:
        if not args.json and not args.quiet:
            from tqdm.auto import tqdm

            tqdm.write(f"  {row.model_type:<28} {row.status:<11} {row.seconds:6.1f}s  {row.reason[:110]}",
                       file=sys.stderr)

    try:
        rows = run_matrix(types, timeout=args.timeout, jobs=args.jobs, log_path=args.log, progress=not args.quiet,
                          on_row=echo)
    finally:
        if own_cache:
            shutil.rmtree(own_cache, ignore_errors=True)
            if saved is None:
                os.environ.pop("QEFF_LAB_CACHE", None)
            else:
                os.environ["QEFF_LAB_CACHE"] = saved
    wall = time.perf_counter() - start
    if args.output:
        from pathlib import Path

        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.update:
            text = merged_markdown(out, rows, command_line(args), wall)
        else:
            text = render_markdown(rows, command_line(args), wall, args.timeout)
        out.write_text(text)
    counts = counts_of(rows)
    if args.json:
        json.dump([asdict(r) for r in rows], sys.stdout, indent=1)
        print()
    else:
        print(f"{len(rows)} model types in {wall:.0f} s: " + ", ".join(f"{v} {k}" for k, v in counts.items())
              + (f"; written to {args.output}" if args.output else ""))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("support-matrix", help="check every decoder / encoder model type of the installed "
                              "transformers (tiny random configs: HF vs transformed PyTorch vs ONNX Runtime) and "
                              "write docs/support_matrix.md")
    p.add_argument("--only", nargs="+", metavar="TYPE", help="model types to check (default: all)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON (the markdown is written too)")
    p.add_argument("--output", default=DEFAULT_OUTPUT,
                   help=f"markdown file to write (default {DEFAULT_OUTPUT}; '' writes none)")
    p.add_argument("--update", action="store_true",
                   help="re-check only the --only types and replace their rows in the existing --output file")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per model type (default 120)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--log", default=None, help="file for the workers' own output (default: discarded)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-type lines")
    p.set_defaults(func=cmd_support_matrix)
