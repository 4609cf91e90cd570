"""The embedded backend's own compile result for retained-KV decoders: each layer's attention block (CtxScatter,
CtxGather, mask, softmax, matmuls) replaced by one `com.microsoft.GroupQueryAttention` that updates the KV
cache in place.

The graph that goes to the device is not touched; this graph is written next to the compile artifacts and only
ONNX Runtime runs it (`qeff_lab.runtime.ort_gqa_session`). What changes at its interface:
- one more input, `seqlens_k` [batch] int32: per row, the slot of the last token of this call (its position). The
  runner derives it from position_ids; GQA writes the call's K/V at slots seqlens_k - seq_len + 1 .. seqlens_k
  and attends to slots 0 .. seqlens_k. Where q and k are rotated as rotate_half does, by cos/sin tables gathered
  at position_ids, the rotation moves into the op (do_rotary, cos/sin caches cut from those tables: any static
  rope variant's scaling is already in them), and its position is the write slot, i.e. the same position; any
  other rotary form stays outside the op as exported.
- past_key.i / past_key.i_RetainedState must be bound to the same buffer (GQA's shared-buffer mode), so nothing
  copies the cache between steps.
- continuous batching (CtxScatterCB / CtxGatherCB, which take batch_index): cache row r is slot r, so batch_index
  goes away; the runner binds the row of the prefilled slot, or all slots in slot order for decode. A graph in
  which something else reads batch_index (the in-graph sampler's penalty buffers) keeps the exported graph.
GQA needs contiguous positions per row (no -1 padding inside a call) and ORT's CPU kernel takes batch > 1 only
with seq_len 1; the runner splits padded prefill per row and sends finished rows to a spare slot.

Two attention forms are matched, both MatMul(q, Transpose(k)) -> Mul(scale) (or Div(sqrt(d)), or no scaling) ->
... -> Softmax -> Cast* -> MatMul(., v) -> Transpose/Reshape -> the output projection (MatMul, or Gemm as gpt2's
Conv1D exports), fp32 casts of the fp32 cache and query skipped. Where a Shape reads the context on its way to
the projection, or something else comes first (a gate, a norm), GQA's output is turned back into the context
[B, H, S, D] under the context's own name and everything after it runs as exported (the head count then comes
from the first projection downstream; `verify` catches a wrong one):
- the family blocks (transforms.kv_cache.cached_attention): the gathered context itself, Where(masked, fill,
  scores) with a boolean mask (its sliding window, Mistral / Qwen2, proven and expressed as below);
- the generic path (transforms.generic: the model's own eager_attention_forward): repeat_kv's Unsqueeze(axes 2) ->
  Expand -> Reshape on the gathered keys/values (each kv head serves consecutive query heads, GQA's grouping),
  optional soft-capping tanh(x / c) * c (GQA's `softcap`), then Add(mask) with an additive float mask.
  What that mask holds is not read from the graph's shape, nor from the config: it is evaluated. Its subgraph runs
  on ONNX Runtime for every query position 0 .. ctx_len - 1 against every slot (`_mask_window`), and the layer is
  rewritten only when it is exactly causal (GQA's own masking) or a causal sliding window of W slots (GQA's
  `local_window_size` W, the query's own slot included) over the compiled ctx_len; masked entries must be
  <= MASK_VALUE (exp underflows to 0 as in GQA). Anything else is refused with the reason: chunked or bidirectional
  masks, an additive bias in the mask (ALiBi), a mask that reads more than the positions. Attention sinks as a
  learned per-head logit concatenated to the masked scores and sliced off after the softmax (gpt_oss, flint,
  mimo_v2_flash), or applied as the context scaled by sigmoid(logsumexp(scores) - sinks) (granite_swa), the same
  value (`_sink_block`), become GQA's `head_sink` input. Keys / values / scores reshaped to merge batch and heads
  for a 3-D bmm, scores clamped at the dtype's minimum (xglm, trocr) and zeros added to them (baddbmm's
  accumulator, gpt_neox_japanese) are read through. ALiBi added to the
  scores, other soft-capping forms or score scaling change the score chain itself and are refused by the matcher.
  `verify` then runs a check sequence that reaches past the largest window (or keeps the exported graph when the
  window acts only at positions it cannot reach within ctx_len).
  Its rotary form is `_match_rope`'s with two Clips on position_ids and rotate_half's split traced from the
  shape (x.shape[-1] // 2), so the rotation moves into the op there too.

A graph the pattern does not match (no CtxScatter/CtxGather attention, a different score chain, batch_index read
by something else) is left as exported: `plan_ort_graph` says which graph runs and why. The rewrite is then checked against
the exported graph on ONNX Runtime (`verify`), and falls back to the exported graph if the logits differ.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qeff_lab.contracts import BATCH_INDEX, INPUT_IDS, MASK_VALUE, POSITION_IDS, RETAINED_SUFFIX

# part of the compile key: a change here makes a new compile folder (2: continuous batching, rotary inside the op;
# 3: the generic path's attention; 4: Div-scaled or unscaled scores, fp32 casts, a context rebuilt for what follows;
# 5: attention sinks as head_sink; 6: batch x heads merged for bmm, clamped scores, head_dim a multiple of 8;
# 7: zeros added to the scores)
REWRITE_VERSION = "gqa-7"
ORT_GRAPH = "ort_model.onnx"  # the rewritten graph inside the compile folder
SEQLENS_K = "seqlens_k"
MS_DOMAIN = "com.microsoft"
GRAPH_ENV = "QEFF_LAB_ORT_GRAPH"  # "exported": run the exported graph on ONNX Runtime as it is
TOLERANCE = 1e-3  # max |logit diff| accepted between the rewrite and the exported graph (fp32: ~1e-5 seen)


class RewriteNotApplicable(ValueError):
    """The exported graph does not have the attention pattern the rewrite replaces."""


@dataclass
class OrtGraphPlan:
    """Which graph the embedded backend runs, and why (stored in qconfig.json as `ort_graph`)."""

    graph: str  # "gqa" (the rewritten graph) or "exported"
    why: str
    path: str | None = None  # compile-folder file name of the rewritten graph
    layers: int = 0
    nodes_before: int = 0
    nodes_after: int = 0
    max_logit_diff: float | None = None
    rotary_layers: int = 0  # layers whose rotary embedding moved into the op (do_rotary)
    version: str = REWRITE_VERSION

    def to_json(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- the rewrite
def _producers(graph) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def _consumers(graph) -> dict[str, list[onnx.NodeProto]]:
    out = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            out[i].append(n)
    return out


def _scalar(graph, name: str, producers) -> float | None:
    """The value of a scalar constant (Constant node or initializer), else None."""
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        for a in node.attribute:
            if a.name == "value":
                arr = numpy_helper.to_array(a.t)
                return float(arr.reshape(-1)[0]) if arr.size == 1 else None
        return None
    for init in graph.initializer:
        if init.name == name and init.data_location != TensorProto.EXTERNAL:
            arr = numpy_helper.to_array(init)
            return float(arr.reshape(-1)[0]) if arr.size == 1 else None
    return None


def _only_consumer(consumers, name: str, op_type: str, ignore: tuple[str, ...] = ()) -> onnx.NodeProto:
    users = [u for u in consumers.get(name, []) if u.op_type not in ignore]
    if len(users) != 1 or users[0].op_type != op_type:
        raise RewriteNotApplicable(f"{name} feeds {[u.op_type for u in users]}, expected one {op_type}")
    return users[0]


def _constant(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value), name=name)


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def rewrite_gqa(model: onnx.ModelProto, ctx_len: int | None = None, weights_dir: Path | None = None,
                rotary: bool = True) -> tuple[onnx.ModelProto, int]:
    """The model with every layer's attention replaced by GroupQueryAttention (in place; returned with the number
    of layers rewritten). Raises RewriteNotApplicable when the graph is not the pattern this replaces.
    Where q and k are rotated by cos/sin tables (`_match_rope`), the rotation moves into the op (do_rotary) with
    the tables' first ctx_len + 1 rows as its caches (`weights_dir`: where a table kept as external data lives);
    `rotary=False` leaves every rotation outside the op."""
    g = model.graph
    inputs = {i.name: i for i in g.input}
    scatter_ops, gather_ops = ("CtxScatter", "CtxScatterCB"), ("CtxGather", "CtxGatherCB")  # CB: continuous batching
    pasts = [n for n in inputs if n.startswith("past_key.")]
    if not pasts:
        raise RewriteNotApplicable("no past_key.* inputs (not a retained-KV decoder)")
    producers, consumers = _producers(g), _consumers(g)
    weights = {i.name: list(i.dims) for i in g.initializer}
    drop: set[int] = set()  # ids of nodes to remove
    new_nodes: list[tuple[onnx.NodeProto, list[onnx.NodeProto]]] = []  # (insert before this node, nodes)

    rope_caches: dict[tuple[str, str], tuple[str, str]] = {}  # (cos table, sin table) -> GQA's cos/sin caches
    with_constants = {**producers, **{i.name: helper.make_node("Constant", [], [i.name], value=i) for i in g.initializer
                             if i.data_location != TensorProto.EXTERNAL and len(i.dims) <= 1 and
                             (not i.dims or i.dims[0] <= 8)}}  # small initializers read as constants
    mask_windows: dict[str, int | None] = {}  # generic path: additive mask -> its sliding window (None: causal)

    def to_bsh(src: str, tag: str) -> tuple[str, list]:
        """[B, N, S, D] -> [B, S, N*D]; a [B, S, N, D] tensor transposed into src is reshaped directly."""
        r = f"{tag}/bsh"
        node = producers.get(src)
        if node is not None and node.op_type == "Transpose" and _perm(node) == [0, 2, 1, 3]:
            return r, [helper.make_node("Reshape", [node.input[0], "gqa/shape_bs_1"], [r], name=r)]
        t = f"{tag}/bsnd"
        return r, [helper.make_node("Transpose", [src], [t], perm=[0, 2, 1, 3], name=t),
                   helper.make_node("Reshape", [t, "gqa/shape_bs_1"], [r], name=r)]

    for past_key in sorted(pasts, key=lambda n: int(n.split(".")[-1])):
        layer = past_key.split(".", 1)[1]
        past_value = f"past_value.{layer}"
        scatters = {}
        for name in (past_key, past_value):
            users = [u for u in consumers.get(name, []) if u.op_type in scatter_ops]
            others = [u.op_type for u in consumers.get(name, []) if u.op_type not in (*scatter_ops, "Shape")]
            if len(users) != 1 or others or users[0].output[0] != name + RETAINED_SUFFIX:
                raise RewriteNotApplicable(f"{name} is not written by one CtxScatter/CtxScatterCB into "
                                           f"{name + RETAINED_SUFFIX}")
            scatters[name] = users[0]
        gathers = {}
        for name in (past_key, past_value):
            users = consumers.get(name + RETAINED_SUFFIX, [])
            if len(users) != 1 or users[0].op_type not in gather_ops:
                raise RewriteNotApplicable(f"{name + RETAINED_SUFFIX} is not read by one CtxGather/CtxGatherCB")
            gathers[name] = users[0]
        # scores = MatMul(q, Transpose(keys)) -> Mul(scale) -> the family's Where(mask) or the generic path's
        # [Div/Tanh/Mul soft-capping] -> Add(mask) -> Softmax -> Cast* -> MatMul(., values); keys / values are the
        # gathered context, or (generic path) its repeat_kv expansion to the query heads
        keys, k_nodes, _ = _kv_operand(consumers, gathers[past_key].output[0], layer, producers)
        # merged: the values (hence the context) are [B * H, ..] for a 3-D bmm
        values, v_nodes, merged = _kv_operand(consumers, gathers[past_value].output[0], layer, producers)
        k_t = _only_consumer(consumers, keys, "Transpose", ignore=("Shape",))  # Shape: repeat_kv's sizes
        scores = _only_consumer(consumers, k_t.output[0], "MatMul")
        if scores.input[1] != k_t.output[0]:
            raise RewriteNotApplicable(f"layer {layer}: keys are not the right operand of the score MatMul")
        if _perm(k_t) not in ([0, 1, 3, 2], [0, 2, 1]):
            raise RewriteNotApplicable(f"layer {layer}: the keys are transposed by {_perm(k_t)}, not their last two axes")
        chain = [*k_nodes, *v_nodes, k_t, scores]
        scaled, reshaped = _score_no_ops(g, consumers, producers, scores.output[0])
        chain += reshaped
        # the scale: Mul(scores, s), Div(scores, d) (falcon, openai-gpt divide by sqrt(head_dim)): s = 1 / d, or
        # none at all (gpt_neo; xglm scales the query instead): s = 1
        scale = 1.0
        users = consumers.get(scaled, [])
        if len(users) == 1 and users[0].op_type in ("Mul", "Div"):
            mul = users[0]
            factor = _scalar(g, mul.input[1], producers) if mul.input[0] == scaled else None
            if factor is None or (mul.op_type == "Div" and factor == 0):
                raise RewriteNotApplicable(f"layer {layer}: the score scale is not a scalar constant")
            scaled, scale = mul.output[0], factor if mul.op_type == "Mul" else 1.0 / factor
            chain.append(mul)
        scaled, reshaped = _score_no_ops(g, consumers, producers, scaled)  # e.g. to [B, H, S, ctx] for the mask
        chain += reshaped
        users = consumers.get(scaled, [])
        window, softcap = None, 0.0
        if len(users) == 1 and users[0].op_type == "Where":  # the family blocks (kv_cache.cached_attention)
            where = users[0]
            fill = _scalar(g, where.input[1], producers)
            if where.input[2] != scaled or fill is None or fill > MASK_VALUE:
                raise RewriteNotApplicable(f"layer {layer}: the scores are masked by a Where other than "
                                           f"Where(masked, <= {MASK_VALUE:g}, scores)")
            if where.input[0] not in mask_windows:  # its windows (sliding-window families) are proven as well
                mask_windows[where.input[0]] = _mask_window(model, where.input[0], ctx_len, weights_dir, layer,
                                                            boolean=True)
            window = mask_windows[where.input[0]]
            chain.append(where)
            probs = where.output[0]
        else:  # the generic path (the model's own eager_attention_forward): an additive mask of the model's own
            softcap, capped = _softcap(g, consumers, producers, scaled, layer)
            add = _only_consumer(consumers, capped[-1].output[0] if capped else scaled, "Add")
            mask = next(i for i in add.input if i != (capped[-1].output[0] if capped else scaled))
            if mask not in mask_windows:
                mask_windows[mask] = _mask_window(model, mask, ctx_len, weights_dir, layer)
            window = mask_windows[mask]
            chain += [*capped, add]
            probs, reshaped = _score_no_ops(g, consumers, producers, add.output[0])
            chain += reshaped
        sink, post = None, None  # attention sinks: the per-head extra logit (GQA's head_sink); a context scaling
        users = [u for u in consumers.get(probs, []) if u.op_type != "Shape"]
        if [u.op_type for u in users] == ["Softmax"]:
            nxt = users[0]
            while True:
                chain.append(nxt)
                users = consumers.get(nxt.output[0], [])
                if len(users) != 1:
                    raise RewriteNotApplicable(f"layer {layer}: attention probabilities have {len(users)} users")
                nxt = users[0]
                if nxt.op_type not in ("Cast", "Identity", "Dropout", "Reshape"):  # Dropout: eval mode, one output
                    break
        else:
            sink, block, nxt, post = _sink_block(g, consumers, producers, probs, values, layer)
            chain += block
        if nxt.op_type != "MatMul" or nxt.input[1] != values or [u.op_type for u in consumers[values]
                                                                     if u.op_type != "Shape"] != ["MatMul"]:
            raise RewriteNotApplicable(f"layer {layer}: probabilities do not multiply the gathered values")
        chain.append(nxt)
        context = nxt.output[0]
        if post is not None:  # the context scaled by the sinks' factor: that scaled context is GQA's output
            chain.append(post)
            context = post.output[0]
        # the context [B, H, S, D] -> reshapes/transposes -> the output projection MatMul (an initializer weight
        # [H*D, out], or Transpose of one [out, H*D] as the streamed export writes it)
        # `sized`: the context is rebuilt under its own name and everything after it stays as exported, when a
        # Shape reads it on its way to the projection (gpt2's merge_heads), or when something else comes first (a
        # gate, gated attention; a norm, bitnet): the projection's input size then comes from the first one
        # downstream
        out, sized, o_proj = context, False, None
        while True:
            sized = sized or any(u.op_type == "Shape" for u in consumers.get(out, []))
            users = [u for u in consumers.get(out, []) if u.op_type != "Shape"]
            o_rows = _projection_rows(users[0], weights, producers) if len(users) == 1 else None
            if o_rows is not None:
                o_proj = users[0]
                break
            if len(users) != 1 or (users[0].op_type not in ("Reshape", "Transpose")
                                   and not _is_fp32_cast(users[0])):
                o_rows, sized = _first_projection_rows(consumers, out, weights, producers), True
                if o_rows is None:
                    raise RewriteNotApplicable(f"layer {layer}: attention context goes through "
                                               f"{[u.op_type for u in users]} and no output projection follows")
                break
            out = users[0].output[0]
        # q: the score MatMul's left operand, traced back through Reshape (and fp32 casts) to [B, H, S, D]
        q = scores.input[0]
        while producers.get(q) is not None and (producers[q].op_type == "Reshape" or _is_fp32_cast(producers[q])):
            q = producers[q].input[0]
        head_dim = _dims(inputs[past_key])[3]
        kv_heads = _dims(inputs[past_key])[1]
        hidden = o_rows
        if not isinstance(head_dim, int) or not isinstance(kv_heads, int) or hidden % head_dim:
            raise RewriteNotApplicable(f"layer {layer}: head sizes are not static ({kv_heads}, {head_dim}, {hidden})")
        if sized and merged:
            raise RewriteNotApplicable(f"layer {layer}: a context of merged batch x heads read before its projection")
        if head_dim % 8:
            raise RewriteNotApplicable(f"layer {layer}: head_dim {head_dim} is not a multiple of 8, which ONNX "
                                       "Runtime's GroupQueryAttention kernel requires")
        tag = f"gqa/{layer}"
        k = scatters[past_key].input[-1]  # the updates: the last input of both scatter kinds
        q_rope, k_rope = (_match_rope(q, with_constants), _match_rope(k, with_constants)) if rotary else (None, None)
        caches = []  # GQA's cos_cache / sin_cache inputs when the rotation moves into the op
        if q_rope is not None and k_rope is not None and q_rope[1:] == k_rope[1:]:
            tables = q_rope[1:]
            if tables not in rope_caches:
                rope_caches[tables] = _rope_caches(g, tables, head_dim, ctx_len, weights_dir, producers)
            if rope_caches[tables] is not None:
                (q, k), caches = (q_rope[0], k_rope[0]), list(rope_caches[tables])
        q_bsh, q_nodes = to_bsh(q, f"{tag}/q")
        k_bsh, k_nodes = to_bsh(k, f"{tag}/k")
        v_bsh, v_nodes = to_bsh(scatters[past_value].input[-1], f"{tag}/v")
        extra = list(caches)  # optional inputs: cos_cache, sin_cache, (position_ids, attention_bias,) head_sink
        sink_nodes = []
        if sink is not None:
            if _elements(g, sink) != hidden // head_dim:
                raise RewriteNotApplicable(f"layer {layer}: its attention sinks ({sink}) are not one per query head")
            sink_nodes = [_constant(f"{tag}/flat", np.array([-1], np.int64)),
                          helper.make_node("Reshape", [sink, f"{tag}/flat"], [f"{tag}/head_sink"], name=f"{tag}/head_sink")]
            extra = [*(caches or ["", ""]), "", "", f"{tag}/head_sink"]
        gqa = helper.make_node(
            "GroupQueryAttention",
            [q_bsh, k_bsh, v_bsh, past_key, past_value, SEQLENS_K, "gqa/total_sequence_length", *extra],
            [f"{tag}/out", past_key + RETAINED_SUFFIX, past_value + RETAINED_SUFFIX],
            name=f"{tag}/GroupQueryAttention", domain=MS_DOMAIN,
            num_heads=hidden // head_dim, kv_num_heads=kv_heads, scale=scale, do_rotary=int(bool(caches)),
            **({"local_window_size": window} if window else {}), **({"softcap": softcap} if softcap else {}))
        o_nodes = []
        if sized:  # GQA's [B, S, H*D] output goes back to [B, H, S, D] under the context's name
            o_nodes = [_constant(f"{tag}/bshd", np.array([0, 0, hidden // head_dim, head_dim], np.int64)),
                       helper.make_node("Reshape", [f"{tag}/out", f"{tag}/bshd"], [f"{tag}/out4d"], name=f"{tag}/out4d"),
                       helper.make_node("Transpose", [f"{tag}/out4d"], [context], perm=[0, 2, 1, 3],
                                        name=f"{tag}/context")]
        else:  # the projection reads GQA's output directly (a Gemm: flattened to [B*S, hidden])
            if o_proj.op_type == "Gemm":
                o_nodes = [_constant(f"{tag}/rows_hidden", np.array([-1, hidden], np.int64)),
                           helper.make_node("Reshape", [f"{tag}/out", f"{tag}/rows_hidden"], [f"{tag}/out2d"],
                                            name=f"{tag}/out2d")]
            o_proj.input[0] = o_nodes[-1].output[0] if o_nodes else f"{tag}/out"
        new_nodes.append((scores, [*q_nodes, *k_nodes, *v_nodes, *sink_nodes, gqa, *o_nodes]))
        drop.update(id(n) for n in (*chain, *scatters.values(), *gathers.values()))

    first = [_constant("gqa/shape_bs_1", np.array([0, 0, -1], np.int64)),
             helper.make_node("ReduceMax", [SEQLENS_K], ["gqa/max_seqlen"], keepdims=0, name="gqa/max_seqlen"),
             _constant("gqa/one", np.array(1, np.int32)),
             helper.make_node("Add", ["gqa/max_seqlen", "gqa/one"], ["gqa/total_sequence_length"],
                              name="gqa/total_sequence_length")]
    before = {id(anchor): nodes for anchor, nodes in new_nodes}
    nodes = list(first)
    for n in g.node:
        nodes.extend(before.get(id(n), []))
        if id(n) not in drop:
            nodes.append(n)
    nodes = _live(nodes, {o.name for o in g.output})
    defined = {i.name for i in g.input} | {i.name for i in g.initializer} | {SEQLENS_K, ""}
    for n in nodes:  # a removed tensor still read elsewhere (a Shape of the gathered context used by another part)
        missing = [i for i in n.input if i not in defined]
        if missing:
            raise RewriteNotApplicable(f"{n.name or n.op_type} still reads {missing[0]}, which the rewrite removes")
        defined.update(n.output)
    if BATCH_INDEX in inputs:  # continuous batching: cache row r is slot r, the runner binds the slots' rows
        still = sorted({n.op_type for n in nodes if BATCH_INDEX in n.input})
        if still:
            raise RewriteNotApplicable(f"continuous batching with batch_index also read by {still} (only its use by "
                                       "CtxScatterCB/CtxGatherCB goes away: GQA's cache rows are the batch)")
        g.input.remove(inputs[BATCH_INDEX])
    del g.node[:]
    g.node.extend(nodes)
    batch = _dims(inputs[INPUT_IDS])[0]
    g.input.append(helper.make_tensor_value_info(SEQLENS_K, TensorProto.INT32, [batch]))
    used_domains = {n.domain for n in g.node}
    kept = [f for f in model.functions if f.domain in used_domains and any(
        n.op_type == f.name and n.domain == f.domain for n in g.node)]
    del model.functions[:]
    model.functions.extend(kept)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    del g.value_info[:]  # shapes of removed tensors; ORT infers what it needs
    return model, len(pasts)


def _first_projection_rows(consumers, start: str, weights: dict[str, list], producers, limit: int = 64) -> int | None:
    """The input size of the first projection (`_projection_rows`) downstream of `start`, breadth first over at most
    `limit` nodes; None when none is found. (A wrong guess makes GroupQueryAttention's head count disagree with
    the query: ONNX Runtime refuses it or `verify` sees the logits differ, and the exported graph runs.)"""
    frontier, seen = [start], 0
    while frontier and seen < limit:
        name = frontier.pop(0)
        for u in consumers.get(name, []):
            seen += 1
            rows = _projection_rows(u, weights, producers)
            if rows is not None:
                return rows
            frontier.extend(u.output)
    return None


def _projection_rows(node, weights: dict[str, list], producers) -> int | None:
    """The input size of an output projection: MatMul(x, W) (`_weight_rows`), or Gemm(x, W[, bias]) with x not
    transposed (gpt2's Conv1D); None when `node` is neither."""
    if node.op_type == "MatMul":
        return _weight_rows(node.input[1], weights, producers)
    if node.op_type != "Gemm" or len(node.input) < 2 or node.input[1] not in weights:
        return None
    attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
    shape = weights[node.input[1]]
    if attrs.get("transA", 0) or len(shape) != 2:
        return None
    return shape[1] if attrs.get("transB", 0) else shape[0]


def _weight_rows(name: str, weights: dict[str, list], producers) -> int | None:
    """The input size of a projection's weight: rows of a [in, out] initializer, or columns of an [out, in]
    initializer behind Transpose(perm [1, 0]); None for anything else."""
    if name in weights:
        return weights[name][0] if len(weights[name]) == 2 else None
    node = producers.get(name)
    if (node is not None and node.op_type == "Transpose" and node.input[0] in weights
            and len(weights[node.input[0]]) == 2 and _perm(node) in (None, [1, 0])):
        return weights[node.input[0]][1]
    return None


def _perm(node) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


def _ints(name: str, producers, depth: int = 0) -> list[int] | None:
    """The values (flattened) of a small int constant: a Constant node (small initializers are given to the rewrite
    as Constant nodes too), or Unsqueeze / Reshape / Squeeze / Cast / Identity / Concat of such; else None."""
    node = producers.get(name)
    if node is None or depth > 8:
        return None
    if node.op_type == "Constant":
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        return None if value is None else [int(v) for v in numpy_helper.to_array(value).reshape(-1)]
    if node.op_type in ("Unsqueeze", "Reshape", "Squeeze", "Cast", "Identity"):
        return _ints(node.input[0], producers, depth + 1)  # the values, flattened, do not change
    if node.op_type == "Concat":
        parts = [_ints(i, producers, depth + 1) for i in node.input]
        return None if any(p is None for p in parts) else [v for p in parts for v in p]
    return None


def _match_rope(x_rot: str, producers) -> tuple[str, str, str] | None:
    """(x, cos table, sin table) when x_rot = x * cos + rotate_half(x) * sin, with rotate_half(x) =
    concat(-x[..., R/2:], x[..., :R/2]) and cos/sin = Unsqueeze(Cast?(Gather(table, Clip*(position_ids)))) over
    [positions, R] tables, R the whole head or (partial rotary) concat(rotated x[..., :R], x[..., R:]); None for
    any other form (the rotation then stays outside the op, as exported)."""
    node = producers.get(x_rot)
    if node is not None and node.op_type == "Concat" and len(node.input) == 2 and _axis(node) in (3, -1):
        rot, rest = producers.get(node.input[0]), producers.get(node.input[1])
        inner = _match_rope(node.input[0], producers) if rot is not None and rot.op_type == "Add" else None
        part = producers.get(inner[0]) if inner is not None else None
        if part is None or rest is None or part.op_type != "Slice" or rest.op_type != "Slice":
            return None
        x = part.input[0]
        if rest.input[0] != x or len(part.input) < 4 or len(rest.input) < 4:
            return None
        r = _ints(part.input[2], producers)
        if (_ints(part.input[1], producers) != [0] or not r or _ints(rest.input[1], producers) != r
                or any(_ints(n.input[3], producers) not in ([3], [-1]) for n in (part, rest))
                or any(len(n.input) > 4 and _ints(n.input[4], producers) not in (None, [1]) for n in (part, rest))):
            return None
        return x, inner[1], inner[2]
    add = node
    if add is None or add.op_type != "Add":
        return None
    muls = [producers.get(i) for i in add.input]
    if any(m is None or m.op_type != "Mul" for m in muls):
        return None
    found = {}
    for mul in muls:
        for a, b in (mul.input, mul.input[::-1]):
            table = _position_table(b, producers)
            if table is None:
                continue
            concat = producers.get(a)
            if concat is not None and concat.op_type == "Concat" and len(concat.input) == 2:
                found["sin"] = (table, concat)
            else:
                found["cos"] = (table, a)
            break
    if set(found) != {"cos", "sin"}:
        return None
    x, concat = found["cos"][1], found["sin"][1]
    neg, low = producers.get(concat.input[0]), producers.get(concat.input[1])
    high = producers.get(neg.input[0]) if neg is not None and neg.op_type == "Neg" else None
    if high is None or low is None or high.op_type != "Slice" or low.op_type != "Slice":
        return None
    if high.input[0] != x or low.input[0] != x or len(high.input) < 4 or len(low.input) < 4:
        return None
    h_start, l_start, l_end = (_ints(n, producers) for n in (high.input[1], low.input[1], low.input[2]))
    h_axes, l_axes = _ints(high.input[3], producers), _ints(low.input[3], producers)
    if l_end is None and h_start is None and all(_half_last_dim(n, x, producers) for n in (low.input[2], high.input[1])):
        l_end = h_start = ["x.shape[-1] // 2"]  # the generic path: rotate_half's split traced from x's shape
    if not (l_start == [0] and l_end and h_start == l_end and h_axes in ([3], [-1]) and l_axes in ([3], [-1])):
        return None
    if any(len(n.input) > 4 and _ints(n.input[4], producers) not in (None, [1]) for n in (high, low)):
        return None
    return x, found["cos"][0], found["sin"][0]


def _axis(node) -> int | None:
    return next((a.i for a in node.attribute if a.name == "axis"), None)


def _position_table(name: str, producers) -> str | None:
    """The table name when `name` is Unsqueeze(axes [1]) of Cast-to-float?(Gather(table, Clip*(position_ids)))."""
    node = producers.get(name)
    if node is None or node.op_type != "Unsqueeze" or _ints(node.input[1], producers) != [1]:
        return None
    node = producers.get(node.input[0])
    if node is not None and node.op_type == "Cast":
        if next((a.i for a in node.attribute if a.name == "to"), None) != TensorProto.FLOAT:
            return None
        node = producers.get(node.input[0])
    if node is None or node.op_type != "Gather" or any(a.name == "axis" and a.i != 0 for a in node.attribute):
        return None
    index = node.input[1]
    while producers.get(index) is not None and producers[index].op_type == "Clip":  # generic path: two clamps
        index = producers[index].input[0]
    return node.input[0] if index == POSITION_IDS else None


def _half_last_dim(name: str, x: str, producers) -> bool:
    """Whether `name` is Unsqueeze(axes [0]) of Cast*(Div(Gather(Shape(x), 3 or -1), 2)): x.shape[-1] // 2 as the
    TorchScript exporter traces rotate_half's split on the generic path (x's last dimension, not a constant)."""
    node = producers.get(name)
    if node is None or node.op_type != "Unsqueeze" or _ints(node.input[1], producers) != [0]:
        return False
    node = producers.get(node.input[0])
    while node is not None and node.op_type == "Cast":
        node = producers.get(node.input[0])
    if node is None or node.op_type != "Div" or _ints(node.input[1], producers) != [2]:
        return False
    gather, shape = producers.get(node.input[0]), None
    if gather is not None and gather.op_type == "Gather" and _ints(gather.input[1], producers) in ([3], [-1]):
        shape = producers.get(gather.input[0])
    return shape is not None and shape.op_type == "Shape" and shape.input[0] == x and not shape.attribute


def _table_values(graph, name: str, weights_dir: Path | None, producers) -> np.ndarray | None:
    node = producers.get(name)
    if node is not None:
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        return None if value is None else numpy_helper.to_array(value)
    init = next((i for i in graph.initializer if i.name == name), None)
    if init is None or (init.data_location == TensorProto.EXTERNAL and weights_dir is None):
        return None
    return numpy_helper.to_array(init, str(weights_dir) if weights_dir is not None else "")


def _rope_caches(graph, tables: tuple[str, str], head_dim, ctx_len: int | None, weights_dir: Path | None,
                 producers) -> tuple[str, str] | None:
    """GQA's cos_cache / sin_cache ([positions, R/2], fp32) as new initializers, from [positions, R] tables
    (R <= head_dim, even) whose two halves repeat (rotate_half's layout); ctx_len + 1 rows (the spare slot's
    position reads the last). None when the tables are not of that form."""
    values = [_table_values(graph, t, weights_dir, producers) for t in tables]
    if any(v is None or v.ndim != 2 or v.shape != values[0].shape for v in values):
        return None
    half = values[0].shape[1] // 2  # ORT's kernel takes R/2 a multiple of 8 and R <= head_dim
    if not half or half % 8 or 2 * half != values[0].shape[1] or not isinstance(head_dim, int) or 2 * half > head_dim:
        return None
    if any(not np.array_equal(v[:, :half], v[:, half:]) for v in values):
        return None
    rows = values[0].shape[0] + 1 if ctx_len is None else ctx_len + 1
    names = []
    for kind, v in zip(("cos", "sin"), values):
        cache = np.zeros((rows, half), np.float32)
        n = min(rows, v.shape[0])
        cache[:n] = v[:n, :half]
        names.append(f"gqa/{kind}_cache/{len(graph.initializer)}")
        graph.initializer.append(numpy_helper.from_array(cache, names[-1]))
    return names[0], names[1]


# ----------------------------------------------------------------------------- the generic path's attention
def _score_no_ops(graph, consumers, producers, name: str) -> tuple[str, list]:
    """(the tensor after the ops on the scores that change no value GQA sees, those nodes), followed while each is
    `name`'s only consumer: Reshapes between [B * H, S, ctx] and [B, H, S, ctx] (xglm, trocr), Max(x, c <= MASK_VALUE)
    clamps at the dtype's minimum (they only lift -inf; masked entries still get probability 0) and the addition of
    zeros (torch.baddbmm's beta * zeros accumulator, gpt_neox_japanese)."""
    nodes = []
    while True:
        users = [u for u in consumers.get(name, []) if u.op_type != "Shape"]
        if len(users) != 1 or name not in users[0].input:
            return name, nodes
        user = users[0]
        others = [i for i in user.input if i != name]
        reshape = user.op_type == "Reshape" and user.input[0] == name
        clamp = (user.op_type == "Max" and len(others) == 1 and user.input[0] == name
                 and (_scalar(graph, others[0], producers) or 0.0) <= MASK_VALUE)
        zeros = user.op_type == "Add" and len(others) == 1 and _zeros(others[0], producers)
        if not (reshape or clamp or zeros):
            return name, nodes
        nodes.append(user)
        name = user.output[0]


def _zeros(name: str, producers) -> bool:
    """Whether `name` is all zeros by construction: ConstantOfShape with value 0, scaled, cast or reshaped."""
    node = producers.get(name)
    if node is None:
        return False
    if node.op_type == "Mul":
        return any(_zeros(i, producers) for i in node.input)
    if node.op_type in ("Cast", "Expand", "Reshape", "Identity"):
        return _zeros(node.input[0], producers)
    if node.op_type != "ConstantOfShape":
        return False
    value = next((a.t for a in node.attribute if a.name == "value"), None)
    return value is None or not numpy_helper.to_array(value).any()  # no value attribute: zeros (the ONNX default)


def _is_fp32_cast(node) -> bool:
    return node.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.FLOAT for a in node.attribute)


