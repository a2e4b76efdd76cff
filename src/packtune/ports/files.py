"""A checkpoint folder's files: its config, its weights (safetensors or ``.bin``, sharded or
not), and the files ``save_model(format="original")`` copies beside new weights.

``.bin`` files load with ``torch.load(weights_only=True)``: tensors only, no pickled code. No
``.py`` file of a checkpoint is ever imported; they are only copied, so the original layout
still loads with the original code.
"""

from __future__ import annotations

import fnmatch
import json
import os
import pickle
import shutil
from pathlib import Path

import torch

from packtune.ports.layout import PortError

#: Weight file names by format: (single file, index of a sharded checkpoint).
WEIGHTS = {
    "safetensors": ("model.safetensors", "model.safetensors.index.json"),
    "bin": ("pytorch_model.bin", "pytorch_model.bin.index.json"),
}
#: What ``save_model(format="original")`` copies from the base folder: code, tokenizer, generation.
SIDE_FILES = (
    "*.py", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "*.tiktoken", "*.model",
    "vocab.*", "merges.txt", "generation_config.json",
)
#: The ``from_pretrained`` keywords that say where hub files come from (the rest configure the model).
HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only")


def read_config(folder: str | os.PathLike) -> dict:
    """``config.json`` of a checkpoint folder, as a dict."""
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PortError(f"cannot read {path}: {exc}") from exc


def weight_files(folder: str | os.PathLike) -> tuple[str, list[Path]]:
    """``(format, files)`` of the weights in ``folder``; safetensors first when both exist."""
    folder = Path(folder)
    for fmt, (single, index) in WEIGHTS.items():
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            return fmt, [folder / name for name in sorted(set(weight_map.values()))]
        if (folder / single).is_file():
            return fmt, [folder / single]
    raise PortError(f"no weights in {folder}: expected {' or '.join(n for pair in WEIGHTS.values() for n in pair)}")


def read_weights(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """Every tensor of the checkpoint in ``folder`` (CPU), and its format (``safetensors``/``bin``)."""
    fmt, files = weight_files(folder)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if fmt == "safetensors":
            from safetensors.torch import load_file

            part = load_file(str(path), device="cpu")
        else:
            try:
                part = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as exc:
                raise PortError(f"{path} holds more than tensors: packtune loads .bin weights with weights_only=True "
                                f"and never runs pickled code ({str(exc).splitlines()[0]})") from exc
        state.update(part)
    return state, fmt


def _compact(t: torch.Tensor) -> torch.Tensor:
    """A tensor that owns exactly its bytes (``torch.save`` of a view writes its whole storage)."""
    t = t.detach().contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def write_weights(state: dict[str, torch.Tensor], folder: str | os.PathLike, fmt: str, max_shard_size: str | int = "5GB") -> None:
    """Write ``state`` in ``fmt`` (``safetensors`` or ``bin``), sharded above ``max_shard_size``."""
    from huggingface_hub import save_torch_state_dict

    if fmt not in WEIGHTS:
        raise ValueError(f"unknown weight format {fmt!r}; choose one of {', '.join(WEIGHTS)}")
    os.makedirs(folder, exist_ok=True)
    save_torch_state_dict(
        {k: _compact(v) for k, v in state.items()},
        str(folder),
        max_shard_size=max_shard_size,
        safe_serialization=fmt == "safetensors",
    )


def copy_side_files(source: str | os.PathLike | None, target: str | os.PathLike) -> list[str]:
    """Copy the base folder's code, tokenizer and generation files into ``target``; their names."""
    if not source or not os.path.isdir(source):
        return []
    copied = []
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        if os.path.isfile(path) and any(fnmatch.fnmatch(name, pattern) for pattern in SIDE_FILES):
            shutil.copyfile(path, os.path.join(target, name))
            copied.append(name)
    return copied


def hub_folder(repo_id: str, **kwargs) -> str:
    """A local snapshot of hub repo ``repo_id``: config, code and tokenizer files, and one
    weight format (safetensors when the repo has it, else ``.bin``; never both)."""
    from huggingface_hub import snapshot_download

    allowed = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
    folder = snapshot_download(repo_id, allow_patterns=["*.json", *SIDE_FILES], **allowed)
    for suffix in (".safetensors", ".bin"):
        folder = snapshot_download(repo_id, allow_patterns=[f"*{suffix}"], **allowed)
        if any(name.endswith(suffix) for name in os.listdir(folder)):
            break
    return folder


def hub_config(repo_id: str, **kwargs) -> dict | None:
    """``config.json`` of hub repo ``repo_id`` (None when it has none or cannot be fetched)."""
    from huggingface_hub import hf_hub_download

    allowed = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
    try:
        return json.loads(Path(hf_hub_download(repo_id, "config.json", **allowed)).read_text())
    except Exception:  # offline, private, no such repo: transformers' own loader reports it
        return None
