"""The model families with retained-state KV blocks: model_type -> Family (one file per family).

Adding a family: write `families/<name>.py` with its blocks and `Family(...)` table, and add it here.
"""
from qeff_lab.transforms.families.gemma import GEMMA
from qeff_lab.transforms.families.gpt2 import GPT2
from qeff_lab.transforms.families.llama import LLAMA
from qeff_lab.transforms.families.mistral import MISTRAL
from qeff_lab.transforms.families.phi3 import PHI3
from qeff_lab.transforms.families.qwen2 import QWEN2
from qeff_lab.transforms.kv_cache import Family

FAMILIES: dict[str, Family] = {f.model_type: f for f in (LLAMA, MISTRAL, QWEN2, PHI3, GPT2, GEMMA)}

__all__ = ["FAMILIES", "GEMMA", "GPT2", "LLAMA", "MISTRAL", "PHI3", "QWEN2", "Family"]