def _fp32_casts(consumers, name: str) -> tuple[str, list]:
    """(the tensor after any Cast(to FLOAT) chain that is `name`'s only consumer, those casts). The cache is fp32,
    so these casts change nothing."""
    casts = []
    while True:
        users = consumers.get(name, [])
        if len(users) != 1 or not _is_fp32_cast(users[0]):
            return name, casts
        casts.append(users[0])
        name = users[0].output[0]


def _kv_operand(consumers, gathered: str, layer: str, producers) -> tuple[str, list, bool]:
    """(the keys / values the attention reads, the nodes on the way): the gathered cache, through fp32 casts (models
    that upcast attention, e.g. gptj: the cache is fp32, so they change nothing), repeat_kv, fp32 casts again, and
    a Reshape that merges batch and heads ([B * H, ctx, D], models written with torch.bmm: the third value)."""
    name, before = _fp32_casts(consumers, gathered)
    name, repeat = _repeat_kv(consumers, name, layer, producers)
    name, after = _fp32_casts(consumers, name)
    users = [u for u in consumers.get(name, []) if u.op_type != "Shape"]
    if len(users) == 1 and users[0].op_type == "Reshape":  # batch and heads merged for a 3-D bmm (xglm, trocr)
        return users[0].output[0], [*before, *repeat, *after, users[0]], True
    return name, [*before, *repeat, *after], False


