"""qeff_lab: prepare HuggingFace transformers for Qualcomm Cloud AI 100, showing every step."""
__version__ = "0.1.0"

from qeff_lab.loading import go_offline_if_hub_unreachable as _go_offline

_go_offline()  # before transformers first talks to the hub: offline machines would retry for minutes

from qeff_lab.models.causal_lm import QEFFAutoModelForCausalLM  # noqa: E402
from qeff_lab.models.encoder import QEFFAutoModel  # noqa: E402

__all__ = ["QEFFAutoModel", "QEFFAutoModelForCausalLM", "__version__"]
