"""Node-precision-info YAML: findings mapped to the exported graph's node output names, with reasons."""
import copy

import onnx
import pytest
import yaml

from qeff_lab.precision.findings import FIXES, Finding, Findings
from qeff_lab.precision.npi import write_npi_yaml

from tests.precision.real_models import tiny_llama


def _finding(module, op, kind, value=1e5):
    fix, text = FIXES[kind]
    return Finding(f"{module}: {op}", module, op, kind, "error", value, 65504.0, fix, text)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from qeff_lab.models.causal_lm import QEFFAutoModelForCausalLM

    mp = pytest.MonkeyPatch()
    mp.setenv("QEFF_LAB_CACHE", str(tmp_path_factory.mktemp("cache")))
    q = QEFFAutoModelForCausalLM.from_model(copy.deepcopy(tiny_llama()), name="tiny-npi")
    yield onnx.load(str(q.export()))
    mp.undo()


def test_findings_map_to_node_outputs_of_the_graph(exported, tmp_path):
    findings = Findings([
        _finding("model.layers.0.input_layernorm", "pow", "norm-square", 8.4e4),
        _finding("model.layers.1.self_attn", "matmul", "attention-scores"),
        _finding("model.layers.1.mlp.down_proj", "linear", "activation"),
        _finding("model.layers.9.mlp", "add", "activation"),  # no such module in a 2-layer model
    ])
    findings.append(Finding("x: y", "x", "y", "underflow", "info", 0.5, 0.01, "NPI", ""))
    path = tmp_path / "npi.yaml"
    result = write_npi_yaml(findings, path, exported)
    names = yaml.safe_load(path.read_text())["FP32NodeInstanceNames"]
    outputs = {o for n in exported.graph.node for o in n.output}
    assert names and set(names) <= outputs  # every name is a real node output of this graph
    assert "/model/model/layers.0/input_layernorm/CustomRMSNorm_output_0" in names
    assert "/model/model/layers.1/mlp/down_proj/MatMul_output_0" in names
    assert any(n.startswith("/model/model/layers.1/self_attn/MatMul") for n in names)
    assert not any("q_proj" in n for n in names)  # the projections are not the scores
    assert len(result.changes) == len(names)
    assert "8.4e+04 > fp16 max 65504" in path.read_text()  # the reason travels with the name
    assert any("model.layers.9.mlp: add" in note for note in result.notes)  # unmatched, and said so
    assert not any("x: y" in c.why for c in result.changes)  # info findings are not written by default


def test_names_and_reasons_can_be_given_directly(tmp_path):
    path = tmp_path / "npi.yaml"
    result = write_npi_yaml({"/a/Add_output_0": "residual add reached 7e4"}, path)
    assert yaml.safe_load(path.read_text()) == {"FP32NodeInstanceNames": ["/a/Add_output_0"]}
    assert result.changes[0].why.endswith("7e4")
    write_npi_yaml([], path)
    assert yaml.safe_load(path.read_text()) == {"FP32NodeInstanceNames": []}
    with pytest.raises(ValueError, match="onnx_model"):
        write_npi_yaml(Findings([_finding("m", "pow", "norm-square")]), path)