def _repeat_kv(consumers, gathered: str, layer: str, producers) -> tuple[str, list]:
    """(the tensor the scores read, the repeat_kv nodes): transformers' repeat_kv expands the gathered
    [B, kv_heads, ctx, D] to the query heads as Reshape(Expand(Unsqueeze(x, axes [2]))), each kv head repeated for
    consecutive query heads, GQA's own grouping; its sizes come from Shape(x). Without that chain (the family blocks,
    n_rep 1) the gathered tensor itself."""
    users = [u for u in consumers.get(gathered, []) if u.op_type != "Shape"]
    if len(users) != 1 or users[0].op_type != "Unsqueeze":
        return gathered, []
    unsqueeze = users[0]
    if _ints(unsqueeze.input[1], producers) != [2]:
        raise RewriteNotApplicable(f"layer {layer}: the gathered keys/values are unsqueezed at axes "
                                   f"{_ints(unsqueeze.input[1], producers)}, not repeat_kv's [2]")
    expand = _only_consumer(consumers, unsqueeze.output[0], "Expand")
    reshape = _only_consumer(consumers, expand.output[0], "Reshape")
    if expand.input[0] != unsqueeze.output[0] or reshape.input[0] != expand.output[0]:
        raise RewriteNotApplicable(f"layer {layer}: the gathered keys/values are not expanded as repeat_kv does")
    return reshape.output[0], [unsqueeze, expand, reshape]


