"""gpt_neox_japanese: hand-written attention (no AttentionInterface); it already calls cache.update(k, v, layer_idx), adds the 4D mask and takes rotary positions from position_ids."""
