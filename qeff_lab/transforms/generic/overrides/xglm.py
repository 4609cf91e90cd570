"""xglm: hand-written attention (no AttentionInterface); it already calls cache.update(k, v, layer_idx), adds the 4D mask and takes sinusoidal positions from position_ids."""
