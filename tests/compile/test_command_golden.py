"""Golden tests: the compiler command and every artifact it reads, for representative option sets.

The golden files in golden/ were written once with QEFF_LAB_REGEN_GOLDEN=1 and read line by line against
../shared/AI100-TOOLCHAIN.md; a change to them is a change to what the compiler is told, so review the diff.
`named`: whether the SDK takes named specializations (qaic-compile of SDK >= 1.23, see qeff_lab/compile/sdk.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from qeff_lab.compile import plan_compile, validate_options

GOLDEN = Path(__file__).parent / "golden"
NEW_SDK = ["/opt/qti-aic/exec/qaic-compile"]
OLD_SDK = ["/opt/qti-aic/exec/qaic-exec", "-compile-only"]
PREFILL_DECODE = [{"batch_size": 1, "seq_len": 32, "ctx_len": 128}, {"batch_size": 1, "seq_len": 1, "ctx_len": 128}]


def kv_io(layers: int, precision: str) -> dict[str, str]:
    io = {}
    for i in range(layers):
        for kind in ("key", "value"):
            io[f"past_{kind}.{i}"] = precision
    for i in range(layers):
        for kind in ("key", "value"):
            io[f"past_{kind}.{i}_RetainedState"] = precision
    return io


NPI_TEXT = "FP32NodeInstanceNames:\n- /model/layers.0/Add_output_0\n- /model/norm/CustomRMSNorm_output_0\n"
MDP_USER = {"connections": [{"devices": [0, 1], "type": "p2p"}],
            "partitions": [{"name": "Partition0", "devices": [{"deviceId": 0, "numCores": 8}]},
                           {"name": "Partition1", "devices": [{"deviceId": 1, "numCores": 8}]}]}

CASES = {
    # the encoder example on qaic-compile of SDK 1.22: one flat entry per seq_len, no retained state
    "encoder_default": dict(specs=[{"batch_size": 1, "seq_len": 32}, {"batch_size": 1, "seq_len": 128}],
                            options={}, compiler=NEW_SDK, named=False),
    # a decoder on qaic-compile of SDK 1.22: qaic-compile alone does not mean named entries (QEfficient #1129)
    "decoder_qaic_compile_sdk_1_22": dict(specs=PREFILL_DECODE, names=["Prefill", "Decode"],
                                          custom_io=kv_io(1, "float16"), options={}, compiler=NEW_SDK, named=False),
    # prefill_seq_len=1: Prefill and Decode are the same shape, compiled once as "Decode"; the card is an AI 200
    "decoder_prefill_len_1": dict(specs=[PREFILL_DECODE[1], PREFILL_DECODE[1]], names=["Prefill", "Decode"],
                                  custom_io=kv_io(1, "float16"), options={}, compiler=NEW_SDK, hw="ai200"),
    # a decoder as QEfficient compiles it by default: prefill + decode, fp16 KV retained on the device
    "decoder_fp16": dict(specs=PREFILL_DECODE, names=["Prefill", "Decode"], custom_io=kv_io(2, "float16"),
                         options={}, compiler=NEW_SDK),
    # everything at once: MXFP6 weights, MXINT8 KV, 4 devices (MDP JSON), memory options, NPI, metrics
    "decoder_mx_4dev_npi": dict(specs=PREFILL_DECODE, names=["Prefill", "Decode"], custom_io=kv_io(1, "mxint8"),
                                options={"mxfp6_matmul": True, "num_cores": 14, "num_devices": 4, "mos": 1,
                                         "mdts_mos": 1, "aic_enable_depth_first": True, "aic_perf_metrics": True,
                                         "npi": "NPI"}, compiler=NEW_SDK),
    # an older SDK: qaic-exec -compile-only, flat specializations even though names were given
    "decoder_legacy_qaic_exec": dict(specs=PREFILL_DECODE, names=["Prefill", "Decode"],
                                     custom_io=kv_io(1, "float16"), options={"mxfp6_matmul": True}, compiler=OLD_SDK,
                                     named=False),
    # raw flags, another hardware version, fp32 kept, forced named format (names generated), no retained state
    "encoder_extra_flags_named": dict(specs=[{"batch_size": 4, "seq_len": 64}],
                                      options={"extra_flags": ["-stats-level=70", "-size-split-granularity=512"],
                                               "aic_hw_version": "ai200", "convert_to_fp16": False,
                                               "specializations_format": "named", "retained_state": False},
                                      compiler=NEW_SDK),
    # the user's own partition config (two pipeline stages) instead of the generated one
    "decoder_user_mdp": dict(specs=PREFILL_DECODE, names=["Prefill", "Decode"], custom_io=kv_io(1, "float16"),
                             options={"mdp_config": MDP_USER, "num_cores": 8}, compiler=NEW_SDK),
}


def render(case: dict, tmp_path: Path) -> dict:
    options = dict(case["options"])
    if options.get("npi") == "NPI":
        options["npi"] = tmp_path / "npi.yaml"
        options["npi"].write_text(NPI_TEXT)
    plan = plan_compile(validate_options(options), case["specs"], compiler=case["compiler"],
                        takes_named=case.get("named", True), spec_names=case.get("names"),
                        custom_io=case.get("custom_io"), hw_version=case.get("hw"))
    return {"command": plan.template, "files": plan.files}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name, tmp_path):
    got = render(CASES[name], tmp_path)
    path = GOLDEN / f"{name}.json"
    if os.environ.get("QEFF_LAB_REGEN_GOLDEN") == "1":
        path.write_text(json.dumps(got, indent=1) + "\n")
    want = json.loads(path.read_text())
    assert got["command"] == want["command"]
    assert got["files"] == want["files"]


def test_golden_files_say_what_the_toolchain_expects(tmp_path):
    """Spot checks that hold whatever the golden files say (so a bad regeneration cannot go unnoticed)."""
    enc = render(CASES["encoder_default"], tmp_path)
    assert json.loads(enc["files"]["specializations.json"]) == {
        "specializations": [{"batch_size": "1", "seq_len": "32"}, {"batch_size": "1", "seq_len": "128"}]}
    assert "-retained-state" not in enc["command"] and "-custom-IO-list-file" not in " ".join(enc["command"])

    dec = render(CASES["decoder_fp16"], tmp_path)
    cmd = dec["command"]
    assert cmd[:4] == [NEW_SDK[0], "-aic-hw", "-aic-hw-version=ai100", "-m=<onnx>"]
    assert {"-retained-state", "-convert-to-fp16", "-aic-num-cores=16"} <= set(cmd)
    assert cmd[-1] == "-aic-binary-dir=<compile-folder>/qpc"
    specs = json.loads(dec["files"]["specializations.json"])["specializations"]
    assert specs[0] == {"name": "Prefill", "symbols": {"batch_size": "1", "seq_len": "32", "ctx_len": "128"}}
    assert specs[1]["symbols"]["seq_len"] == "1"
    io = yaml.safe_load(dec["files"]["custom_io.yaml"])
    assert io[0] == {"IOName": "past_key.0", "Precision": "float16"} and len(io) == 8

    mx = render(CASES["decoder_mx_4dev_npi"], tmp_path)
    assert {"-mxfp6-matmul", "-aic-num-cores=14", "-mos=1", "-mdts-mos=1", "-aic-enable-depth-first",
            "-node-precision-info=<compile-folder>/node_precision_info.yaml",
            "-mdp-load-partition-config=<compile-folder>/mdp_partition.json"} <= set(mx["command"])
    assert json.loads(mx["files"]["mdp_partition.json"]) == {
        "connections": [{"devices": [0, 1, 2, 3], "type": "p2p"}],
        "partitions": [{"name": "Partition0", "devices": [{"deviceId": d, "numCores": 14} for d in range(4)]}]}
    assert mx["files"]["node_precision_info.yaml"] == NPI_TEXT
    assert {e["Precision"] for e in yaml.safe_load(mx["files"]["custom_io.yaml"])} == {"mxint8"}

    old = render(CASES["decoder_legacy_qaic_exec"], tmp_path)
    assert old["command"][:2] == OLD_SDK
    assert json.loads(old["files"]["specializations.json"])["specializations"][0] == {
        "batch_size": "1", "seq_len": "32", "ctx_len": "128"}

    extra = render(CASES["encoder_extra_flags_named"], tmp_path)
    assert extra["command"][-3:-1] == ["-stats-level=70", "-size-split-granularity=512"]
    assert "-convert-to-fp16" not in extra["command"] and "-aic-hw-version=ai200" in extra["command"]

    user = render(CASES["decoder_user_mdp"], tmp_path)
    assert json.loads(user["files"]["mdp_partition.json"]) == MDP_USER


def test_command_fills_real_paths(tmp_path):
    plan = plan_compile(validate_options({}), [{"batch_size": 1, "seq_len": 8}], compiler=NEW_SDK)
    cmd = plan.command(tmp_path / "m.onnx", tmp_path / "out")
    assert f"-m={tmp_path / 'm.onnx'}" in cmd
    assert f"-network-specialization-config={tmp_path / 'out' / 'specializations.json'}" in cmd
    assert cmd[-1] == f"-aic-binary-dir={tmp_path / 'out' / 'qpc'}"


def test_names_must_match_specializations():
    with pytest.raises(ValueError, match="1 specialization name"):
        plan_compile(validate_options({}), PREFILL_DECODE, compiler=NEW_SDK, spec_names=["Prefill"])
    with pytest.raises(ValueError, match="At least one specialization"):
        plan_compile(validate_options({}), [], compiler=NEW_SDK)
