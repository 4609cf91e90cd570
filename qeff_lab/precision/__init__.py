"""Precision lab: range profiling, fp16 overflow/underflow findings, fixes, and device-numerics emulation."""
from qeff_lab.precision.analyze import PrecisionReport, analyze, weight_ranges
from qeff_lab.precision.emulate import Fp16Emulation, fp16_weights, round_fp16
from qeff_lab.precision.findings import Cause, Finding, Findings, find_issues
from qeff_lab.precision.islands import Fp16IslandEmulation, IslandSearch, find_fp32_islands
from qeff_lab.precision.fixes import (apply_fixes, prescaled_attention_transform, revert_fixes,
                                      revert_prescaled_attention, revert_safe_gelu, revert_safe_norm,
                                      safe_gelu_transform, safe_norm_transform)
from qeff_lab.precision.mx import mx_qdq, mxfp6_weights, mxint8_qdq_cache
from qeff_lab.precision.npi import write_npi_yaml
from qeff_lab.precision.numerics import FP16_MAX, FP16_MIN_NORMAL, FP16_MIN_SUBNORMAL, headroom_bits, tensor_stats
from qeff_lab.precision.profile import OpRange, RangeProfile, RangeProfiler

__all__ = ["FP16_MAX", "FP16_MIN_NORMAL", "FP16_MIN_SUBNORMAL", "Cause", "Finding", "Findings", "Fp16Emulation",
           "Fp16IslandEmulation", "IslandSearch", "find_fp32_islands",
           "OpRange", "PrecisionReport", "RangeProfile", "RangeProfiler", "analyze", "apply_fixes", "find_issues",
           "fp16_weights", "headroom_bits", "mx_qdq", "mxfp6_weights", "mxint8_qdq_cache",
           "prescaled_attention_transform", "revert_fixes", "revert_prescaled_attention", "revert_safe_gelu",
           "revert_safe_norm", "round_fp16", "safe_gelu_transform", "safe_norm_transform", "tensor_stats",
           "weight_ranges", "write_npi_yaml"]