def _softcap(graph, consumers, producers, scores: str, layer: str) -> tuple[float, list]:
    """(c, [Div, Tanh, Mul]) when the scaled scores are soft-capped as tanh(x / c) * c (GQA's `softcap`, applied
    after the scale and before the mask as in the models' eager attention), else (0.0, [])."""
    users = consumers.get(scores, [])
    if len(users) != 1 or users[0].op_type != "Div":
        return 0.0, []
    div = users[0]
    tanh = _only_consumer(consumers, div.output[0], "Tanh")
    mul = _only_consumer(consumers, tanh.output[0], "Mul")
    cap = _scalar(graph, div.input[1], producers)
    other = next((i for i in mul.input if i != tanh.output[0]), None)
    if div.input[0] != scores or cap is None or cap <= 0 or other is None or _scalar(graph, other, producers) != cap:
        raise RewriteNotApplicable(f"layer {layer}: the scores are soft-capped in a form other than tanh(x / c) * c")
    return cap, [div, tanh, mul]


MASK_ROWS = 256  # query positions per ONNX Runtime call when the generic path's mask is evaluated


SINK_BLOCK_OPS = ("Concat", "ReduceMax", "ReduceLogSumExp", "Sub", "Sigmoid", "Unsqueeze", "Softmax", "Slice", "Cast",
                  "Identity", "Dropout")
