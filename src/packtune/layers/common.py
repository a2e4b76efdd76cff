"""What every varlen layer form does first: find the packed row's documents, or hand the call back."""

from __future__ import annotations

import sys

import torch

from packtune.layers.segments import Segments, segments_of

#: Keywords the boundary hook adds to a forward; the class's own forward must not see them when
#: it runs instead of the varlen form (transformers would take ``cu_seq_lens_q`` as a request for
#: its kernels' varlen path, and refuse it without them).
_BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def packed_segments(module: torch.nn.Module, rows: int, length: int, cache, kwargs: dict) -> Segments | None:
    """The documents of this call's ``rows x length`` tokens, or ``None`` when the class's own
    forward is exact (no boundaries: a padded batch or decoding; or every row is one document
    and a cache is being filled, e.g. the prefill of ``generate``).

    A packed row of several documents cannot fill a recurrent cache: the state at its end is the
    last document's alone, so it is refused in one line rather than cached wrong.
    """
    from packtune.attention.hf import BOUNDARIES_KWARG

    seg = segments_of(kwargs, rows, length)
    if seg is None or cache is None:
        return seg
    if seg.documents != rows:
        raise NotImplementedError(
            f"{type(module).__name__}: a packed row of several documents cannot fill a recurrent cache "
            "(its state would carry one document into the next); pass use_cache=False"
        )
    for key in (*_BOUNDARY_KEYS, BOUNDARIES_KWARG):
        kwargs.pop(key, None)
    return None


def mask_padding(module: torch.nn.Module, hidden_states: torch.Tensor, attention_mask) -> torch.Tensor:
    """The layer's own model file's ``apply_mask_to_padding_states`` (zero padded tokens)."""
    return sys.modules[type(module).__module__].apply_mask_to_padding_states(hidden_states, attention_mask)
