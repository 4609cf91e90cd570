"""Encoder transforms: the fp16-safe mask swap is weight-preserving and reported; pooling heads."""
import pytest
import torch
from transformers import AutoModel, BertConfig, RobertaConfig, XLMRobertaConfig

from qeff_lab.transforms.encoders import (
    MASK_VALUE,
    PooledEncoder,
    QEffBertModel,
    fp16_safe_mask_transform,
    fp16_safe_padding_mask,
    pooling_fn,
)

TINY = dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64, vocab_size=120,
            max_position_embeddings=64)
CONFIGS = {"bert": BertConfig(**TINY), "roberta": RobertaConfig(**TINY, pad_token_id=1),
           "xlm-roberta": XLMRobertaConfig(**TINY, pad_token_id=1)}


def tiny(kind: str):
    torch.manual_seed(0)
    return AutoModel.from_config(CONFIGS[kind]).eval()


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_swap_keeps_every_parameter_object_and_key(kind):
    model = tiny(kind)
    before = {name: p for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    old = type(model).__name__
    result = fp16_safe_mask_transform(model)
    assert [(c.place, c.before) for c in result.changes] == [("<root>", old)]
    assert result.changes[0].after == "QEff" + old
    assert list(model.state_dict()) == keys
    after = dict(model.named_parameters())
    assert all(after[name] is p for name, p in before.items())


def test_swap_reports_nothing_to_do_on_second_run():
    model = tiny("bert")
    fp16_safe_mask_transform(model)
    again = fp16_safe_mask_transform(model)
    assert not again.modified and "no module of a known class" in again.notes[0]
    assert isinstance(model, QEffBertModel)


def test_fp16_safe_mask_is_finite_in_fp16_and_masks_padding():
    mask = fp16_safe_padding_mask(torch.tensor([[1, 1, 0], [0, 0, 0]]), torch.float16)
    assert mask.shape == (2, 1, 1, 3) and torch.isfinite(mask).all()
    assert mask[0, 0, 0].tolist() == [0.0, 0.0, MASK_VALUE]
    scores = torch.full((2, 1, 1, 3), -30000.0, dtype=torch.float16) + mask
    assert torch.isfinite(scores).all()  # fp32-min would give -inf here, and NaN after softmax of a padded row
    assert not torch.isnan(torch.softmax(scores.float(), -1)).any()


def test_hf_mask_would_overflow_fp16():
    """Pins the problem the transform removes: HF's eager mask value is -inf once cast to fp16."""
    assert torch.tensor(torch.finfo(torch.float32).min).half().isinf()


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_transformed_matches_hf_with_padding(kind):
    ref = tiny(kind)
    model = tiny(kind)
    fp16_safe_mask_transform(model)
    ids = torch.randint(3, 100, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        b = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1, :4], b[1, :4], atol=1e-5)


def test_pooling_heads():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]]])
    m = torch.tensor([[1, 1, 0]])
    assert pooling_fn("mean")(h, m).tolist() == [[2.0, 3.0]]
    assert pooling_fn("avg")(h, m).tolist() == [[2.0, 3.0]]
    assert pooling_fn("max")(h, m).tolist() == [[3.0, 4.0]]
    assert pooling_fn("cls")(h, m).tolist() == [[1.0, 2.0]]
    with pytest.raises(ValueError, match="Unknown pooling 'sum'"):
        pooling_fn("sum")


def test_pooled_encoder_runs_callable_pooling():
    model = tiny("bert")
    wrapper = PooledEncoder(model, lambda h, m: h[:, -1] * 2)
    out = wrapper(torch.ones(1, 5, dtype=torch.long), torch.ones(1, 5, dtype=torch.long))
    assert out.shape == (1, 32)
