"""Names and limits both sides of a boundary must agree on: graph I/O, retained-state suffix, mask value, fp16
limits, pipeline step names. One place, so the exporter, the runners, compile and the views cannot drift."""
from __future__ import annotations

# ----------------------------------------------------------------------------- numerics
FP16_MAX = 65504.0  # largest finite fp16
FP16_MIN_NORMAL = 2.0 ** -14
FP16_MIN_SUBNORMAL = 2.0 ** -24

# A masked attention score is replaced (with `where`, never added) by this value before an fp32 softmax: exp()
# of it relative to any real score is exactly 0, and unlike finfo(float32).min it stays finite in fp16. A fully
# masked (padding) row then averages zeroed values instead of producing NaN.
MASK_VALUE = -10000.0

# ----------------------------------------------------------------------------- graph I/O (QEfficient's names)
INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
ATTENTION_MASK = "attention_mask"
BATCH_INDEX = "batch_index"  # continuous batching: [batch_size, 1], the KV slot (of full_batch_size) of each row
# speculative-decoding target (QEfficient's TLM): [n, 1], only its first dimension is read: logits come back for n
# positions ([batch, n, vocab], the last n of each row's valid positions), 1 in prefill, k + 1 when verifying k drafts
NUM_LOGITS_TO_KEEP = "num_logits_to_keep"
LOGITS = "logits"
RETAINED_SUFFIX = "_RetainedState"  # an output that the device keeps in place of the input of the same stem

# In-graph sampler (QEfficient's `qaic_config={"include_sampler": True}`): inputs after batch_index, in this order;
# per-row parameters are [batch_size, 1], random_numbers [batch_size, max_top_k_ids], token_bitmasks
# [batch_size, vocab] (only with include_guided_decoding); the two penalty buffers are retained state
# [full_batch_size or batch_size, vocab] bool. Outputs: probs (only with return_pdfs), next_tokens, then the KV.
LAST_ACCEPTED_OUTPUT_TOKENS = "last_accepted_output_tokens"
REPETITION_BUFFER = "past_repetition_penalty_buffer"
PRESENCE_BUFFER = "past_presence_penalty_buffer"
SAMPLER_PARAMS = ("repetition_penalties", "presence_penalties", "temperatures", "top_ks", "top_ps", "min_ps")
SAMPLER_INPUTS = (LAST_ACCEPTED_OUTPUT_TOKENS, REPETITION_BUFFER, "repetition_penalties", PRESENCE_BUFFER,
                  "presence_penalties", "temperatures", "top_ks", "top_ps", "min_ps", "random_numbers")
RANDOM_NUMBERS = "random_numbers"
TOKEN_BITMASKS = "token_bitmasks"
NEXT_TOKENS = "next_tokens"
PROBS = "probs"
QAIC_CONFIG_KEYS = ("include_sampler", "return_pdfs", "max_top_k_ids", "include_guided_decoding", "speculative_model_type")
MAX_TOP_K_IDS = 512  # QEfficient's default max_top_k_ids


def past_names(num_layers: int) -> list[str]:
    """`past_key.0, past_value.0, past_key.1, ...`: the retained KV inputs, in graph order."""
    return [f"past_{kind}.{i}" for i in range(num_layers) for kind in ("key", "value")]


def retained(name: str) -> str:
    return name + RETAINED_SUFFIX


# ----------------------------------------------------------------------------- pipeline steps (recorded names)
class Step:
    LOAD = "load"
    ANALYZE = "analyze"
    TRANSFORM = "transform"
    PRECISION_FIXES = "precision-fixes"
    EXPORT = "export"
    COMPILE = "compile"
    GENERATE = "generate"
    COMPARE = "compare"

    ORDER = (LOAD, ANALYZE, TRANSFORM, PRECISION_FIXES, EXPORT, COMPILE, GENERATE, COMPARE)
