"""Views of causal-LM work: generation results (pure functions of the reports)."""
from __future__ import annotations

import re

from qeff_lab.views.tables import html_table

# Chat-template markup: special-token-like markers (<|im_start|>, <|eot_id|>, [INST], <s>) around role names.
_MARKER = re.compile(r"<\|[^|<>]*\|>|\[/?INST\]|</?s>|<start_of_turn>|<end_of_turn>")
_ROLES = ("system", "user", "assistant", "model")


def user_text(prompt: str) -> str:
    """The user's own words in a chat-templated prompt: the last turn that is not the assistant's empty one,
    its role line dropped. Views get the rendered text only (no tokenizer), hence the markup is read here.
    A prompt without chat markup is returned as it is."""
    if not _MARKER.search(prompt):
        return prompt
    for segment in reversed(_MARKER.split(prompt)):
        text = segment.strip()
        first, _, rest = text.partition("\n")
        if first.strip().lower() in _ROLES:
            text = rest.strip()
        if text and text.lower() not in _ROLES:
            return text
    return prompt


def render_generation(result) -> str:
    """A GenerationResult: the metrics, then one row per prompt (the user's question, not the chat template's
    preamble) with its new text."""
    frame = result.to_frame()
    if result.prompts:
        frame["prompt"] = [user_text(p)[:80] for p in result.prompts]
    return (html_table(result.metrics.to_frame(), caption="generation metrics (end to end: prefill + decode)")
            + html_table(frame, caption=f"{len(result.ids)} prompt(s)"))
