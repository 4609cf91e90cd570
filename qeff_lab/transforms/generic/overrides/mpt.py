"""mpt: hand-written ALiBi attention (no AttentionInterface) that already fits the retained cache as it is.

It calls cache.update(k, v, layer_idx), masks with the 4D mask from create_causal_mask (as bool), and slices its
ALiBi bias relative to the last key slot: a constant shift per query row, which softmax ignores (exact).
"""
