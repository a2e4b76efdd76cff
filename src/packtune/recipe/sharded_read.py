"""Each rank reads its own part of a safetensors checkpoint, under the model's own tensor names.

A ``Source`` says where one tensor of the model lies in the checkpoint: a tensor of a file,
whole, or some of its rows (a part of a fused tensor of a ported family: InternLM2's ``wqkv``,
Baichuan's ``W_pack``, ChatGLM's ``query_key_value``, Qwen-1's ``c_attn``; the rows come from
the family's ``Layout.native_rows``). ``checkpoint_sources`` maps a checkpoint folder, in a
transformers layout or a ported family's original one, to the sources of the native model's
tensors. ``read_into`` copies any range of a tensor's flattened elements from its source, a
block of rows at a time (a fused part: one run of the original's rows at a time, each copied
straight into its place), the file mapped only while a block is read: memory grows by at most
one block (16 MB), never by the tensor or by the file's pages.

``StreamedWeights`` fills a model built without its weights (``packtune.recipe.engines.construction``): FSDP2 shards
(``load_into``: each rank's rows of each ``DTensor``) and ZeRO-3 partitions (``load_zero3``:
each rank's flat range of each parameter). No rank reads, receives or holds another rank's part.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"
#: How much of a tensor one read holds at a time.
BLOCK_BYTES = 16 << 20


@dataclass(frozen=True)
class Source:
    """Tensor ``key`` of safetensors file ``path`` (of shape ``shape``), whole, or its dim-0 rows
    ``rows`` in that order (one part of a fused tensor)."""

    path: str
    key: str
    shape: tuple[int, ...]
    rows: torch.Tensor | None = None

    @property
    def native_shape(self) -> tuple[int, ...]:
        return self.shape if self.rows is None else (len(self.rows), *self.shape[1:])

    def pieces(self, handle, first: int, last: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Rows ``[first, last)`` of the tensor this source describes, from an open ``safe_open``,
        as ``(first row, rows)`` pieces: the whole range for a whole tensor, else one piece per
        run of contiguous original rows (a fused part: e.g. one head group of ``wqkv``). Each
        piece is read only when the caller asks for the next one, so a caller that drops it
        first holds one piece at a time, never the range joined into one block."""
        if self.rows is None:
            yield first, handle.get_slice(self.key)[first:last]
            return
        index = self.rows[first:last].tolist()
        start = 0
        for i in range(1, len(index) + 1):
            if i == len(index) or index[i] != index[i - 1] + 1:
                yield first + start, handle.get_slice(self.key)[index[start] : index[i - 1] + 1]
                start = i


