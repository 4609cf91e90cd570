"""Every family, tiny random config: HF greedy tokens == transformed PyTorch == ONNX Runtime, exactly, for 24
new tokens, prompts shorter than / equal to / longer than prefill_seq_len, in a batch of 2 prompts of
different lengths (plus a filler row) and one at a time."""
import pytest

from qeff_lab import QEFFAutoModelForCausalLM
from qeff_lab.transforms.families import FAMILIES
from tests.transforms.tiny_decoders import CONFIGS, CTX, NEW_TOKENS, PREFILL, hf_greedy, prompts, tiny_model


def test_every_family_has_a_tiny_config():
    assert set(CONFIGS) == set(FAMILIES)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_token_parity_hf_pytorch_onnxruntime(family):
    model = tiny_model(family)
    prompt_ids = prompts()
    reference = hf_greedy(model, prompt_ids)
    assert all(len(r) == NEW_TOKENS for r in reference)
    assert len({tuple(r) for r in reference}) == len(reference)  # different prompts, different answers

    qeff = QEFFAutoModelForCausalLM.from_model(model, f"tiny-{family}")
    qeff.compile(prefill_seq_len=PREFILL, ctx_len=CTX, batch_size=2)

    onnx = qeff.generate_from_ids(prompt_ids, NEW_TOKENS)  # batches [5, 8] and [13 + a filler row]
    assert onnx.ids == reference, f"{family}: ONNX Runtime tokens differ from HF"
    assert onnx.metrics.batches == 2 and onnx.metrics.backend == "onnxruntime"

    torch_batched = qeff.generate_from_ids(prompt_ids, NEW_TOKENS, runtime="pytorch")
    assert torch_batched.ids == reference, f"{family}: transformed PyTorch tokens differ from HF"

    from qeff_lab.runtime.generation import TorchKVRunner, generate_ids

    one_at_a_time, _, _ = generate_ids(TorchKVRunner(qeff.model, 1, PREFILL, CTX), prompt_ids, NEW_TOKENS)
    assert one_at_a_time == reference


@pytest.mark.parametrize("family, window", [
    ("mistral", dict(sliding_window=6)),  # every layer slides
    ("qwen2", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)),  # layer 0 full, layer 1 slides
])
def test_sliding_window_beyond_the_window_length(family, window):
    """Prompts of 5-13 tokens + 24 new ones with a window of 6: the window moves over the retained ctx_len buffer
    (not a ctx_len limit). Control: the same weights without the window give other tokens."""
    model = tiny_model(family, **window)
    prompt_ids = prompts()
    reference = hf_greedy(model, prompt_ids)
    assert reference != hf_greedy(tiny_model(family, sliding_window=None), prompt_ids)  # the window acts

    qeff = QEFFAutoModelForCausalLM.from_model(model, f"tiny-{family}-window")
    assert qeff.path == f"family {qeff.family.name}" and qeff.max_ctx_len()[0] == 256
    assert qeff.generate_from_ids(prompt_ids, NEW_TOKENS, runtime="pytorch").ids == reference
    qeff.compile(prefill_seq_len=PREFILL, ctx_len=CTX, batch_size=2)
    assert qeff.generate_from_ids(prompt_ids, NEW_TOKENS).ids == reference, f"{family}: ONNX Runtime tokens differ"
