"""The embedded backend's own compile result for encoders: padding tokens skipped in the per-token work.

A device runs each batch padded to a compiled seq_len bucket; so does the embedded backend (it accepts only the
compiled shapes). But every matmul, bias, layer norm and activation of an encoder works on each token alone, and
those make most of its time: this graph runs them on the real tokens only. The attention_mask's non-zero positions
are gathered once (`NonZero`), each per-token op runs on a packed [tokens, width] tensor, and the [batch, seq_len,
width] layout is rebuilt (`Gather` by each position's packed row) only where an op mixes tokens (attention,
pooling, outputs); ops that read a tensor made from the mask alone (hidden * mask before pooling) stay unpacked.
Standard ONNX ops only; ONNX Runtime's own shape inference (`SymbolicShapeInference`) says which tensors are
[batch_size, seq_len, width].

The graph that goes to the device is not touched; this one is written into the compile folder and only ONNX Runtime
runs it. Values at padding positions differ from the exported graph (a copy of the first token's instead of the
states of padding tokens), so the rewrite is checked against the exported graph on inputs with padding (random ids
there too: a model whose real tokens see padding ones, e.g. through a convolution, disagrees) and falls back to the
exported graph, with the reason, when outputs differ by more than TOLERANCE. QEFF_LAB_ORT_GRAPH=exported keeps the
exported graph.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qeff_lab.compile.ort_rewrite import GRAPH_ENV, session_options
from qeff_lab.contracts import ATTENTION_MASK, INPUT_IDS

REWRITE_VERSION = "pack-1"  # part of the compile key: a change here makes a new compile folder
ORT_GRAPH = "ort_encoder.onnx"  # the rewritten graph inside the compile folder
TOLERANCE = 1e-4  # max |output diff| (relative to max(1, |output|)) accepted against the exported graph

UNARY = {"Erf", "Tanh", "Sigmoid", "Relu", "Gelu", "Sqrt", "Neg", "Abs", "Exp", "Log", "Cast", "Identity",
         "Softplus", "Softsign", "Reciprocal", "HardSigmoid", "LeakyRelu", "Elu", "Selu", "Celu", "Mish", "Sin", "Cos"}
BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"}


class EncoderRewriteNotApplicable(ValueError):
    """The exported graph is not one this rewrite handles."""


@dataclass
class EncoderGraphPlan:
    """Which graph the embedded backend runs for an encoder, and why (stored in qconfig.json as `ort_graph`)."""

    graph: str  # "packed" (the rewritten graph) or "exported"
    why: str
    path: str | None = None  # compile-folder file name of the rewritten graph
    packed_ops: int = 0  # ops that run on real tokens only
    matmuls: int = 0  # of which matmuls
    nodes_before: int = 0
    nodes_after: int = 0
    max_abs_diff: float | None = None
    min_cosine: float | None = None
    version: str = REWRITE_VERSION

    def to_json(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- the rewrite
def _shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Symbolic shape of every tensor (ONNX Runtime's SymbolicShapeInference)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    if inferred is None:
        raise EncoderRewriteNotApplicable("ONNX Runtime's symbolic shape inference gave up on this graph")
    g = inferred.graph
    shapes = {}
    for v in [*g.input, *g.value_info, *g.output]:
        if v.type.tensor_type.HasField("shape"):
            shapes[v.name] = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    for init in g.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def pack_tokens(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int, int]:
    """The model with its per-token ops on real tokens only (in place; returned with the number of packed ops and
    of packed matmuls). Raises EncoderRewriteNotApplicable when the graph is not an encoder this handles."""
    g = model.graph
    inputs = {i.name for i in g.input}
    if inputs != {INPUT_IDS, ATTENTION_MASK}:
        raise EncoderRewriteNotApplicable(f"inputs {sorted(inputs)}, expected exactly {INPUT_IDS} and {ATTENTION_MASK}")
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        raise EncoderRewriteNotApplicable("the graph has control flow (If/Loop/Scan subgraphs)")
    shapes = _shapes(model)
    token_dims = shapes.get(ATTENTION_MASK, [])
    if len(token_dims) != 2 or not all(isinstance(d, str) for d in token_dims):
        raise EncoderRewriteNotApplicable(f"{ATTENTION_MASK} is not [batch_size, seq_len] with symbolic sizes")

    def width(name: str) -> int | None:
        """The static last dimension of a [batch_size, seq_len, width] tensor, else None."""
        s = shapes.get(name)
        return s[2] if s and len(s) == 3 and s[:2] == token_dims and isinstance(s[2], int) and s[2] > 0 else None

    def small(name: str) -> bool:  # broadcasts over the last dimension only
        s = shapes.get(name)
        return s is not None and len(s) <= 1

    # tensors computed from the mask alone (not from the tokens): their padding positions carry meaning (e.g.
    # hidden * mask before mean pooling must be 0 there), so ops that read them run unpacked
    from_mask, from_ids = {ATTENTION_MASK}, {INPUT_IDS}
    for n in g.node:
        if any(i in from_mask for i in n.input):
            from_mask.update(n.output)
        if any(i in from_ids for i in n.input):
            from_ids.update(n.output)
    mask_only = from_mask - from_ids

    def packable(n) -> bool:
        if any(i in mask_only for i in n.input):
            return False
        if not n.output or any(width(o) is None for o in n.output) or len(n.output) != 1:
            return False
        data = [i for i in n.input if i]
        if n.op_type == "MatMul":
            return width(n.input[0]) is not None and len(shapes.get(n.input[1], [])) == 2
        if n.op_type == "LayerNormalization":
            axis = next((a.i for a in n.attribute if a.name == "axis"), -1)
            return axis in (-1, 2) and width(n.input[0]) is not None and all(small(i) for i in data[1:])
        if n.op_type in UNARY:
            return len(data) == 1 and width(data[0]) is not None
        if n.op_type in BINARY:
            return len(data) == 2 and all(width(i) is not None or small(i) for i in data) and \
                any(width(i) is not None for i in data)
        return False

    const = lambda name, arr: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name),
                                               name=name)
    # pack/index: the flat positions of the real tokens, then position 0 once more (a spare row, so that no packed
    # tensor is empty); pack/inverse: for each flat position its packed row, the spare row for padding
    out: list = [
        const("pack/flat", np.array([-1], np.int64)),
        const("pack/first", np.array([0], np.int64)),
        const("pack/zero", np.array(0, np.int64)),
        helper.make_node("Reshape", [ATTENTION_MASK, "pack/flat"], ["pack/mask_flat"], name="pack/mask_flat"),
        helper.make_node("NonZero", ["pack/mask_flat"], ["pack/nonzero"], name="pack/nonzero"),
        helper.make_node("Reshape", ["pack/nonzero", "pack/flat"], ["pack/real"], name="pack/real"),
        helper.make_node("Concat", ["pack/real", "pack/first"], ["pack/index"], axis=0, name="pack/index"),
        helper.make_node("Equal", ["pack/mask_flat", "pack/zero"], ["pack/is_pad"], name="pack/is_pad"),
        helper.make_node("Not", ["pack/is_pad"], ["pack/is_real"], name="pack/is_real"),
        helper.make_node("Cast", ["pack/is_real"], ["pack/real_count"], to=TensorProto.INT64, name="pack/real_count"),
        helper.make_node("CumSum", ["pack/real_count", "pack/zero"], ["pack/cumsum"], name="pack/cumsum"),
        const("pack/one", np.array(1, np.int64)),
        helper.make_node("Sub", ["pack/cumsum", "pack/one"], ["pack/row"], name="pack/row"),
        helper.make_node("ReduceSum", ["pack/real_count"], ["pack/spare"], keepdims=0, name="pack/spare"),
        helper.make_node("Where", ["pack/is_real", "pack/row", "pack/spare"], ["pack/inverse"], name="pack/inverse"),
        helper.make_node("Shape", [ATTENTION_MASK], ["pack/batch_seq"], name="pack/batch_seq"),
    ]
    widths: set[int] = set()

    def width_nodes(w: int) -> None:
        if w not in widths:
            widths.add(w)
            out.extend([const(f"pack/w{w}", np.array([w], np.int64)),
                        const(f"pack/rows{w}", np.array([-1, w], np.int64)),
                        helper.make_node("Concat", ["pack/batch_seq", f"pack/w{w}"], [f"pack/shape{w}"], axis=0,
                                         name=f"pack/shape{w}")])

    packed: dict[str, str] = {}  # tensor -> its packed [tokens, width] name
    padded: set[str] = set(inputs) | {i.name for i in g.initializer}  # tensors present in [batch, seq_len, ...] form
    ops = matmuls = 0

    def pack(name: str, before: list) -> str:
        if name not in packed:
            w = width(name)
            width_nodes(w)
            p = f"{name}/packed"
            before.extend([helper.make_node("Reshape", [name, f"pack/rows{w}"], [f"{name}/rows"], name=f"{name}/rows"),
                           helper.make_node("Gather", [f"{name}/rows", "pack/index"], [p], axis=0, name=p)])
            packed[name] = p
        return packed[name]

    def unpack(name: str, before: list) -> None:
        w = width(name)
        width_nodes(w)
        before.extend([
            helper.make_node("Gather", [packed[name], "pack/inverse"], [f"{name}/all_rows"], axis=0,
                             name=f"{name}/all_rows"),
            helper.make_node("Reshape", [f"{name}/all_rows", f"pack/shape{w}"], [name], name=f"{name}/unpacked")])
        padded.add(name)

    for n in g.node:
        before: list = []
        if packable(n) and (n.op_type == "MatMul" or any(i in packed for i in n.input)):
            new = onnx.NodeProto()
            new.CopyFrom(n)
            for k, i in enumerate(n.input):
                if width(i) is not None:
                    new.input[k] = pack(i, before)
            new.output[0] = f"{n.output[0]}/packed"
            packed[n.output[0]] = new.output[0]
            if n.op_type == "LayerNormalization":
                for a in new.attribute:
                    if a.name == "axis":
                        a.i = -1
            ops, matmuls = ops + 1, matmuls + (n.op_type == "MatMul")
            out.extend([*before, new])
            continue
        for i in n.input:
            if i and i not in padded and i in packed:
                unpack(i, before)
        out.extend([*before, n])
        padded.update(n.output)
    tail: list = []
    for o in g.output:
        if o.name not in padded:
            unpack(o.name, tail)
    if not matmuls:
        raise EncoderRewriteNotApplicable("no matmul with a weight on [batch_size, seq_len, width] tensors found")
    del g.node[:]
    g.node.extend(_live([*out, *tail], {o.name for o in g.output}))
    del g.value_info[:]  # ORT infers what it needs
    return model, ops, matmuls


def _live(nodes: list, outputs: set[str]) -> list:
    """The nodes that some graph output depends on, in their order."""
    needed, keep = set(outputs), []
    for n in reversed(nodes):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    return keep[::-1]


# ----------------------------------------------------------------------------- compile step
def is_encoder_compile(specializations: list[dict[str, int]]) -> bool:
    """Encoder-style specializations: batch_size and seq_len, no KV cache (ctx_len)."""
    return bool(specializations) and all("seq_len" in s and "ctx_len" not in s for s in specializations)


def graph_choice_key() -> str:
    """What the compile folder's key records about this step (a different rewrite makes a different folder)."""
    return "exported" if os.environ.get(GRAPH_ENV, "auto") == "exported" else REWRITE_VERSION


