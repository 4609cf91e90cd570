"""Custom ops, each defined twice: an eager PyTorch reference and an ONNX function (onnxscript, custom domain).

`ctx_scatter`, `ctx_gather` and `rms_norm` are what model code calls: eagerly they run the reference; under
`torch.onnx.export(..., dynamo=False)` each becomes one node of its custom domain whose function body is
stored in the file, so ONNX Runtime runs the same graph and a device compiler can replace the node.
"""
from qeff_lab.ops.ctx import CTX_DOMAIN, CtxGather, CtxScatter, ctx_gather, ctx_gather_reference, ctx_scatter, ctx_scatter_reference
from qeff_lab.ops.ctx_cb import CtxGatherCB, CtxScatterCB, ctx_gather_cb, ctx_gather_cb_reference, ctx_scatter_cb, ctx_scatter_cb_reference
from qeff_lab.ops.rms_norm import RMS_DOMAIN, CustomRMSNorm, rms_norm, rms_norm_reference

from qeff_lab.ops.registry import CUSTOM_OPS, CustomOp, custom_op_counts

__all__ = ["CTX_DOMAIN", "RMS_DOMAIN", "CUSTOM_OPS", "CustomOp", "custom_op_counts", "CtxGather", "CtxScatter",
           "CtxGatherCB", "CtxScatterCB", "ctx_gather_cb", "ctx_gather_cb_reference", "ctx_scatter_cb",
           "ctx_scatter_cb_reference", "CustomRMSNorm", "ctx_gather",
           "ctx_gather_reference", "ctx_scatter", "ctx_scatter_reference", "rms_norm", "rms_norm_reference"]
