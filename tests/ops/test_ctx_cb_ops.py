"""CtxScatterCB / CtxGatherCB: eager reference == ONNX function under ONNX Runtime; slots by batch_index, padding
and free slots (-1) write nothing, other slots untouched, invalid reads are exact zeros."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from qeff_lab.ops import CUSTOM_OPS, custom_op_counts, ctx_gather_cb, ctx_scatter_cb


class _Ops(torch.nn.Module):
    def forward(self, data, batch_index, position_ids, updates, ctx_indices):
        return ctx_scatter_cb(data, batch_index, position_ids, updates), ctx_gather_cb(data, batch_index, ctx_indices)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    path = tmp_path_factory.mktemp("cbops") / "cb.onnx"
    example = (torch.zeros(4, 3, 8, 5), torch.tensor([[2], [0]]), torch.zeros(2, 3, dtype=torch.long),
               torch.zeros(2, 3, 3, 5), torch.zeros(2, 8, dtype=torch.long))
    names = ["data", "batch_index", "position_ids", "updates", "ctx_indices"]
    torch.onnx.export(_Ops(), example, str(path), dynamo=False, opset_version=17, input_names=names,
                      output_names=["scattered", "gathered"],
                      dynamic_axes={"data": {0: "f", 2: "c"}, "batch_index": {0: "b"}, "position_ids": {0: "b", 1: "s"},
                                    "updates": {0: "b", 2: "s"}, "ctx_indices": {0: "b", 1: "k"}})
    return onnx.load(str(path)), ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _case(batch_index, position_ids, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(4, 3, 8, 5, generator=g)
    updates = torch.randn(len(batch_index), 3, len(position_ids[0]), 5, generator=g)
    ctx_indices = torch.tensor([[i if i <= max(max(r), 0) else -1 for i in range(8)] for r in position_ids])
    return data, torch.tensor(batch_index).view(-1, 1), torch.tensor(position_ids), updates, ctx_indices


CASES = [
    ([[3]], [[0, 1, 2, 3, -1]]),  # prefill into slot 3, padded chunk
    ([[1]], [[-1, -1, -1]]),  # a chunk with no valid position
    ([[0], [1], [2], [3]], [[5], [-1], [2], [-1]]),  # decode over all slots, two of them free
    ([[2], [0]], [[6, 7], [0, -1]]),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_reference_and_onnx_function_agree_and_touch_only_named_slots(session, case):
    model, sess = session
    bi, pos = CASES[case]
    data, batch_index, position_ids, updates, ctx_indices = _case(bi, pos, case)
    scattered, gathered = _Ops()(data, batch_index, position_ids, updates, ctx_indices)
    feeds = {"data": data.numpy(), "batch_index": batch_index.numpy(), "position_ids": position_ids.numpy(),
             "updates": updates.numpy(), "ctx_indices": ctx_indices.numpy()}
    ort_scattered, ort_gathered = sess.run(None, feeds)
    np.testing.assert_array_equal(ort_scattered, scattered.numpy())
    np.testing.assert_array_equal(ort_gathered, gathered.numpy())
    expected = data.clone()
    for r, slot in enumerate(batch_index[:, 0].tolist()):
        for s, p in enumerate(position_ids[r].tolist()):
            if p >= 0:
                expected[slot, :, p] = updates[r, :, s]
    assert torch.equal(scattered, expected)  # untouched slots and padding: bit for bit
    for r, slot in enumerate(batch_index[:, 0].tolist()):
        for k, i in enumerate(ctx_indices[r].tolist()):
            assert torch.equal(gathered[r, :, k], data[slot, :, i] if i >= 0 else torch.zeros(3, 5))


def test_exported_as_registered_custom_nodes(session):
    model, _ = session
    assert custom_op_counts(model) == {"CtxGatherCB": 1, "CtxScatterCB": 1}
    assert CUSTOM_OPS["CtxScatterCB"].domain == CUSTOM_OPS["CtxGatherCB"].domain == "com.qualcomm.cloud"