def write_encoder_graph(onnx_path: Path, folder: Path) -> EncoderGraphPlan:
    """Write the packed graph into `folder` (weights kept in the export's external-data file when it has one, else
    inline) or say why the exported graph runs as it is."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    before = len(model.graph.node)
    try:
        model, ops, matmuls = pack_tokens(model)
    except EncoderRewriteNotApplicable as e:
        return EncoderGraphPlan("exported", f"exported graph kept: {e}")
    onnx.save(model, str(folder / ORT_GRAPH))
    return EncoderGraphPlan("packed", f"{ops} per-token ops ({matmuls} matmuls) run on real tokens only "
                                      "(padding skipped)", ORT_GRAPH, ops, matmuls, before, len(model.graph.node))


def plan_encoder_graph(onnx_path: Path, folder: Path, specializations: list[dict[str, int]],
                       threads: int | None = None) -> EncoderGraphPlan:
    """The embedded backend's compile step for encoders: which graph it runs and why; the packed graph (checked
    against the exported one) is written into `folder` when it applies."""
    if os.environ.get(GRAPH_ENV, "auto") == "exported":
        return EncoderGraphPlan("exported", f"exported graph kept: {GRAPH_ENV}=exported")
    plan = write_encoder_graph(onnx_path, folder)
    return verify(plan, onnx_path, folder, specializations, threads)


def summary(plan: dict) -> str:
    """One line for the compile report when the packed graph runs."""
    return (f"runs its packed-token graph ({plan['packed_ops']} per-token ops, {plan['matmuls']} matmuls, skip "
            f"padding; max |diff| vs the exported graph {plan['max_abs_diff']:.1e})")


def check_inputs(onnx_path: Path, specializations: list[dict[str, int]], seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Inputs at the smallest and the largest compiled shape, rows of random lengths (at least one token, one row
    full), random ids at padding positions too."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    vocab = next((list(i.dims)[0] for n in model.graph.node if n.op_type == "Gather" and n.input[1] == INPUT_IDS
                  for i in model.graph.initializer if i.name == n.input[0]), 2)
    rng = np.random.default_rng(seed)
    feeds = []
    for spec in sorted({(s.get("batch_size", 1), s["seq_len"]) for s in specializations}, key=lambda s: s[1]):
        b, s = spec
        lengths = rng.integers(1, s + 1, b)
        lengths[0] = s
        feeds.append({INPUT_IDS: rng.integers(0, min(100, vocab), (b, s), dtype=np.int64),
                      ATTENTION_MASK: (np.arange(s)[None] < lengths[:, None]).astype(np.int64)})
    return feeds if len(feeds) <= 2 else [feeds[0], feeds[-1]]


def verify(plan: EncoderGraphPlan, onnx_path: Path, folder: Path, specializations: list[dict[str, int]],
           threads: int | None = None) -> EncoderGraphPlan:
    """Run the exported and the packed graph on ONNX Runtime with the same padded inputs and record the largest
    output difference (and the smallest cosine of output rows); above TOLERANCE the exported graph runs instead
    (the packed file is removed)."""
    if plan.graph != "packed":
        return plan
    import onnxruntime as ort

    def fail(why: str, **measured) -> EncoderGraphPlan:
        (folder / ORT_GRAPH).unlink()
        return EncoderGraphPlan("exported", f"exported graph kept: {why}", **measured)

    try:
        exported = ort.InferenceSession(str(onnx_path), session_options(threads), providers=["CPUExecutionProvider"])
        rewritten = ort.InferenceSession((folder / ORT_GRAPH).read_bytes(), session_options(threads, onnx_path.parent),
                                         providers=["CPUExecutionProvider"])
        diff, cos, real_diff = 0.0, 1.0, 0.0  # real_diff: per-token outputs at real tokens only
        for feed in check_inputs(onnx_path, specializations):
            real = feed[ATTENTION_MASK].astype(bool)
            for a, b in zip(exported.run(None, feed), rewritten.run(None, feed)):
                a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
                if a.shape != b.shape:
                    return fail(f"the packed graph gave shape {b.shape} where the exported one gives {a.shape}")
                scale = max(1.0, np.abs(a).max())
                diff = max(diff, float(np.abs(a - b).max() / scale))
                at_real = a[real] - b[real] if a.shape[:2] == real.shape else a - b
                real_diff = max(real_diff, float(np.abs(at_real).max() / scale))
                rows_a, rows_b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
                norms = np.linalg.norm(rows_a, axis=1) * np.linalg.norm(rows_b, axis=1)
                cos = min(cos, float(((rows_a * rows_b).sum(1) / np.maximum(norms, 1e-30)).min()))
    except Exception as e:  # noqa: BLE001 - ONNX Runtime's own error classes: any refusal means "keep the exported graph"
        return fail(f"the packed graph did not run ({' '.join(str(e).split())[:300]})")
    if not np.isfinite(diff) or diff > TOLERANCE:
        where = ("only at padding positions of its per-token output (a copy of the first token's state there)"
                 if np.isfinite(real_diff) and real_diff <= TOLERANCE else
                 "at real tokens (this model's real tokens see its padding ones)")
        return fail(f"the packed graph differed by {diff:.2e} (> {TOLERANCE:g}) on padded check inputs, {where}",
                    max_abs_diff=diff, min_cosine=cos)
    plan.max_abs_diff, plan.min_cosine = diff, cos
    return plan


__all__ = [
    "ORT_GRAPH",
    "REWRITE_VERSION",
    "EncoderGraphPlan",
    "EncoderRewriteNotApplicable",
    "check_inputs",
    "graph_choice_key",
    "is_encoder_compile",
    "pack_tokens",
    "plan_encoder_graph",
    "summary",
    "verify",
    "write_encoder_graph",
]