SINK_SOURCE_OPS = ("Reshape", "Expand", "Cast", "Unsqueeze", "Squeeze", "Identity")


def _sink_block(graph, consumers, producers, scores: str, values: str, layer: str):
    """Attention sinks, what GQA's `head_sink` input computes (softmax with one more per-head logit in the
    denominator), in either form the models write:
    - the masked scores concatenated with the sinks along the key axis, [max-subtracted,] softmaxed, the sink column
      sliced off (gpt_oss, flint, mimo_v2_flash);
    - the context scaled by sigmoid(logsumexp(scores) - sinks) (granite_swa), the same value;
    or the max subtracted before the softmax and no sink (None). Returns (the sinks tensor or None, the block's
    nodes, the MatMul of the probabilities with the values, the Mul scaling its output or None). Only the block's
    form is read here; `verify` proves the rewritten graph computes what the exported one does."""
    pv = [u for u in consumers.get(values, []) if u.op_type == "MatMul" and u.input[1] == values]
    if len(pv) != 1:
        raise RewriteNotApplicable(f"layer {layer}: the values are not the right operand of one MatMul")
    block, frontier, seen, post = [], [scores], set(), None
    while frontier:  # every node between the masked scores and that MatMul (Shape readers left to die)
        for user in consumers.get(frontier.pop(), []):
            if id(user) in seen or user is pv[0] or user.op_type == "Shape":
                continue
            seen.add(id(user))
            if user.op_type == "Mul" and pv[0].output[0] in user.input:  # the context's scaling: not walked past
                post = user
                continue
            if user.op_type not in SINK_BLOCK_OPS:
                raise RewriteNotApplicable(f"layer {layer}: the masked scores go through {user.op_type} before the "
                                           "softmax (not a form GroupQueryAttention expresses)")
            block.append(user)
            frontier.extend(user.output)
    concats = [n for n in block if n.op_type == "Concat"]
    produced = {o for n in block for o in n.output}
    if (len(concats) > 1 or [n.op_type for n in block].count("Softmax") != 1 or pv[0].input[0] not in produced
            or (concats and _axis(concats[0]) not in (-1, 3))):
        raise RewriteNotApplicable(f"layer {layer}: the masked scores feed {sorted({n.op_type for n in block})}, not "
                                   "one Softmax (nor scores concatenated with a per-head sink logit)")
    lse = [n for n in block if n.op_type == "ReduceLogSumExp"]
    if lse:  # sigmoid(lse - sinks) scales the context
        subs = [n for n in block if n.op_type == "Sub" and n.input[0] == lse[0].output[0]]
        if concats or len(lse) != 1 or len(subs) != 1 or post is None:
            raise RewriteNotApplicable(f"layer {layer}: a log-sum-exp of the scores used other than as "
                                       "sigmoid(lse - sinks) scaling the context")
        outside = [subs[0].input[1]]
    elif post is not None or not concats:
        if post is not None or {n.op_type for n in block} - {"ReduceMax", "Sub", "Softmax", "Cast", "Identity",
                                                              "Dropout"}:
            raise RewriteNotApplicable(f"layer {layer}: the masked scores feed {sorted({n.op_type for n in block})} "
                                       "before the softmax (not a form GroupQueryAttention expresses)")
        return None, block, pv[0], None  # the max subtracted before the softmax only (mimo_v2_flash without sinks)
    else:
        outside = [i for i in concats[0].input if i not in produced and i != scores]
    sink = outside[0] if len(outside) == 1 else None
    while sink in producers and producers[sink].op_type in SINK_SOURCE_OPS:
        sink = producers[sink].input[0]
    if sink is None or _elements(graph, sink) is None:
        raise RewriteNotApplicable(f"layer {layer}: the scores meet something other than a constant per-head sink "
                                   "logit")
    return sink, block, pv[0], post


