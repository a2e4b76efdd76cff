"""packtune: fine-tune causal language models on packed rows with exact varlen attention.

``import packtune`` registers the ``"packtune_varlen"`` attention implementation with
transformers, so ``AutoModelForCausalLM.from_pretrained(..., attn_implementation="packtune_varlen")``
works for every model family that routes attention through ``AttentionInterface``.
"""

from packtune.attention import ATTN_IMPLEMENTATION, register, varlen_attn_func

register()

__version__ = "0.1.0"

__all__ = ["ATTN_IMPLEMENTATION", "varlen_attn_func", "__version__"]
