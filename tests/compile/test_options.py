"""Compile options: unknown names fail with the close match, values are type- and range-checked."""
from __future__ import annotations

import pytest

from qeff_lab.compile import CompileOptionError, CompileOptions, options_table, validate_options
from qeff_lab.compile.options import OPTIONS


@pytest.mark.parametrize("name, hint", [
    ("mxfp6", "mxfp6_matmul"),           # QEfficient's name
    ("mxfp6_matmal", "mxfp6_matmul"),    # a typo
    ("num_core", "num_cores"),
    ("num_devise", "num_devices"),
    ("mxint8", "mxint8_kv_cache"),       # a model-level option: named even though compile_graph does not take it
    ("node_precision_info", "npi"),
    ("aic_enable_depth_frist", "aic_enable_depth_first"),
])
def test_unknown_option_suggests_the_close_match(name, hint):
    with pytest.raises(CompileOptionError) as e:
        validate_options({name: True})
    msg = str(e.value)
    assert f"unknown option {name!r}" in msg and f"Did you mean {hint!r}" in msg
    assert "extra_flags" in msg  # says how to pass what qeff_lab does not model


def test_unknown_option_is_a_type_error_like_python_keywords():
    with pytest.raises(TypeError):
        validate_options({"bogus_option": 1})


def test_names_the_caller_handles_count_as_known():
    opts = validate_options({"mxint8_kv_cache": True, "mos": 2}, also_known={"mxint8_kv_cache"})
    assert opts.mos == 2 and "mxint8_kv_cache" not in opts.as_dict()


@pytest.mark.parametrize("given, words", [
    ({"num_cores": True}, "type bool; expected int"),
    ({"num_cores": "16"}, "type str; expected int"),
    ({"num_cores": 16.0}, "type float; expected int"),
    ({"num_cores": 0}, "between 1 and 16"),
    ({"num_cores": 17}, "between 1 and 16"),
    ({"mxfp6_matmul": 1}, "type int; expected bool"),
    ({"mos": 0}, "must be >= 1"),
    ({"num_devices": 0}, "must be >= 1"),
    ({"specializations_format": "nested"}, "must be one of"),
    ({"aic_hw_version": "ai300"}, "must be one of ('ai100', 'ai200')"),
    ({"extra_flags": "-foo"}, "expected list or tuple"),
    ({"extra_flags": ["foo"]}, "starting with '-'"),
    ({"extra_flags": ["-a -b"]}, "its own item"),
    ({"extra_flags": [3]}, "list of strings"),
    ({"npi": "/no/such/npi.yaml"}, "file not found"),
    ({"npi": "NPI:[oops"}, "not valid YAML"),
    ({"npi": "NPI:FP32Nodes: [a]"}, "keys among"),
    ({"npi": "NPI:FP32NodeInstanceNames: a"}, "must be a list of node output names"),
    ({"mdp_config": {"connections": []}}, "partitions"),
    ({"timeout_s": -1}, "must be > 0"),
])
def test_values_are_checked(given, words, tmp_path):
    if str(given.get("npi", "")).startswith("NPI:"):  # an NPI file with this text
        (tmp_path / "npi.yaml").write_text(given["npi"][4:] + "\n")
        given = {"npi": tmp_path / "npi.yaml"}
    with pytest.raises(CompileOptionError, match=None) as e:
        validate_options(given)
    assert words in str(e.value), str(e.value)


@pytest.mark.parametrize("flag, owner", [("-aic-num-cores=8", "num_cores"), ("-mxfp6-matmul", "mxfp6_matmul"),
                                         ("-m=other.onnx", "ONNX"), ("-aic-binary-dir=/x", "qpc"),
                                         ("-compile-only", "SDK detection")])
def test_extra_flags_may_not_repeat_what_qeff_lab_sets(flag, owner):
    with pytest.raises(CompileOptionError) as e:
        validate_options({"extra_flags": [flag]})
    assert owner in str(e.value)


def test_valid_options_fill_defaults_and_keep_given_values(tmp_path):
    npi = tmp_path / "npi.yaml"
    npi.write_text("FP32NodeInstanceNames:\n  - /model/norm/Add_output_0\n")
    opts = validate_options({"mxfp6_matmul": True, "num_cores": 14, "npi": npi, "extra_flags": ("-stats-level=70",)})
    assert opts.mxfp6_matmul is True and opts.num_cores == 14 and opts.npi == npi
    assert opts.extra_flags == ["-stats-level=70"]
    assert opts.convert_to_fp16 is True and opts.num_devices == 1 and opts.dry_run is False
    assert opts.non_default() == {"mxfp6_matmul": True, "num_cores": 14, "npi": npi, "extra_flags": ["-stats-level=70"]}
    assert repr(opts) == ("CompileOptions(extra_flags=['-stats-level=70'], mxfp6_matmul=True, "
                          f"npi={npi!r}, num_cores=14)")
    assert opts.to_json()["npi"] == str(npi)
    assert CompileOptions.validate(opts) is opts


def test_numpy_integers_are_ints():
    np = pytest.importorskip("numpy")
    assert validate_options({"num_cores": np.int64(8)}).num_cores == 8


def test_mdp_config_sets_num_devices_and_must_agree_with_it():
    mdp = {"partitions": [{"name": "P0", "devices": [{"deviceId": 0, "numCores": 16}, {"deviceId": 1, "numCores": 16},
                                                     {"deviceId": 2, "numCores": 16}]}]}
    assert validate_options({"mdp_config": mdp}).num_devices == 3
    with pytest.raises(CompileOptionError, match="num_devices=2 but mdp_config places the model on 3"):
        validate_options({"mdp_config": mdp, "num_devices": 2})


def test_options_table_lists_every_option_with_its_flag():
    df = options_table()
    assert list(df["option"]) == list(OPTIONS)
    row = df.set_index("option").loc["mxfp6_matmul"]
    assert row["flag"] == "-mxfp6-matmul" and row["default"] == "False"
