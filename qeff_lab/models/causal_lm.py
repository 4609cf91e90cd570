"""QEFFAutoModelForCausalLM: decoders with a retained-state KV cache (declares only what differs from the base)."""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import torch
from torch import nn

from qeff_lab.contracts import (BATCH_INDEX, INPUT_IDS, LOGITS, NUM_LOGITS_TO_KEEP, POSITION_IDS, Step, past_names,
                                retained)
from qeff_lab.models.base import CompilePlan, ExportSpec, QEFFBaseModel, UnsupportedModelError
from qeff_lab.onnx.streamed import LayerStack
from qeff_lab.pipeline import StepReport
from qeff_lab.runtime.generation import GenerationResult, TorchKVRunner, generate_ids
from qeff_lab.runtime.sampling import SamplingParams, resolve_sampling
from qeff_lab.transforms.families import FAMILIES
from qeff_lab.transforms.generic import check_support, generic_kv_transform, max_ctx_len
from qeff_lab.transforms.kv_cache import Family, SwapResult, kv_cache_transform
from qeff_lab.transforms.sampler import check_qaic_config, add_sampler

RUNTIMES = ("compiled", "pytorch")


def supported_families() -> str:
    """The hand-written families; every other decoder whose attention goes through transformers' interfaces
    takes the generic path (see qeff_lab.transforms.generic.check_support)."""
    return ", ".join(f"{f.name} ({f.model_type})" for f in sorted(FAMILIES.values(), key=lambda f: f.name.lower()))


class KVExportWrapper(nn.Module):
    """Flat signature for export: (input_ids, position_ids, past_key.0, past_value.0, ...) ->
    (logits, past_key.0_RetainedState, past_value.0_RetainedState, ...)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, *past):
        pairs = [(past[i], past[i + 1]) for i in range(0, len(past), 2)]
        logits, new_past = self.model(input_ids, position_ids, pairs)
        return (logits, *[t for pair in new_past for t in pair])


class KVExportWrapperCB(nn.Module):
    """Continuous batching, QEfficient's input order: (input_ids, position_ids, past_key.0, ..., batch_index)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, *past_and_batch_index):
        past, batch_index = past_and_batch_index[:-1], past_and_batch_index[-1]
        pairs = [(past[i], past[i + 1]) for i in range(0, len(past), 2)]
        logits, new_past = self.model(input_ids, position_ids, pairs, batch_index)
        return (logits, *[t for pair in new_past for t in pair])


