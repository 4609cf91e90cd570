"""Encoder transforms: the fp16-safe mask swap is weight-preserving and reported; pooling heads; the generic
encoder path matches HF at the real tokens of a padded batch for encoders of different shapes, and what is not a
text encoder is refused with its reason."""
import re

import pytest
import torch
import transformers as tf
from transformers import AutoModel, BertConfig, RobertaConfig, XLMRobertaConfig

from qeff_lab.transforms.encoders import (
    ENCODER_ATTENTION,
    MASK_VALUE,
    PooledEncoder,
    QEffBertModel,
    encoder_obstacle,
    encoder_transform,
    fp16_safe_mask_transform,
    fp16_safe_padding_mask,
    pooling_fn,
)
from qeff_lab.transforms.generic import UnsupportedArchitectureError

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


# ----------------------------------------------------------------------------- the generic encoder path
GENERIC = {  # different shapes: relative positions (deberta-v2, mpnet), rotary + local layers (modernbert),
    # a hard-coded attention whose mask still comes from the interface (mpnet), sinusoidal-free distilbert
    "distilbert": (tf.DistilBertConfig, dict(dim=32, n_heads=2, n_layers=2, hidden_dim=64)),
    "electra": (tf.ElectraConfig, dict(embedding_size=32, **TINY)),
    "deberta-v2": (tf.DebertaV2Config, dict(**TINY, relative_attention=True, pos_att_type=["c2p", "p2c"])),
    "mpnet": (tf.MPNetConfig, TINY),
    "modernbert": (tf.ModernBertConfig, dict(**TINY, global_attn_every_n_layers=2, local_attention=4, pad_token_id=0)),
}


def tiny_generic(kind: str):
    config_cls, kwargs = GENERIC[kind]
    torch.manual_seed(0)
    kwargs = {"vocab_size": 120, **kwargs}
    return AutoModel.from_config(config_cls(**kwargs), attn_implementation="eager").eval()


def padded_batch():
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (2, 9))
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5])
    return ids, mask


@pytest.mark.parametrize("kind", sorted(GENERIC))
def test_generic_encoder_matches_hf_at_the_real_tokens(kind):
    ref, model = tiny_generic(kind), tiny_generic(kind)
    result = encoder_transform(model)
    assert result.name == "GenericEncoder" and result.modified
    assert model.config._attn_implementation == ENCODER_ATTENTION
    ids, mask = padded_batch()
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        b = model(input_ids=ids, attention_mask=mask).last_hidden_state
        garbage = ids.clone()
        garbage[1, 4:] = 7  # other ids under the padding: the mask must hide them
        c = model(input_ids=garbage, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert torch.allclose(a[real], b[real], atol=1e-5)
    assert torch.allclose(b[real], c[real], atol=1e-5)
    assert encoder_transform(model).notes == ["already on the generic encoder path"]


def test_generic_encoder_reports_which_interfaces_it_reached():
    bert_like = tiny_generic("electra")  # attention and mask through the interfaces
    why = encoder_transform(bert_like).changes[0].why
    assert why.startswith("AttentionInterface: the module's own eager attention") and "fp16-safe" in why
    deberta = tiny_generic("deberta-v2")  # its own attention and its own mask
    result = encoder_transform(deberta)
    assert result.changes[0].why.startswith("the model's own attention") and "precision lab" in result.changes[0].why
    assert result.notes == ["deberta-v2: padding mask built by the model itself (not fp16-safe by construction)"]


def test_family_encoders_keep_their_swap():
    model = tiny("bert")
    assert encoder_transform(model).name == "Fp16SafeAttentionMask" and isinstance(model, QEffBertModel)


@pytest.mark.parametrize("config, expected", [
    (tf.GPT2Config(n_layer=1), r"gpt2 is a decoder-only \(causal LM\) model; use QEFFAutoModelForCausalLM"),
    (tf.T5Config(num_layers=1), r"t5 is an encoder-decoder model"),
    (tf.SiglipConfig(), r"siglip is a multimodal model \(vision_config\)"),
])
def test_non_encoders_have_a_reason(config, expected):
    assert re.match(expected, encoder_obstacle(config))
    assert encoder_obstacle(CONFIGS["bert"]) is None and encoder_obstacle(tf.ModernBertConfig()) is None


def test_encoder_without_input_ids_is_refused_before_any_change():
    model = AutoModel.from_config(tf.PerceiverConfig(d_model=32, num_latents=4, d_latents=32, num_blocks=1,
                                                     num_self_attends_per_block=1, vocab_size=120))
    before = model.config._attn_implementation
    with pytest.raises(UnsupportedArchitectureError, match=r"^perceiver: PerceiverModel\.forward takes no input_ids"):
        encoder_transform(model)
    assert model.config._attn_implementation == before