def _elements(graph, name: str) -> int | None:
    """The element count of a float initializer, else None."""
    init = next((i for i in graph.initializer if i.name == name), None)
    if init is None or init.data_type != TensorProto.FLOAT:
        return None
    return int(np.prod(init.dims))


def _mask_window(model: onnx.ModelProto, mask: str, ctx_len: int | None, weights_dir: Path | None,
                 layer: str, boolean: bool = False) -> int | None:
    """The sliding window of an attention mask (None: plain causal within ctx_len), proven by evaluating it: the
    mask's subgraph runs on ONNX Runtime for query positions 0 .. ctx_len - 1 against every slot. The generic
    path's additive mask must be 0 exactly where kv <= q (and q - kv < W) and <= MASK_VALUE elsewhere; a family's
    boolean mask (`boolean`: True = masked) False exactly there. Anything else (chunked attention, a bidirectional
    part, an ALiBi bias folded into the mask) is refused."""
    import onnxruntime as ort

    if ctx_len is None:
        raise RewriteNotApplicable(f"layer {layer}: the attention mask is proven for one ctx_len; none given")
    g = model.graph
    nodes = _live(list(g.node), {mask})
    read = {i for n in nodes for i in n.input}
    inputs = [i for i in g.input if i.name in read]
    sub = helper.make_model(
        helper.make_graph(nodes, "mask", inputs, [helper.make_tensor_value_info(
            mask, TensorProto.BOOL if boolean else TensorProto.FLOAT, None)],
                          [i for i in g.initializer if i.name in read]),
        opset_imports=list(model.opset_import), functions=list(model.functions), ir_version=model.ir_version)
    try:
        sess = ort.InferenceSession(sub.SerializeToString(), session_options(1, weights_dir),
                                    providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ONNX Runtime's own error classes
        raise RewriteNotApplicable(f"layer {layer}: its mask could not be evaluated ({' '.join(str(e).split())[:200]})")
    unknown = [i.name for i in inputs if i.name not in (INPUT_IDS, POSITION_IDS, BATCH_INDEX)
               and not i.name.startswith("past_")]
    if unknown:
        raise RewriteNotApplicable(f"layer {layer}: its mask reads {unknown}, not only the positions")

    def evaluate(q: np.ndarray) -> np.ndarray:  # allowed [copies, len(q), ctx_len] for query positions q
        feeds = {}
        for i in inputs:
            if i.name == POSITION_IDS:
                feeds[i.name] = q[None].astype(np.int64)
            elif i.name == INPUT_IDS:
                feeds[i.name] = np.zeros((1, len(q)), np.int64)
            elif i.name == BATCH_INDEX:
                feeds[i.name] = np.zeros((1, 1), np.int64)
            else:  # past_*: one row of ctx_len slots
                feeds[i.name] = np.zeros((1, _dims(i)[1], ctx_len, _dims(i)[3]), np.float32)
        m = sess.run([mask], feeds)[0]
        if m.shape[-1] != ctx_len or m.size % (len(q) * ctx_len):
            raise RewriteNotApplicable(f"layer {layer}: its mask has shape {list(m.shape)}, not [.., S, ctx_len]")
        if not boolean and not np.all((m == 0) | (m <= MASK_VALUE)):
            raise RewriteNotApplicable(f"layer {layer}: its additive mask holds values other than 0 and <= "
                                       f"{MASK_VALUE:g} (a bias such as ALiBi); GroupQueryAttention takes none")
        allowed = ~m if boolean else m == 0
        return allowed.reshape(-1, ctx_len)

    def same(allowed: np.ndarray, expected: np.ndarray) -> bool:
        """Every copy of the rows (per head, or the family's heads folded into the sequence axis, either order) is
        the expected one."""
        k, n = allowed.shape[0] // len(expected), len(expected)
        return (np.array_equal(allowed.reshape(k, n, ctx_len), np.broadcast_to(expected, (k, n, ctx_len)))
                or np.array_equal(allowed.reshape(n, k, ctx_len), np.broadcast_to(expected[:, None], (n, k, ctx_len))))

    slots = np.arange(ctx_len)
    last = evaluate(np.array([ctx_len - 1]))  # the last position sees W slots, or all with no window acting
    count = int(last[0].sum())
    window = count if count < ctx_len else None
    for start in range(0, ctx_len, MASK_ROWS):
        q = np.arange(start, min(start + MASK_ROWS, ctx_len))
        expected = slots[None] <= q[:, None]
        if window is not None:
            expected &= q[:, None] - slots[None] < window
        if not same(evaluate(q), expected):
            raise RewriteNotApplicable(f"layer {layer}: its mask is neither causal nor a causal sliding window over "
                                       f"ctx_len {ctx_len} (chunked or bidirectional attention?); GroupQueryAttention "
                                       "expresses only those")
    return window


def _live(nodes: list, outputs: set[str]) -> list:
    """The nodes that some graph output depends on, in their order."""
    needed, keep = set(outputs), []
    for n in reversed(nodes):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    return keep[::-1]


# ----------------------------------------------------------------------------- compile step
def write_ort_graph(onnx_path: Path, folder: Path, ctx_len: int | None = None, rotary: bool = True) -> OrtGraphPlan:
    """Write the rewritten graph into `folder` (graph only: its weights stay in the export's external-data file,
    which the session reads from the export folder) or say why the exported graph runs as it is."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    before = len(model.graph.node)
    try:
        model, layers = rewrite_gqa(model, ctx_len, onnx_path.parent, rotary)
    except RewriteNotApplicable as e:
        return OrtGraphPlan("exported", f"exported graph kept: {e}")
    onnx.save(model, str(folder / ORT_GRAPH))
    rotary = sum(1 for n in model.graph.node if n.op_type == "GroupQueryAttention"
                 and any(a.name == "do_rotary" and a.i for a in n.attribute))
    inside = f"; rotary inside the op in {rotary}" if rotary else ""
    return OrtGraphPlan("gqa", f"attention of {layers} layer(s) replaced by com.microsoft.GroupQueryAttention "
                               f"(KV cache updated in place{inside})", ORT_GRAPH, layers, before,
                        len(model.graph.node), rotary_layers=rotary)


def plan_ort_graph(onnx_path: Path, folder: Path, specializations: list[dict[str, int]],
                   threads: int | None = None) -> OrtGraphPlan:
    """The embedded backend's compile step: which graph it runs and why; the rewritten graph (checked against the
    exported one) is written into `folder` when it applies. QEFF_LAB_ORT_GRAPH=exported keeps the exported graph."""
    if os.environ.get(GRAPH_ENV, "auto") == "exported":
        return OrtGraphPlan("exported", f"exported graph kept: {GRAPH_ENV}=exported")
    if not specializations or not all("ctx_len" in s and "seq_len" in s for s in specializations):
        return OrtGraphPlan("exported", "exported graph kept: not a retained-KV decoder (no ctx_len/seq_len)")
    ctx_len, prefill = specializations[0]["ctx_len"], max(s["seq_len"] for s in specializations)
    written = write_ort_graph(onnx_path, folder, ctx_len)
    plan = verify(written, onnx_path, folder, ctx_len, prefill, threads)
    if plan.graph == "exported" and written.rotary_layers:
        # the rotation inside the op is what differed or failed: the rewrite with every rotation kept outside
        retry = write_ort_graph(onnx_path, folder, ctx_len, rotary=False)
        if retry.graph == "gqa":
            retry = verify(retry, onnx_path, folder, ctx_len, prefill, threads)
            if retry.graph == "gqa":
                retry.why += f" (rotary kept outside: inside the op, {kept_reason(plan.why)})"
                return retry
    return plan


def ort_graph_summary(plan: dict) -> str:
    """One line for the compile report: which graph the embedded backend runs and why."""
    if plan.get("graph") == "gqa":
        return (f"runs its GroupQueryAttention graph ({plan['layers']} layers, {plan['nodes_before']} -> "
                f"{plan['nodes_after']} nodes; max |logit diff| vs the exported graph {plan['max_logit_diff']:.1e})")
    return f"runs the exported graph ({kept_reason(plan.get('why', ''))})"


def kept_reason(why: str) -> str:
    """A plan's reason for keeping the exported graph without its "exported graph kept: " lead (this module's plans
    and compile.ort_encoder's are worded the same way)."""
    return why.split(": ", 1)[-1]