class KVExportWrapperTLM(nn.Module):
    """Speculative-decoding target, QEfficient's input order: (input_ids, position_ids, past_key.0, ...,
    num_logits_to_keep) -> logits [batch, num_logits_to_keep, vocab]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, *past_and_num_logits):
        past, num_logits_to_keep = past_and_num_logits[:-1], past_and_num_logits[-1]
        pairs = [(past[i], past[i + 1]) for i in range(0, len(past), 2)]
        logits, new_past = self.model(input_ids, position_ids, pairs, num_logits_to_keep=num_logits_to_keep)
        return (logits, *[t for pair in new_past for t in pair])


class QEFFAutoModelForCausalLM(QEFFBaseModel):
    """A causal LM prepared for Cloud AI 100 (or the embedded ONNX Runtime backend), its KV cache kept on the
    device between steps.

    >>> model = QEFFAutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
    >>> model.compile(prefill_seq_len=32, ctx_len=256, num_cores=16)
    >>> model.generate(tokenizer, prompts=["What is the capital of France?"], generation_len=32).texts

    Speculative decoding (QEfficient's names): load a target with `qaic_config={"speculative_model_type": "target"}`
    (the graph gains a `num_logits_to_keep` input and returns logits for that many positions), compile it with
    `num_speculative_tokens=k` (a decode specialization of k + 1 positions), then generate with
    `prompt_lookup_num_tokens=k` or `draft_model=...` (see generate and qeff_lab.runtime.speculative).
    """

    _hf_auto_class = "AutoModelForCausalLM"
    _kind = "causal_lm"

    def __init__(self, model: nn.Module, resolved, continuous_batching: bool = False, qaic_config: dict | None = None):
        super().__init__(model, resolved)
        self.qaic_config = check_qaic_config(qaic_config, model.config.vocab_size)  # include_sampler, ...
        self.is_tlm = self.qaic_config.get("speculative_model_type") == "target"  # QEfficient's attribute name
        self.family = FAMILIES.get(getattr(model.config, "model_type", None))  # None: the generic path
        if continuous_batching and self.is_tlm:
            raise ValueError("continuous_batching=True with a speculative-decoding target (qaic_config="
                             "{'speculative_model_type': 'target'}): speculative decoding runs batch 1 without "
                             "continuous batching here. Load the target without continuous_batching.")
        self.continuous_batching = continuous_batching
        self.compile_shapes: dict[str, int] | None = None

    # ------------------------------------------------------------------ what differs
    @staticmethod
    def family_for(config, what: str) -> Family | None:
        """The hand-written family for this model type, or None when the generic path (transformers' own
        Cache / attention / mask interfaces) takes it. Raises UnsupportedModelError when neither can."""
        family = FAMILIES.get(getattr(config, "model_type", None))
        if family is not None:
            return family
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

        if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
            raise UnsupportedModelError(
                f"{what} is a {config.model_type!r} model ({', '.join(getattr(config, 'architectures', None) or [])}),"
                " an encoder: QEFFAutoModelForCausalLM takes decoders (the families "
                f"{supported_families()}, and any other decoder through transformers' attention interfaces). "
                "For encoders use QEFFAutoModel.")
        support = check_support(config)
        if not support:
            raise UnsupportedModelError(f"{what}: {support.reason}")
        return None

    @classmethod
    def check_supported(cls, config, what: str) -> None:
        cls.family_for(config, what)

    @classmethod
    def _check_kind_options(cls, continuous_batching: bool = False, qaic_config: dict | None = None, **options) -> None:
        if not isinstance(continuous_batching, bool):
            raise ValueError(f"continuous_batching must be True or False, got {continuous_batching!r}")
        check_qaic_config(qaic_config)

    @classmethod
    def _load_kwargs(cls, config) -> dict:
        return {"attn_implementation": "eager"}

    @classmethod
    def from_model(cls, model: nn.Module, name: str = "in-memory", transform: bool = True,
                   continuous_batching: bool = False, qaic_config: dict | None = None):
        """Wrap an already-built HF causal LM (e.g. a tiny random config in a test). It is changed in place."""
        family = cls.family_for(model.config, type(model).__name__)
        if family is not None and not isinstance(model, family.causal_lm):
            raise UnsupportedModelError(f"{type(model).__name__} is a {family.name} model but not its causal LM "
                                        f"class {family.causal_lm.__name__}.")
        return super().from_model(model, name=name, transform=transform, continuous_batching=continuous_batching,
                                  qaic_config=qaic_config)

    @property
    def path(self) -> str:
        """"family <name>" (hand-written retained-state blocks) or "generic" (transformers' interfaces)."""
        return f"family {self.family.name}" if self.family is not None else "generic"

    def _load_details(self, config) -> dict:
        return {"family": self.family.name if self.family is not None else None, "path": self.path,
                "kv_heads": getattr(config, "num_key_value_heads", getattr(config, "num_attention_heads", None)),
                "vocab": config.vocab_size}

    def _pytorch_transforms(self):
        if self.family is None:
            return [generic_kv_transform]
        return [partial(kv_cache_transform, family=self.family)]

    def _transform_summary(self, results) -> str:
        if isinstance(results[0], SwapResult):
            return f"{len(results[0].changes)} module(s) swapped, {len(results[0].kept)} kept"
        return f"generic retained-state path: {len(results[0].changes)} change(s)"

    def max_ctx_len(self) -> tuple[int | None, str]:
        """The largest ctx_len this model's retained-state path reproduces exactly, and why."""
        return self.family.max_ctx_len(self.model.config) if self.family is not None else max_ctx_len(self.model.config)

    @property
    def swap_report(self) -> SwapResult:
        self._require(Step.TRANSFORM, "transform()")
        return self.steps[Step.TRANSFORM].details[0]

    @property
    def num_layers(self) -> int:
        return len(self.model.kv_cache_layout())

    def io_names(self) -> tuple[list[str], list[str]]:
        past = past_names(self.num_layers)
        extra = [BATCH_INDEX] if self.continuous_batching else [NUM_LOGITS_TO_KEEP] if self.is_tlm else []
        return [INPUT_IDS, POSITION_IDS, *past, *extra], [LOGITS, *map(retained, past)]

    def export_spec(self) -> ExportSpec:
        """(input_ids, position_ids, past_key.{i}, past_value.{i}) -> (logits, *_RetainedState); dynamic
        batch_size, seq_len and ctx_len. With continuous batching (QEfficient's I/O): a last input
        `batch_index [batch_size, 1]` and the KV buffers' first axis `full_batch_size`. A speculative-decoding
        target (is_tlm): a last input `num_logits_to_keep [n, 1]` and logits [batch_size, n, vocab]."""
        inputs, outputs = self.io_names()
        past = past_names(self.num_layers)
        batch, seq, ctx = 2, 8, 32
        kv_rows = 3 if self.continuous_batching else batch
        example: dict[str, torch.Tensor] = {
            INPUT_IDS: torch.ones(batch, seq, dtype=torch.long),
            POSITION_IDS: torch.arange(seq, dtype=torch.long)[None].repeat(batch, 1)}
        for name, (key, value) in zip(past[::2], self.model.new_kv_cache(kv_rows, ctx)):
            example[name], example[name.replace("past_key", "past_value")] = key, value
        axes = {INPUT_IDS: {0: "batch_size", 1: "seq_len"}, POSITION_IDS: {0: "batch_size", 1: "seq_len"},
                LOGITS: {0: "batch_size"}}
        kv_axis = "full_batch_size" if self.continuous_batching else "batch_size"
        for name in past:
            axes[name] = axes[retained(name)] = {0: kv_axis, 2: "ctx_len"}
        options = {"model_type": self.model.config.model_type, "path": self.path}
        module = KVExportWrapper(self.model)
        layers = None
        # the hand-written blocks: one layer class, the cache pairs named by layer (the streamed export route; the
        # speculative target and the in-graph sampler have not been checked on it, so they keep the traced route)
        if self.family is not None and not self.is_tlm and not self.qaic_config.get("include_sampler"):
            base = getattr(self.model, self.model.base_name)
            layers = LayerStack(f"model.{self.model.base_name}.{base.layers_name}",
                                lambda i: [*past_names(i + 1)[-2:], *map(retained, past_names(i + 1)[-2:])])
        if self.continuous_batching:
            example[BATCH_INDEX] = torch.tensor([[2], [0]], dtype=torch.long)
            axes[BATCH_INDEX] = {0: "batch_size"}
            options["continuous_batching"] = True
            module = KVExportWrapperCB(self.model)
        if self.is_tlm:  # not with continuous batching or the sampler (refused at load)
            example[NUM_LOGITS_TO_KEEP] = torch.arange(2).view(2, 1)
            axes[NUM_LOGITS_TO_KEEP] = {0: NUM_LOGITS_TO_KEEP}
            axes[LOGITS] = {0: "batch_size", 1: NUM_LOGITS_TO_KEEP}
            options["speculative_model_type"] = "target"
            module = KVExportWrapperTLM(self.model)
        if self.qaic_config.get("include_sampler"):  # QEfficient's I/O: sampler inputs last, next_tokens first
            module, example, outputs, axes = add_sampler(module, example, outputs, axes, len(past),
                                                         self.model.config.vocab_size, self.continuous_batching,
                                                         self.qaic_config)
            options["qaic_config"] = self.qaic_config
        return ExportSpec(module, example, outputs, axes, options, layers)

    # ------------------------------------------------------------------ compile
    def compile(self, prefill_seq_len: int = 32, ctx_len: int = 128, batch_size: int = 1, num_cores: int = 16,
                mxfp6_matmul: bool = False, mxint8_kv_cache: bool = False, backend: str | None = None,
                full_batch_size: int | None = None, num_speculative_tokens: int | None = None,
                **compiler_options: Any):
        """Compile two specializations, Prefill (seq_len=prefill_seq_len) and Decode (seq_len=1), both at
        `ctx_len` and `batch_size`. Always writes specializations.json and custom_io.yaml (KV in the device
        dtype: float16, or mxint8 with mxint8_kv_cache, which is not a compiler flag) into the compile folder.
        Continuous batching (`from_pretrained(..., continuous_batching=True)`) needs `full_batch_size`, the
        number of KV slots: Prefill runs batch 1 into one slot, Decode runs batch `full_batch_size`, and both
        specializations name `full_batch_size` (as QEfficient writes them).
        A speculative-decoding target (`qaic_config={"speculative_model_type": "target"}`) needs
        `num_speculative_tokens=k` (1 <= k < prefill_seq_len): Decode then has seq_len k + 1 and both specializations
        name `num_logits_to_keep` (1 for Prefill, k + 1 for Decode), as QEfficient writes them; batch 1.
        Other `compiler_options` go to qeff_lab.compile, which validates them. Returns the folder."""
        if full_batch_size is not None and not self.continuous_batching:
            raise ValueError(f"full_batch_size={full_batch_size} needs a continuous-batching model: load it with "
                             "QEFFAutoModelForCausalLM.from_pretrained(card, continuous_batching=True) (or from_model("
                             "..., continuous_batching=True)), or leave full_batch_size out and use batch_size.")
        if self.continuous_batching:
            if full_batch_size is None:
                raise ValueError("This model was loaded with continuous_batching=True: compile(...) needs "
                                 "full_batch_size=N, the number of requests decoded together (KV slots).")
            if batch_size != 1:
                raise ValueError(f"batch_size={batch_size} with continuous batching: prefill runs one request at a "
                                 "time (batch 1) and decode runs full_batch_size slots; leave batch_size out.")
        self._check_speculative_compile(num_speculative_tokens, prefill_seq_len, batch_size)
        for name, value in (("prefill_seq_len", prefill_seq_len), ("ctx_len", ctx_len), ("batch_size", batch_size),
                            ("num_cores", num_cores),
                            *((("full_batch_size", full_batch_size),) if self.continuous_batching else ())):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if prefill_seq_len > ctx_len:
            raise ValueError(f"prefill_seq_len ({prefill_seq_len}) cannot exceed ctx_len ({ctx_len}).")
        limit, why = self.max_ctx_len()
        if limit and ctx_len > limit:
            raise ValueError(f"ctx_len={ctx_len} exceeds this model's {why} ({limit}); compile with ctx_len <= {limit}.")
        kv_dtype = "mxint8" if mxint8_kv_cache else "float16"
        past = past_names(self.num_layers)
        if self.continuous_batching:
            specs = [{"batch_size": 1, "seq_len": prefill_seq_len, "ctx_len": ctx_len, "full_batch_size": full_batch_size},
                     {"batch_size": full_batch_size, "seq_len": 1, "ctx_len": ctx_len, "full_batch_size": full_batch_size}]
            what = f"full batch {full_batch_size} (continuous batching)"
        elif self.is_tlm:
            k = num_speculative_tokens
            specs = [{"batch_size": 1, "seq_len": prefill_seq_len, "ctx_len": ctx_len, NUM_LOGITS_TO_KEEP: 1},
                     {"batch_size": 1, "seq_len": k + 1, "ctx_len": ctx_len, NUM_LOGITS_TO_KEEP: k + 1}]
            what = f"batch 1, speculative target verifying {k} token(s) per step"
        else:
            specs = [{"batch_size": batch_size, "seq_len": prefill_seq_len, "ctx_len": ctx_len},
                     {"batch_size": batch_size, "seq_len": 1, "ctx_len": ctx_len}]
            what = f"batch {batch_size}"
        plan = CompilePlan(
            specs,
            (f"prefill {prefill_seq_len}, decode {specs[1]['seq_len']}" if prefill_seq_len > 1 else "decode 1 (prefill "
             "runs it token by token)") + f", ctx {ctx_len}, {what}, KV {kv_dtype}",
            spec_names=["Prefill", "Decode"],
            custom_io={n: kv_dtype for name in past for n in (name, retained(name))},
            model_info={"mxint8_kv_cache": mxint8_kv_cache})
        folder = self._compile(plan, backend=backend, num_cores=num_cores, options=compiler_options,
                               mxfp6_matmul=mxfp6_matmul)
        self.compile_shapes = {"prefill_seq_len": prefill_seq_len, "ctx_len": ctx_len, "batch_size": batch_size,
                               "full_batch_size": full_batch_size, "num_speculative_tokens": num_speculative_tokens}
        return folder

    def _check_speculative_compile(self, num_speculative_tokens, prefill_seq_len, batch_size) -> None:
        if not self.is_tlm:
            if num_speculative_tokens is not None:
                raise ValueError(
                    f"num_speculative_tokens={num_speculative_tokens} compiles a speculative-decoding target, whose "
                    "graph returns logits for several positions: load the model with QEFFAutoModelForCausalLM."
                    "from_pretrained(card, qaic_config={'speculative_model_type': 'target'}) (as QEfficient), "
                    "or leave num_speculative_tokens out.")
            return
        if num_speculative_tokens is None:
            raise TypeError("This model is a speculative-decoding target (qaic_config={'speculative_model_type': "
                            "'target'}): compile(...) needs num_speculative_tokens=k, the draft tokens verified per step.")
        if not isinstance(num_speculative_tokens, int) or isinstance(num_speculative_tokens, bool) \
                or num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be a positive int (draft tokens verified per target step), "
                             f"got {num_speculative_tokens!r}")
        if isinstance(prefill_seq_len, int) and num_speculative_tokens + 1 > prefill_seq_len:
            raise ValueError(
                f"num_speculative_tokens={num_speculative_tokens} needs prefill_seq_len >= num_speculative_tokens + 1 "
                f"({num_speculative_tokens + 1}), got prefill_seq_len={prefill_seq_len}: the verify step's k + 1 "
                "positions must fit the prefill chunk (QEfficient's rule). Lower num_speculative_tokens or raise "
                "prefill_seq_len.")
        if batch_size != 1:
            raise ValueError(f"batch_size={batch_size} with a speculative-decoding target: speculative decoding runs "
                             "batch 1 here (several prompts run one after another); compile with batch_size=1.")

    # ------------------------------------------------------------------ run
    def _open_runtime(self, device_ids):
        from qeff_lab.runtime import open_kv_runner  # by the compile's backend: ORT buffers or the card's

        return open_kv_runner(self.compile_result, device_ids=device_ids)

    def runner(self, runtime: str = "compiled", device_ids: list[int] | None = None):
        """The KV runner generate uses: the compiled graph ("compiled") or the transformed PyTorch model
        ("pytorch", same shapes and schedule; compile()'s shapes, or its defaults when not compiled)."""
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        if runtime == "pytorch":
            self._require(Step.TRANSFORM, "transform()")
            shapes = self.compile_shapes or {"prefill_seq_len": 32, "ctx_len": 128, "batch_size": 1}
            fbs = shapes.get("full_batch_size")
            if self.continuous_batching and fbs is None:
                raise RuntimeError("A continuous-batching model runs on the PyTorch runtime with compile()'s "
                                   "full_batch_size: call compile(..., full_batch_size=N) first.")
            if self.is_tlm and shapes.get("num_speculative_tokens") is None:
                raise RuntimeError("A speculative-decoding target runs on the PyTorch runtime with compile()'s "
                                   "num_speculative_tokens: call compile(..., num_speculative_tokens=k) first.")
            runner = TorchKVRunner(self.model, shapes["batch_size"], shapes["prefill_seq_len"], shapes["ctx_len"], fbs,
                                   shapes.get("num_speculative_tokens"))
            runner.max_top_k_ids = self.qaic_config.get("max_top_k_ids")  # as the in-graph sampler draws (or None)
            return runner
        if self.compile_result is None:
            raise RuntimeError("Call compile(...) before generate(...): nothing is compiled yet "
                               "(or pass runtime='pytorch' to run the transformed PyTorch model).")
        if self.qaic_config.get("include_sampler") and self.compile_result.backend != "onnxruntime":
            raise NotImplementedError("The in-graph sampler runs on the embedded ONNX Runtime backend for now: the "
                                      "qaicrt runner does not feed its inputs yet. Compile with backend='onnxruntime', "
                                      "or load without qaic_config for the card.")
        return self.session(device_ids)

    def eos_token_ids(self, tokenizer=None) -> list[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config, tokenizer):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if value is not None:
                ids.update([value] if isinstance(value, int) else list(value))
        return sorted(ids)

    def generate(self, tokenizer, prompts: Sequence[str] | str, generation_len: int | Sequence[int | None] | None = None,
                 stream: bool = False, *, runtime: str = "compiled", verbose: bool = True,
                 device_ids: list[int] | None = None, do_sample: bool | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None, presence_penalty: float | None = None,
                 seed: int | None = None, sampling: SamplingParams | Sequence[SamplingParams] | None = None,
                 token_bitmasks=None, prompt_lookup_num_tokens: int | None = None,
                 max_matching_ngram_size: int | None = None, draft_model: QEFFAutoModelForCausalLM | None = None,
                 num_speculative_tokens: int | None = None, **serving) -> GenerationResult:
        """Generation for `prompts` (chat templates are the caller's job): greedy by default; `do_sample=True`
        with temperature / top_k / top_p / min_p / repetition_penalty (HF's meanings), presence_penalty
        (OpenAI's), `seed` for reproducible draws; or `sampling=` one SamplingParams per prompt. `token_bitmasks`
        ([vocab] bool, or one per prompt) allows only the masked-in tokens (guided decoding).
        `generation_len`: one limit, or one per prompt; None: as long as the context allows; longer than
        `ctx_len - prompt_len` is clamped with a warning. Without continuous batching, prompts beyond the
        compiled batch size run in successive batches; with it (compile(full_batch_size=N)) requests share the N
        slots, a finished one handing its slot to the next waiting prompt, and metrics come per request;
        `serving` options go to that loop (`prefix_caching=True`, `on_event=` a live view's callback).
        Returns texts, ids and metrics; prints the metrics like QEfficient (verbose) and streams text as it comes
        (stream=True: the first prompt of each batch live, the others when their batch ends).

        Speculative decoding (greedy, batch 1; the tokens are plain greedy's, the metrics add the acceptance rate and
        the tokens per target step) on a target compiled with `num_speculative_tokens=k`:
        `prompt_lookup_num_tokens=K` (HF's name; K <= k tokens proposed by matching the last
        `max_matching_ngram_size` (HF's, default 2) tokens earlier in the prompt and text, no draft model), or
        `draft_model=` a compiled QEFFAutoModelForCausalLM with the same tokenizer (HF calls it `assistant_model`,
        QEfficient's examples a draft model) proposing `num_speculative_tokens` (QEfficient's; default k) per step.
        A target given neither decodes one token per step."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("generate() got no prompts: pass a non-empty list of prompts.")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"Prompt {i} is a {type(p).__name__}, not a str.")
            if not p:
                raise ValueError(f"Prompt {i} is an empty string: a causal LM needs at least one prompt token.")
        params = resolve_sampling(len(prompts), sampling, do_sample=do_sample, temperature=temperature, top_k=top_k,
                                  top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                                  presence_penalty=presence_penalty, seed=seed)
        drafter = self._drafter(tokenizer, params, token_bitmasks, prompt_lookup_num_tokens, max_matching_ngram_size,
                                draft_model, num_speculative_tokens, runtime, device_ids)
        runner = self.runner(runtime, device_ids)
        prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
        cb = getattr(runner, "full_batch_size", None)
        streamer = _Streamer(tokenizer, prompts, len(prompts) if cb else runner.batch_size) if stream else None
        ids, stopped, metrics = self._generate_ids(
            runner, prompt_ids, generation_len, self.eos_token_ids(tokenizer),
            on_tokens=streamer.on_tokens if streamer else None, pad_token_id=tokenizer.pad_token_id or 0,
            sampling=params, token_bitmasks=token_bitmasks, **drafter, **serving)
        texts = [tokenizer.decode(t, skip_special_tokens=True) for t in ids]
        if streamer:
            streamer.finish(texts)
        result = GenerationResult(ids, [list(p) for p in prompt_ids], metrics, texts, prompts, stopped)
        self._record(StepReport(
            Step.GENERATE, "done", metrics.e2e_s,
            f"{metrics.prompts} prompt(s), {metrics.generated_tokens} new tokens on {metrics.backend} "
            f"(time to first token {metrics.ttft_s:.3f} s, decode {metrics.decode_tok_s:.1f} tokens/s)", result))
        if verbose:
            print(metrics.report())
        return result

    def _drafter(self, tokenizer, params, token_bitmasks, prompt_lookup_num_tokens, max_matching_ngram_size,
                 draft_model, num_speculative_tokens, runtime, device_ids) -> dict:
        """The speculative loop's options ({} for plain generation), or a clear error for what it cannot do."""
        from qeff_lab.runtime.speculative import DraftModelDrafter, PromptLookupDrafter

        asked = {k: v for k, v in (("prompt_lookup_num_tokens", prompt_lookup_num_tokens),
                                   ("max_matching_ngram_size", max_matching_ngram_size), ("draft_model", draft_model),
                                   ("num_speculative_tokens", num_speculative_tokens)) if v is not None}
        if not asked and not self.is_tlm:
            return {}
        if self.continuous_batching:
            raise ValueError(f"{', '.join(asked)}: speculative decoding runs without continuous batching here (batch 1, "
                             "prompts one after another). Load the target without continuous_batching.")
        if not self.is_tlm:
            raise ValueError(f"{', '.join(asked)} need(s) a speculative-decoding target: load it with "
                             "QEFFAutoModelForCausalLM.from_pretrained(card, qaic_config={'speculative_model_type': "
                             "'target'}) and compile(..., num_speculative_tokens=k).")
        if token_bitmasks is not None or not all(p.plain_greedy for p in params):
            raise ValueError("Speculative decoding here is greedy only: leave do_sample / temperature / top_k / top_p / "
                             "penalties / token_bitmasks out (or use a model loaded without speculative_model_type).")
        if draft_model is not None and (prompt_lookup_num_tokens is not None or max_matching_ngram_size is not None):
            raise ValueError("Give either prompt_lookup_num_tokens (prompt lookup, no draft model) or draft_model "
                             "(with num_speculative_tokens), not both.")
        if prompt_lookup_num_tokens is not None or max_matching_ngram_size is not None:
            if num_speculative_tokens is not None:
                raise ValueError("With prompt lookup, prompt_lookup_num_tokens is the number of tokens proposed; "
                                 "num_speculative_tokens goes with draft_model.")
            if prompt_lookup_num_tokens is None:
                raise ValueError("max_matching_ngram_size needs prompt_lookup_num_tokens=K (tokens proposed per step).")
            return {"drafter": PromptLookupDrafter(2 if max_matching_ngram_size is None else max_matching_ngram_size),
                    "num_speculative_tokens": prompt_lookup_num_tokens}
        if draft_model is None:
            if num_speculative_tokens is not None:
                raise ValueError("num_speculative_tokens goes with draft_model=...: give the draft model too (or "
                                 "prompt_lookup_num_tokens for prompt lookup).")
            return {"drafter": None}
        self.check_draft_model(draft_model, tokenizer)
        if runtime == "compiled" and draft_model.compile_result is None:
            raise ValueError("The draft model is not compiled: call draft_model.compile(prefill_seq_len, ctx_len) (ctx_len "
                             "at least the target's) before generate.")
        draft_runner = draft_model.runner(runtime, None if runtime == "pytorch" else device_ids)
        return {"drafter": DraftModelDrafter(draft_runner, getattr(tokenizer, "pad_token_id", None) or 0),
                "num_speculative_tokens": num_speculative_tokens}

    def check_draft_model(self, draft_model: QEFFAutoModelForCausalLM, tokenizer=None) -> None:
        """Raise a clear error unless `draft_model` can draft for this target (before compiling it): another
        QEFFAutoModelForCausalLM whose token ids mean the same words, i.e. the same tokenizer vocabulary when both are
        known (the draft's own tokenizer against `tokenizer`, the target's), else the same vocab_size."""
        if not isinstance(draft_model, QEFFAutoModelForCausalLM) or draft_model is self:
            raise TypeError(f"draft_model must be another QEFFAutoModelForCausalLM (compiled), got {draft_model!r}")
        draft_tokenizer = draft_model.tokenizer if draft_model.resolved.source != "in memory" else None
        if tokenizer is not None and draft_tokenizer is not None:
            target_vocab, draft_vocab = tokenizer.get_vocab(), draft_tokenizer.get_vocab()
            if target_vocab != draft_vocab:
                raise ValueError(
                    f"The draft model {draft_model.model_name!r} uses another tokenizer ({len(draft_vocab)} tokens, "
                    f"{type(draft_tokenizer).__name__}) than the target's ({len(target_vocab)} tokens): its token ids "
                    "would mean other words to the target. Use a draft of the same family (same tokenizer), or prompt "
                    "lookup (prompt_lookup_num_tokens=K), which needs no draft model.")
            return
        target_size, draft_size = self.model.config.vocab_size, draft_model.model.config.vocab_size
        if target_size != draft_size:
            raise ValueError(f"The draft model's vocabulary has {draft_size} tokens, the target's {target_size}: a draft "
                             "must share the target's tokenizer. Use a draft of the same family, or prompt lookup.")

    @staticmethod
    def _generate_ids(runner, prompt_ids, generation_len, eos_token_ids, **options):
        """The loop for this runner: speculative for a target, continuous batching when it has full_batch_size
        slots, batches otherwise."""
        if "drafter" in options:  # a speculative target (generate_speculative says so if the runner cannot verify)
            from qeff_lab.runtime.speculative import generate_speculative

            keep = ("on_tokens", "pad_token_id", "drafter", "num_speculative_tokens")
            return generate_speculative(runner, prompt_ids, generation_len, eos_token_ids,
                                        **{k: v for k, v in options.items() if k in keep})
        if getattr(runner, "full_batch_size", None):
            from qeff_lab.runtime.continuous_batching import generate_continuous

            return generate_continuous(runner, prompt_ids, generation_len, eos_token_ids, **options)
        serving = sorted(k for k in ("prefix_caching", "on_event") if options.pop(k, None))
        if serving:
            raise ValueError(f"{', '.join(serving)} need(s) continuous batching: load with continuous_batching=True "
                             "and compile(..., full_batch_size=N).")
        return generate_ids(runner, prompt_ids, generation_len, eos_token_ids, **options)

    def generate_from_ids(self, prompt_ids: Sequence[Sequence[int]], generation_len: int | Sequence[int | None] | None = None,
                          eos_token_ids: Sequence[int] | None = None, *, runtime: str = "compiled",
                          sampling: SamplingParams | Sequence[SamplingParams] | None = None,
                          token_bitmasks=None, prompt_lookup_num_tokens: int | None = None,
                          max_matching_ngram_size: int | None = None,
                          draft_model: QEFFAutoModelForCausalLM | None = None,
                          num_speculative_tokens: int | None = None, **serving) -> GenerationResult:
        """Token ids in, token ids out (no tokenizer): the loop parity tests drive (speculative and serving options
        as generate)."""
        params = resolve_sampling(len(prompt_ids), sampling)
        drafter = self._drafter(None, params, token_bitmasks, prompt_lookup_num_tokens, max_matching_ngram_size,
                                draft_model, num_speculative_tokens, runtime, None)
        runner = self.runner(runtime)
        ids, stopped, metrics = self._generate_ids(runner, prompt_ids, generation_len, eos_token_ids,
                                                   sampling=params, token_bitmasks=token_bitmasks, **drafter,
                                                   **serving)
        return GenerationResult(ids, [list(p) for p in prompt_ids], metrics, None, None, stopped)


class _Streamer:
    """Prints the first prompt of each batch as its tokens arrive; the others when the batch is done."""

    def __init__(self, tokenizer, prompts: list[str], batch_size: int):
        self.tokenizer, self.prompts, self.batch_size = tokenizer, prompts, batch_size
        self.printed: dict[int, int] = {}

    def on_tokens(self, index: int, new_ids: list[int]) -> None:
        if index % self.batch_size:
            return
        if index not in self.printed:
            print(f"\nPrompt {index}: {self.prompts[index]}\nCompletion: ", end="", flush=True)
            self.printed[index] = 0
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        print(text[self.printed[index]:], end="", flush=True)
        self.printed[index] = len(text)

    def finish(self, texts: list[str]) -> None:
        for i, text in enumerate(texts):
            if i in self.printed:
                if self.printed[i] < len(text):
                    print(text[self.printed[i]:], end="")
            else:
                print(f"\nPrompt {i}: {self.prompts[i]}\nCompletion: {text}", end="")
        print(flush=True)

