"""The generation view shows the user's question, not the chat template around it."""
from qeff_lab.views.generation import user_text

SMOL = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
LLAMA3 = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
          "<|start_header_id|>user<|end_header_id|>\n\nName three colours.<|eot_id|>"
          "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_user_text_is_the_last_user_turn():
    assert user_text(SMOL) == "What is the capital of France?"
    assert user_text(LLAMA3) == "Name three colours."
    assert user_text("The capital of France is") == "The capital of France is"  # no chat markup: as it is
