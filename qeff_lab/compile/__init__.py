"""Compile an exported graph for a backend: the AI 100 compiler (qaic) or the embedded ONNX Runtime.

Either way the compile folder holds every file a device compile needs (specializations.json, custom_io.yaml for
decoders, the MDP partition for several devices, the NPI YAML) and qconfig.json, which records the model, the
options, the backend chosen and why, the SDK and the exact compiler command.

    result = compile_graph(onnx, [{"batch_size": 1, "seq_len": 32}], options={"mxfp6_matmul": True}, dry_run=True)
    print(result.command_line)
"""
from qeff_lab.compile.backend import (
    BACKENDS,
    CompileResult,
    check_compile_request,
    choose_backend,
    compile_graph,
    onnx_fingerprint,
)
from qeff_lab.compile.command import custom_io_yaml, mdp_partition_config, plan_compile, specializations_json
from qeff_lab.compile.options import (
    CompileOptionError,
    CompileOptions,
    options_table,
    validate_options,
)
from qeff_lab.compile.runner import CompileError, explain_failure
from qeff_lab.compile.sdk import DeviceInfo, SdkInfo, detect_sdk

__all__ = [
    "BACKENDS", "CompileError", "check_compile_request", "CompileOptionError", "CompileOptions", "CompileResult", "DeviceInfo", "SdkInfo",
    "choose_backend", "compile_graph", "custom_io_yaml", "detect_sdk", "explain_failure", "mdp_partition_config",
    "onnx_fingerprint", "options_table", "plan_compile", "specializations_json", "validate_options",
]
