"""``BaichuanAlibiConfig``, registered with ``AutoConfig`` as ``"baichuan_alibi"`` on import.

Kept apart from the model (``packtune.ports.baichuan_alibi``) so that ``import packtune``'s
hook can register it the moment transformers' modeling code is loaded, without importing any
model code: that hook can run in the middle of an import of ``modeling_llama`` or
``modeling_layers``, which the model module needs whole. The model class is registered with
``AutoModelForCausalLM`` when the first config of this type is made (``_register_model``): the
earliest moment an Auto class can look it up (``from_pretrained`` reads the config first), and
never inside transformers' own imports.
"""

from __future__ import annotations

from transformers.configuration_utils import PreTrainedConfig
from transformers.models.auto.configuration_auto import AutoConfig

MODEL_TYPE = "baichuan_alibi"


class BaichuanAlibiConfig(PreTrainedConfig):
    """Config of ``BaichuanAlibiForCausalLM`` (Baichuan-13B's keys; ``norm_head`` for Baichuan2)."""

    model_type = MODEL_TYPE
    attribute_map = {"max_position_embeddings": "model_max_length"}

    vocab_size: int = 64000
    hidden_size: int = 5120
    intermediate_size: int = 13696
    num_hidden_layers: int = 40
    num_attention_heads: int = 40
    hidden_act: str = "silu"
    model_max_length: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    norm_head: bool = False
    attention_dropout: float = 0.0
    use_cache: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self, **kwargs):
        # LlamaMLP reads mlp_bias; Baichuan's MLP has none.
        self.mlp_bias = False
        super().__post_init__(**kwargs)
        _register_model()


def _register_model() -> None:
    """Import the model module, which registers ``BaichuanAlibiForCausalLM`` with
    ``AutoModelForCausalLM`` on import (a no-op once imported, or while it is importing)."""
    import packtune.ports.baichuan_alibi  # noqa: F401


AutoConfig.register(MODEL_TYPE, BaichuanAlibiConfig, exist_ok=True)