def graph_choice_key() -> str:
    """What the compile folder's key records about this step (a different rewrite makes a different folder)."""
    return "exported" if os.environ.get(GRAPH_ENV, "auto") == "exported" else REWRITE_VERSION


def verify(plan: OrtGraphPlan, onnx_path: Path, folder: Path, ctx_len: int, prefill_seq_len: int,
           threads: int | None = None, decode_steps: int = 3) -> OrtGraphPlan:
    """Run the exported graph and the rewrite on ONNX Runtime with the same random prompt (a full prefill chunk
    and a shorter one, or as many chunks as reach past the largest sliding window, then `decode_steps` decode steps,
    batch 1; slot 0 of a one-slot cache with continuous batching) and record the largest logit difference; above
    TOLERANCE the exported graph runs instead (the rewritten file is removed)."""
    if plan.graph != "gqa":
        return plan
    P = prefill_seq_len
    graph = onnx.load(str(folder / ORT_GRAPH), load_external_data=False).graph
    # a sliding window (GQA's local_window_size: W slots, the query's own included) acts from position W on: the
    # check reaches past it
    window = max((a.i for n in graph.node if n.op_type == "GroupQueryAttention" for a in n.attribute
                  if a.name == "local_window_size" and a.i >= 0), default=0)
    length = max(1, min(ctx_len - decode_steps - 1, max(P + max(1, P // 2), window + 1)))
    if window and length + decode_steps - 1 < window:
        (folder / ORT_GRAPH).unlink()
        return OrtGraphPlan("exported", f"exported graph kept: a sliding window of {window} acts only at positions "
                                        f"the check within ctx_len {ctx_len} cannot reach")
    logits = next((o for o in graph.output if o.name == "logits"), None)
    vocab = _dims(logits)[-1] if logits is not None else 0
    high = min(100, vocab) if isinstance(vocab, int) and vocab > 0 else 2  # ids every vocabulary has
    tokens = np.random.default_rng(0).integers(0, high, length + decode_steps, dtype=np.int64)
    calls = [(tokens[c:c + P], np.arange(c, min(c + P, length))) for c in range(0, length, P)]
    calls = [(ids[:len(pos)], pos) for ids, pos in calls] + [(tokens[length + s:length + s + 1], np.array([length + s]))
                                                             for s in range(decode_steps)]
    try:
        exported = _run_exported(onnx_path, calls, ctx_len, P, threads)
        rewritten = _run_rewritten(folder / ORT_GRAPH, onnx_path.parent, calls, ctx_len, threads)
    except Exception as e:  # noqa: BLE001 - ONNX Runtime's own error classes: any refusal means "keep the exported graph"
        (folder / ORT_GRAPH).unlink()
        return OrtGraphPlan("exported", f"exported graph kept: the GroupQueryAttention rewrite did not run "
                                        f"({' '.join(str(e).split())[:300]})")
    diff = float(np.abs(exported - rewritten).max())
    plan.max_logit_diff = diff
    if not np.isfinite(diff) or diff > TOLERANCE:
        (folder / ORT_GRAPH).unlink()
        return OrtGraphPlan("exported", f"exported graph kept: the GroupQueryAttention rewrite differed by {diff:.2e} "
                                        f"in logits (> {TOLERANCE:g}) on a check sequence", max_logit_diff=diff)
    return plan


def session_options(threads: int | None = None, weights_dir: Path | None = None):
    """The embedded backend's ONNX Runtime options, one place for every session it opens (this module's check and
    runtime.session): threads, quiet logs, optimisation left at ORT's default (ORT_ENABLE_ALL), and the folder of
    the weights when the graph lives elsewhere. QEFF_LAB_ORT_PROFILE=<file prefix> turns on ONNX Runtime's
    profiler (each session writes <prefix>_<date>.json at session.end_profiling(); benchmarks/profile_ops.py)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or int(os.environ.get("QEFF_LAB_THREADS", "0")) or (os.cpu_count() or 1)
    opts.log_severity_level = 3
    if os.environ.get("QEFF_LAB_ORT_PROFILE"):
        opts.enable_profiling = True
        opts.profile_file_prefix = os.environ["QEFF_LAB_ORT_PROFILE"]
    if weights_dir is not None:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights_dir))
    return opts


def _past_shapes(session) -> dict[str, tuple]:
    """(kv_heads, head_dim) of each past_* input."""
    return {i.name: (i.shape[1], i.shape[3]) for i in session.get_inputs() if i.name.startswith("past_")}


def _run_exported(onnx_path: Path, calls, ctx_len: int, P: int, threads) -> np.ndarray:
    """Logits of each call on the exported graph (padded to the compiled shapes, cache fed back through numpy;
    with continuous batching a cache of one slot, batch_index [[0]])."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), session_options(threads), providers=["CPUExecutionProvider"])
    past = {n: np.zeros((1, h, ctx_len, d), np.float32) for n, (h, d) in _past_shapes(sess).items()}
    names = [o.name for o in sess.get_outputs()]
    cb = BATCH_INDEX in {i.name for i in sess.get_inputs()}
    out = []
    for ids, pos in calls:
        width = P if len(pos) > 1 or P == 1 else 1
        feed_ids, feed_pos = np.zeros((1, width), np.int64), np.full((1, width), -1, np.int64)
        feed_ids[0, :len(ids)], feed_pos[0, :len(pos)] = ids, pos
        feeds = {INPUT_IDS: feed_ids, POSITION_IDS: feed_pos, **past}
        if cb:
            feeds[BATCH_INDEX] = np.zeros((1, 1), np.int64)  # the one-row cache is slot 0
        res = dict(zip(names, sess.run(names, feeds)))
        past = {n: res[n + RETAINED_SUFFIX] for n in past}
        out.append(res["logits"][:, -1])
    return np.concatenate(out)


def _run_rewritten(graph: Path, weights_dir: Path, calls, ctx_len: int, threads) -> np.ndarray:
    """Logits of each call on the rewritten graph, its cache bound in place as the runner binds it."""
    import onnxruntime as ort

    sess = ort.InferenceSession(graph.read_bytes(), session_options(threads, weights_dir), providers=["CPUExecutionProvider"])
    io = sess.io_binding()
    cache = {}
    for n, (h, d) in _past_shapes(sess).items():  # one spare slot, as the runner allocates
        cache[n] = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, h, ctx_len + 1, d), np.float32))
        io.bind_ortvalue_input(n, cache[n])
        io.bind_ortvalue_output(n + RETAINED_SUFFIX, cache[n])
    io.bind_output("logits", "cpu")
    out = []
    for ids, pos in calls:
        feeds = {INPUT_IDS: np.ascontiguousarray(ids[None]), POSITION_IDS: np.ascontiguousarray(pos[None]),
                 SEQLENS_K: np.array([pos[-1]], np.int32)}  # alive until the run is over (bound without a copy)
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        sess.run_with_iobinding(io)
        out.append(io.get_outputs()[len(cache)].numpy()[:, -1].copy())  # the bound buffer is reused
    return np.concatenate(out)


__all__ = [
    "GRAPH_ENV",
    "ORT_GRAPH",
    "REWRITE_VERSION",
    "SEQLENS_K",
    "OrtGraphPlan",
    "RewriteNotApplicable",
    "graph_choice_key",
    "plan_ort_graph",
    "rewrite_gqa",
    "verify",
    "write_ort_graph",
]
