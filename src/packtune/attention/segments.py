"""Where each token of a packed row sits: its document and its position in it, on the device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from packtune.attention.varlen import CuSeqlens


@dataclass(frozen=True, eq=False)
class Segments:
    """The documents of ``rows`` flattened rows of ``length`` tokens.

    ``cu``: the validated boundaries (device tensor, host copy). ``seq_idx``: ``(rows, length)``
    int32 document index of each token, counted over the flattened rows (what ``causal_conv1d``
    and the mamba kernels take as ``seq_idx``). ``pos``: ``(rows, length)`` int64 position of each
    token inside its own document. ``starts``: ``(rows, length)`` bool, a document starts here.

    >>> cu = CuSeqlens.validate("cu", torch.tensor([0, 3, 5]))
    >>> s = Segments.build(cu, rows=1, length=5)
    >>> s.seq_idx.tolist(), s.pos.tolist(), s.starts.tolist()
    ([[0, 0, 0, 1, 1]], [[0, 1, 2, 0, 1]], [[True, False, False, True, False]])
    """

    cu: CuSeqlens
    seq_idx: torch.Tensor
    pos: torch.Tensor
    starts: torch.Tensor

    @classmethod
    def build(cls, cu: CuSeqlens, rows: int, length: int) -> Segments:
        if cu.total != rows * length:
            raise ValueError(f"the boundaries cover {cu.total} tokens, the layer holds {rows} x {length}")
        tensor = cu.tensor
        token = torch.arange(rows * length, device=tensor.device)
        # No host read: searchsorted on the device tensor (the host copy only checked the total).
        seq_idx = torch.searchsorted(tensor[1:].long(), token, right=True)
        pos = token - tensor.long()[seq_idx]
        shape = (rows, length)
        return cls(cu, seq_idx.to(torch.int32).view(shape), pos.view(shape), (pos == 0).view(shape))

    @property
    def documents(self) -> int:
        return self.cu.documents
