"""The retained-state swap: weight-preserving, reported module by module, and refusing what it cannot do."""
import pytest
import torch

from qeff_lab.models.base import UnsupportedModelError
from qeff_lab.transforms.families import FAMILIES
from qeff_lab.transforms.kv_cache import (KVAttention, KVCausalLM, UnsupportedConfigError,
                                          kv_cache_transform, kv_masks)
from tests.transforms.tiny_decoders import CONFIGS, tiny_model


@pytest.mark.parametrize("family", list(CONFIGS))
def test_swap_keeps_every_parameter_object_and_state_dict_key(family):
    model = tiny_model(family)
    before_params = {name: p for name, p in model.named_parameters()}
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    result = kv_cache_transform(model, FAMILIES[family])
    assert isinstance(model, KVCausalLM) and result.modified
    after_params = dict(model.named_parameters())
    assert list(after_params) == list(before_params)
    assert all(after_params[n] is p for n, p in before_params.items())  # the same objects, not copies
    state = model.state_dict()
    assert list(state) == list(before_state)
    assert all(torch.equal(state[k], v) for k, v in before_state.items())


@pytest.mark.parametrize("family", list(CONFIGS))
def test_swap_report_lists_swapped_and_kept_modules(family):
    model = tiny_model(family)
    table = FAMILIES[family].swaps
    expected = {path: type(m).__name__ for path, m in model.named_modules() if type(m) in table}
    result = kv_cache_transform(model, FAMILIES[family])
    assert {c.place if c.place != "<root>" else "": c.before for c in result.changes} == expected
    assert all(c.after == table_cls.__name__ for c in result.changes
               for old, table_cls in table.items() if old.__name__ == c.before)
    assert all(c.why for c in result.changes)
    kept = {c.before for c in result.kept}
    assert any(name.endswith("MLP") for name in kept)  # the MLPs run unchanged and are reported so
    frame = result.to_frame()
    assert set(frame["status"]) == {"swapped", "kept"} and len(frame) == len(result.changes) + len(result.kept)
    summary = result.summary_frame()
    assert summary["count"].sum() == len(frame)


def test_llama_swap_table_on_a_two_layer_model():
    model = tiny_model("llama")
    result = kv_cache_transform(model, FAMILIES["llama"])
    summary = {(r.before, r.after, r.status): r.count for r in result.summary_frame().itertuples()}
    assert summary == {
        ("LlamaForCausalLM", "QEffLlamaForCausalLM", "swapped"): 1,
        ("LlamaModel", "QEffLlamaModel", "swapped"): 1,
        ("LlamaDecoderLayer", "QEffLlamaDecoderLayer", "swapped"): 2,
        ("LlamaAttention", "QEffLlamaAttention", "swapped"): 2,
        ("LlamaRMSNorm", "QEffLlamaRMSNorm", "swapped"): 5,
        ("LlamaRotaryEmbedding", "QEffLlamaRotaryEmbedding", "swapped"): 1,
        ("LlamaMLP", "LlamaMLP", "kept"): 2,
    }
    assert repr(result) == "<SwapResult RetainedStateKVCache: 12 change(s), 2 kept>"
    html = result._repr_html_()  # the grouped table, then every module
    assert "RetainedStateKVCache: 12 change(s)" in html and "model.layers.1.mlp" in html
    assert "QEffLlamaRotaryEmbedding" in html and "LlamaMLP" in html  # short: every module, no summary needed


def test_subclass_of_a_known_class_is_reported_not_swapped():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class MyNorm(LlamaRMSNorm):
        pass

    model = tiny_model("llama")
    model.model.norm.__class__ = MyNorm
    result = kv_cache_transform(model, FAMILIES["llama"])
    kept = {c.place: c for c in result.kept}
    assert "model.norm" in kept and "subclass" in kept["model.norm"].why
    assert type(model.model.norm) is MyNorm


def test_rope_tables_cover_every_position_and_partial_rotary():
    model = tiny_model("phi3")
    kv_cache_transform(model, FAMILIES["phi3"])
    rotary = model.model.rotary_emb
    assert rotary.cos_table.shape == (256, 8)  # head_dim 16, partial_rotary_factor 0.5
    assert "cos_table" not in model.state_dict()  # non-persistent: the state dict is unchanged


def test_dynamic_rope_is_refused_before_anything_changes():
    model = tiny_model("llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(UnsupportedConfigError, match="dynamic"):
        kv_cache_transform(model, FAMILIES["llama"])
    assert not isinstance(model, KVCausalLM)


def test_kv_cache_layout_and_new_cache_shapes():
    model = tiny_model("llama")
    kv_cache_transform(model, FAMILIES["llama"])
    assert model.kv_cache_layout() == [(2, 16), (2, 16)]
    cache = model.new_kv_cache(3, 32)
    assert [tuple(k.shape) for k, _ in cache] == [(3, 2, 32, 16)] * 2
    assert sum(isinstance(m, KVAttention) for m in model.modules()) == 2


def test_masks_follow_the_device_conventions():
    position_ids = torch.tensor([[0, 1, 2, -1], [-1, -1, -1, -1], [5, 6, 7, 8]])
    masked, ctx_indices = kv_masks(position_ids, 10)
    assert masked.shape == (3, 1, 4, 10)
    assert masked[0, 0, 1].tolist() == [False, False] + [True] * 8  # kv_index > query position
    assert masked[0, 0, 3].all() and masked[1].all()  # padding rows see nothing
    assert ctx_indices[0].tolist() == [0, 1, 2] + [-1] * 7  # beyond the row's last position: invalid
    assert ctx_indices[1].tolist() == [-1] * 10
    assert ctx_indices[2].tolist() == list(range(9)) + [-1]
    windowed, same_indices = kv_masks(position_ids, 10, window=3)
    assert torch.equal(same_indices, ctx_indices)
    assert windowed[2, 0, 3].tolist() == [True] * 6 + [False] * 3 + [True]  # q = 8 sees 6, 7, 8 (8 - 3 < kv <= 8)
    assert windowed[0, 0, 1].tolist() == masked[0, 0, 1].tolist() and windowed[1].all()


def test_unsupported_architecture_fails_clearly():
    from transformers import BertConfig, BertForMaskedLM

    from qeff_lab import QEFFAutoModelForCausalLM

    bert = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(UnsupportedModelError, match=r"'bert'.*an encoder.*families .*Llama \(llama\), Mistral"):
        QEFFAutoModelForCausalLM.from_model(bert)
