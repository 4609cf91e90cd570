"""gpt_neox_japanese: hand-written attention (no AttentionInterface) that already fits the retained cache as it is.

It calls cache.update(k, v, layer_idx), adds the 4D mask from create_causal_mask, and takes its rotary positions
from position_ids.
"""