def read_into(dest: torch.Tensor, source: Source, start: int = 0, block_bytes: int = BLOCK_BYTES) -> None:
    """Write elements ``[start, start + dest.numel())`` of the flattened tensor ``source``
    describes into ``dest`` (contiguous; any dtype and device: the copy converts)."""
    from safetensors import safe_open

    flat_dest = dest.view(-1)
    size = flat_dest.numel()
    if size == 0:
        return
    shape = source.native_shape
    if not shape:
        with safe_open(source.path, framework="pt", device="cpu") as f:
            flat_dest.copy_(f.get_tensor(source.key).reshape(-1))
        return
    end = start + size
    row = max(1, math.prod(shape[1:]))
    rows_per_block = max(1, block_bytes // (row * dest.element_size()))
    first, last = start // row, (end - 1) // row + 1
    for r0 in range(first, last, rows_per_block):
        r1 = min(r0 + rows_per_block, last)
        with safe_open(source.path, framework="pt", device="cpu") as f:
            for p0, piece in source.pieces(f, r0, r1):
                lo, hi = max(start, p0 * row), min(end, (p0 + len(piece)) * row)  # this piece's share of the range
                flat_dest[lo - start : hi - start].copy_(piece.reshape(-1)[lo - p0 * row : hi - p0 * row])
                del piece  # before the next piece is read


def checkpoint_files(folder: str) -> dict[str, str] | None:
    """Tensor name -> safetensors file of a checkpoint folder (``None`` without safetensors)."""
    index = os.path.join(folder, SAFETENSORS_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            return {k: os.path.join(folder, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(folder, SAFETENSORS_FILE)
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    return None


def _shapes(files: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the files' headers (no tensor is read)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(set(files.values())):
        with safe_open(path, framework="pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if files.get(k) == path})
    return shapes


def checkpoint_sources(folder: str, layout=None) -> dict[str, Source] | None:
    """Native tensor name -> ``Source`` for the safetensors checkpoint in ``folder`` (``None``
    without safetensors). ``layout``: a ported family's ``Layout`` when the checkpoint is in its
    original layout (raises its ``PortError`` for a tensor the layout does not know)."""
    files = checkpoint_files(folder)
    if files is None:
        return None
    shapes = _shapes(files)
    if layout is None:
        return {k: Source(files[k], k, shapes[k]) for k in files}
    return {native: Source(files[orig], orig, shapes[orig], rows) for native, (orig, rows) in layout.native_rows(shapes).items()}


class StreamedWeights:
    """A checkpoint's tensors, each rank reading its own part, for a model built without them.

    Made from the skeleton before LoRA and sharding: it remembers which module holds each
    tensor (modules survive LoRA wrapping, ``fully_shard`` and ``zero.Init``; parameters do
    not). ``missing`` lists the skeleton's parameters that no source fills.
    """

    def __init__(self, model: torch.nn.Module, sources: dict[str, Source]):
        self.sources = sources
        self.targets: dict[int, tuple[torch.nn.Module, list[tuple[str, str]]]] = {}
        seen: set[int] = set()
        missing: list[str] = []
        for prefix, module in model.named_modules():
            tensors = list(module._parameters.items()) + [
                (n, b) for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set]
            for attr, tensor in tensors:
                if tensor is None or id(tensor) in seen:
                    continue
                key = f"{prefix}.{attr}" if prefix else attr
                if key not in sources:
                    if isinstance(tensor, torch.nn.Parameter):
                        missing.append(key)
                    continue
                shape = tuple(getattr(tensor, "ds_shape", tensor.shape))  # a zero.Init partition: its full shape
                if shape != sources[key].native_shape:
                    raise ValueError(f"checkpoint tensor for {key} has shape {sources[key].native_shape}, the model's is {shape}")
                seen.add(id(tensor))
                self.targets.setdefault(id(module), (module, []))[1].append((attr, key))
        # A tied weight (the output head) is filled through the tensor it shares.
        self.missing = [k for k in missing if id(model.get_parameter(k)) not in seen]

    def _in_file_order(self):
        """The tensors to fill, by file: one file's pages are touched at a time."""
        entries = [(module, attr, key) for module, pairs in self.targets.values() for attr, key in pairs]
        return sorted(entries, key=lambda e: self.sources[e[2]].path)

    def load_into(self, env) -> int:
        """Fill every rank's FSDP2 shards (after ``fully_shard``); returns the tensors loaded.

        A sharded parameter (``DTensor``) gets, on each rank, the rows its local shard holds
        (their offset from ``compute_local_shape_and_global_offset``, torch's own placement
        arithmetic); anything else (buffers) is read whole. No broadcast: every rank reads its
        own rows from the files.
        """
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        loaded = 0
        with torch.no_grad():
            for module, attr, key in self._in_file_order():
                tensor = getattr(module, attr)
                source = self.sources[key]
                if isinstance(tensor, DTensor):
                    local = tensor.to_local()
                    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
                    if tuple(local.shape) != tuple(shape) or any(offset[1:]) or tuple(shape[1:]) != tuple(tensor.shape[1:]) \
                            or not local.is_contiguous():
                        raise RuntimeError(f"FSDP2 shard of {key} is not a contiguous block of rows "
                                           f"(local {tuple(local.shape)} at {tuple(offset)} of {tuple(tensor.shape)})")
                    read_into(local, source, offset[0] * math.prod(tensor.shape[1:]) if tensor.dim() else 0)
                else:
                    read_into(tensor.data, source)
                loaded += 1
        return loaded

    def load_zero3(self, env) -> int:
        """Fill a model partitioned by ``zero.Init``; returns the tensors loaded.

        Every rank reads only its own partition of each parameter: ZeRO-3 keeps rank ``r``'s
        part of a parameter as elements ``[r * P, (r + 1) * P)`` of the flattened tensor
        (``ds_tensor``, ``P`` elements, the last one padded), so each rank reads the rows that
        hold them, a block at a time: no gather, no broadcast, nothing beyond its partitions
        and one block. (Buffers are not partitioned: each rank reads them whole.) One small
        weight is then gathered and compared with the checkpoint, so a DeepSpeed that laid its
        partitions out differently would stop the run here instead of training on shuffled
        weights. Secondary partitions (hpZ) are refilled by gathering, DeepSpeed's own way.
        """
        import deepspeed

        loaded, probe = 0, None
        with torch.no_grad():
            for module, attr, key in self._in_file_order():
                tensor, source = getattr(module, attr), self.sources[key]
                if getattr(tensor, "ds_tensor", None) is None:
                    read_into(tensor.data, source)
                elif getattr(tensor, "ds_secondary_tensor", None) is not None:
                    with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0):
                        if env.is_main:
                            read_into(tensor.data, source)
                else:
                    read_partition(tensor, source)
                    if tensor.dim() == 2 and (probe is None or tensor.ds_numel < probe[0].ds_numel):
                        probe = (tensor, source)
                loaded += 1
            if probe is not None:
                param, source = probe
                with deepspeed.zero.GatheredParameters([param]):
                    want = torch.empty(source.native_shape, dtype=param.dtype)
                    read_into(want, source)
                    if not torch.equal(param.data, want):
                        raise RuntimeError(f"ZeRO-3 partitions of {source.key} hold other values than the checkpoint: this "
                                           "DeepSpeed lays partitions out differently from what packtune writes")
        return loaded


def read_partition(param: torch.Tensor, source: Source, block_bytes: int = BLOCK_BYTES) -> None:
    """Write this rank's ZeRO-3 partition of ``param`` (see ``StreamedWeights.load_zero3``)."""
    import deepspeed

    part = param.ds_tensor
    size = part.numel()
    start = size * deepspeed.comm.get_rank(group=param.ds_process_group)
    end = min(start + size, param.ds_numel)
    part.zero_()  # the padding past the last element
    if start < end:
        read_into(part.data[: end - start], source, start, block_bytes)
