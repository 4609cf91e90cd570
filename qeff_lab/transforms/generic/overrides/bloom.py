"""bloom: hand-written ALiBi attention (no AttentionInterface) that already fits the retained cache as it is.

It calls cache.update(k, v, layer_idx), adds the 4D mask from create_causal_mask, and (no attention mask given)
builds ALiBi over arange(kv_length) of the cache's mask size: every ctx_len slot at its own position.
"""
