"""Varlen attention: the kernel (``varlen_attn_func``) and its transformers integration."""

from packtune.attention.hf import ATTN_IMPLEMENTATION, cu_seqlens_from_position_ids, register
from packtune.attention.varlen import BACKENDS, CuSeqlens, varlen_attn_func

__all__ = ["ATTN_IMPLEMENTATION", "BACKENDS", "CuSeqlens", "cu_seqlens_from_position_ids", "register", "varlen_attn_func"]
