"""Accuracy: the parity ladder (HF fp32 -> ... -> device numerics), token divergence, perplexity, cosine."""
from qeff_lab.accuracy.ladder import (LadderReport, Rung, causal_lm_ladder, causal_lm_rungs, encoder_ladder, run_ladder,
                                      shipped_sentences, shipped_text)
from qeff_lab.accuracy.metrics import (cosine_similarity, first_divergence, kl_divergence, kl_stats, logit_errors,
                                       perplexity, token_match_rate)
from qeff_lab.accuracy.runners import EmulatedRunner, HFCausalRunner, teacher_forced_logits

__all__ = ["EmulatedRunner", "HFCausalRunner", "LadderReport", "Rung", "causal_lm_ladder", "causal_lm_rungs",
           "cosine_similarity", "encoder_ladder", "first_divergence", "kl_divergence", "kl_stats", "logit_errors",
           "perplexity", "run_ladder", "shipped_sentences", "shipped_text", "teacher_forced_logits", "token_match_rate"]
