"""trocr: its decoder takes positions from cache.get_seq_length() (it has no position_ids); use the cache's instead.

TrOCR's attention (no AttentionInterface) already calls cache.update(k, v, layer_idx) and adds the 4D mask from
create_causal_mask; only the positional embedding needs the real positions. The decoder hands the retained cache's
per-row positions to its positional embedding for the duration of the call (as transform.py hands the last-token
index to the output-embedding hook). TrOCRForCausalLM sets config.is_decoder=True itself (is_decoder only adds
cross-attention layers here; self-attention is always causal), so support.py's is_decoder check does not apply.
"""
from __future__ import annotations

from torch import nn
from transformers.models.trocr.modeling_trocr import (TrOCRDecoder, TrOCRLearnedPositionalEmbedding,
                                                      TrOCRSinusoidalPositionalEmbedding)


class RetainedTrOCRDecoder(TrOCRDecoder):
    def forward(self, *args, cache=None, **kwargs):
        self.embed_positions._qeff_positions = cache.get_query_offset() if cache is not None else None
        try:
            return super().forward(*args, cache=cache, **kwargs)
        finally:
            self.embed_positions._qeff_positions = None


class RetainedTrOCRLearnedPositionalEmbedding(TrOCRLearnedPositionalEmbedding):
    def forward(self, input_ids, cache_length: int = 0, position_ids=None):
        positions = getattr(self, "_qeff_positions", None)
        if positions is None:
            return super().forward(input_ids, cache_length, position_ids)
        return nn.Embedding.forward(self, positions + self.offset)


class RetainedTrOCRSinusoidalPositionalEmbedding(TrOCRSinusoidalPositionalEmbedding):
    def forward(self, input_ids, cache_length: int = 0):
        positions = getattr(self, "_qeff_positions", None)
        if positions is None:
            return super().forward(input_ids, cache_length)
        # create_position_ids_from_input_ids numbers non-padding tokens from padding_idx + 1
        index = (positions + self.padding_idx + 1).view(-1)
        return self.weights.to(positions.device).index_select(0, index).view(*positions.shape, -1)


SWAPS = {TrOCRDecoder: RetainedTrOCRDecoder, TrOCRLearnedPositionalEmbedding: RetainedTrOCRLearnedPositionalEmbedding,
         TrOCRSinusoidalPositionalEmbedding: RetainedTrOCRSinusoidalPositionalEmbedding}
