"""How a run builds its model, and the pieces the sharded engines build theirs from.

Without a sharded construction every rank builds the whole model before the engine shards it:
a 70B model in fp32 is 280 GB per rank, and the run dies before its first step. Each engine
module of ``packtune.recipe.engines`` says how its model is built (``construction``, a context
manager yielding a ``Construction``); ``build_model`` does the rest as usual (varlen, gradient
checkpointing, LoRA):

* one process and DDP (``plain``): the whole model on every rank (this module's ``Construction``);
* **FSDP2** (``fsdp``) builds the base model as a ``skeleton``: on the meta device
  (accelerate's ``init_empty_weights``), then each parameter gets CPU memory that is allocated
  but never written (no resident pages), so that varlen, LoRA (whose adapters are real and
  seeded as usual) and gradient checkpointing apply as on a loaded model. ``fully_shard`` then
  writes each rank's shards only (and moves them to the device), and ``StreamedWeights.load_into``
  fills them: each rank reads the rows of its own shards from the files; nothing is broadcast;
* **ZeRO-3** (``deepspeed``) keeps transformers' own DeepSpeed integration switched on for the
  run, so that ``from_config`` and ``from_pretrained`` construct under ``deepspeed.zero.Init``;
  a checkpoint in safetensors is streamed instead, into a partitioned skeleton
  (``StreamedWeights.load_zero3``: every rank reads only the elements of its own partition).

A ported family (InternLM 1/2, Baichuan, ChatGLM2/3, Qwen-1) in its original layout, a local
folder or a hub id (downloaded as a native one is: ``ported_hub_folder``), is built as its
native class (``packtune.ports``); its fused tensors are sliced at read time (``sharded_read``). A model that cannot stream (random init under FSDP2, QLoRA, remote code,
weights not in safetensors, checkpoint names the model does not have: ``stream_source``) is
built as before (whole on every rank under FSDP2; by transformers under ZeRO-3), and the log
says why.

The varlen leak check (``check_no_leak``) runs on the loaded weights, never on empty or
partitioned ones; the construction says where: in ``build_model`` on a whole model
(``check_in_build``), after it (``built``: ZeRO-3, each module gathering its own weights while
it runs) or through the engine once it holds the model (``ready``: FSDP2 from a skeleton).
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from packtune.config.settings import Settings
from packtune.distributed import DistEnv, peak_memory
from packtune.recipe.sharded_read import Source, StreamedWeights, checkpoint_files, checkpoint_sources

__all__ = ["Construction", "StreamedWeights", "hf_config", "skeleton", "stream_source"]

log = logging.getLogger("packtune")


class Construction:
    """How a run builds its model and where the varlen leak check runs: the whole model on
    every rank, checked by ``build_model``. The sharded engines' constructions subclass it.

    ``how`` names the construction in the log; ``base`` is what ``build_model`` starts from
    instead of loading (``None``: it loads as usual).
    """

    how = "whole"
    #: Whether ``build_model`` checks the model it builds (a whole model, loaded on this rank).
    check_in_build = True

    def __init__(self, base: torch.nn.Module | None = None):
        self.base = base

    def built(self, model: torch.nn.Module, settings: Settings, env: DistEnv, dtype: torch.dtype) -> None:
        """After ``build_model``, before the engine (here: nothing; the engine loads or places it)."""

    def ready(self, engine, settings: Settings, env: DistEnv, dtype: torch.dtype) -> None:
        """Once the engine holds the model: it is now built and loaded."""
        log.info("model built and loaded (%s): %s", self.how, peak_memory(env))

    def close(self) -> None:
        """Undo what the construction switched on for the run (nothing here)."""


@contextlib.contextmanager
def whole_model(settings: Settings, env: DistEnv, dtype: torch.dtype, deepspeed: str | dict | None = None):
    """The construction of an engine that holds the whole model on every rank."""
    yield Construction()


@contextlib.contextmanager
def sharded_construction(make):
    """The ``Construction`` ``make()`` returns, valid until the context exits (closed then),
    built and used with freed memory returned to the system (``freed_memory_returned``)."""
    construction = Construction()
    with freed_memory_returned():
        try:
            construction = make()
            yield construction
        finally:
            construction.close()


#: glibc's ``mallopt`` parameter for the size from which blocks are mapped on their own.
M_MMAP_THRESHOLD = -3


@contextlib.contextmanager
def freed_memory_returned(threshold: int = 1 << 20):
    """Blocks of ``threshold`` bytes and more go back to the operating system when freed.

    Sharded construction allocates and frees every full parameter once (a broadcast or a
    gather, then the shard is kept). glibc maps large blocks on their own and unmaps them on
    free, but after the first such free it raises that threshold (up to 32 MB) and serves
    blocks below it from its heap, which keeps freed blocks resident: over a model's
    parameters that is up to the model's size, the very memory sharding saves. A fixed
    threshold (``mallopt(M_MMAP_THRESHOLD)``) returns them; at the end of the run it is set to
    glibc's usual ceiling and the heap trimmed. Elsewhere (another C library) nothing changes.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
            libc.malloc_trim(0)


def _glibc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it, and mallopt's meaning)
        return libc
    except (OSError, AttributeError):
        return None


def hf_config(settings: Settings, folder: str | None = None):
    """The transformers config of the model to train, without building it (``None`` when it
    cannot be read without remote code). For a ported family's checkpoint in its original
    layout: its native config, as ``packtune.load_model`` builds it. ``folder``: the local
    copy of a hub id (``ported_hub_folder``), read instead of the id."""
    from transformers import AutoConfig

    from packtune.ports import api as ports

    try:
        if settings.model_config is not None:
            import copy

            return AutoConfig.for_model(**copy.deepcopy(settings.model_config))
        folder = str(folder or settings.pretrained_model_name_or_path)
        original = ports.original_layout(folder)
        if original is not None:
            from packtune.ports.files import weight_files

            return ports.native_config(original[1], original[0], folder, weight_files(folder)[0])
        return AutoConfig.from_pretrained(settings.pretrained_model_name_or_path, trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError, KeyError):
        return None


def stream_source(settings: Settings, env: DistEnv, engine: str, otherwise: str, config=None,
                  folder: str | None = None) -> dict[str, Source] | None:
    """The model's tensor name -> its ``Source`` in the checkpoint, when each rank can read its
    own part (safetensors in a local folder or the hub's cache, with the model's own names or a
    ported family's original layout); else ``None``, after logging why and what happens instead.
    ``config``: the model's ``hf_config``, when the caller has read it (else it is read here);
    ``folder``: the checkpoint's local copy, when the caller has fetched it."""
    if config is None:
        config = hf_config(settings, folder)
    why = _cannot_stream(settings, config)
    folder = None if why else folder or _local_folder(settings.pretrained_model_name_or_path, env)
    if folder is None and not why:
        why = "its files are not in a local folder"
    sources = None
    if not why:
        from packtune.ports import api as ports
        from packtune.ports.layout import PortError

        try:
            original = ports.original_layout(folder)
            sources = checkpoint_sources(folder, original[0].layout(original[1]) if original else None)
        except PortError as exc:
            why = str(exc)
    if sources is None and not why:
        why = "its weights are not in safetensors files"
    if sources is not None:
        try:
            missing = StreamedWeights(_empty_model(config, torch.float32), sources).missing
        except ValueError as exc:  # a shape that differs
            missing, why = [], str(exc)
        if missing:
            why = f"the checkpoint names its tensors differently (no {', '.join(missing[:3])})"
    if why:
        log.info("%s: %s (%s)", engine, otherwise, why)
        return None
    return sources


def _cannot_stream(settings: Settings, config) -> str | None:
    from transformers import CONFIG_MAPPING

    if settings.model_config is not None:
        return "a random-init model has no checkpoint to stream"
    if (settings.lora or {}).get("quantization"):
        return "QLoRA quantizes while loading"
    if config is None:
        return "its config needs remote code or another loader"
    if getattr(config, "auto_map", None) and settings.trust_remote_code:
        return "it is remote code"
    if config.model_type not in CONFIG_MAPPING:
        return f"transformers has no class of its own for model_type {config.model_type!r}"
    return None


def _local_folder(name: str, env: DistEnv, extra: tuple[str, ...] = ()) -> str | None:
    """The local folder of a checkpoint: ``name`` itself, or its copy in the Hugging Face cache
    (its config and safetensors files, and the files matching ``extra``; downloaded by the main
    rank first, then found by the others)."""
    if os.path.isdir(name):
        return name
    try:
        from huggingface_hub import snapshot_download

        from packtune.distributed import on_main_rank

        patterns = ["*.json", *extra, "*.safetensors"]
        on_main_rank(env, lambda: snapshot_download(name, allow_patterns=patterns))
        return snapshot_download(name, allow_patterns=patterns)
    except Exception:  # offline, gated, or not a hub id: transformers says why when it loads
        return None


def ported_hub_folder(settings: Settings, env: DistEnv) -> str | None:
    """The local copy of a hub id in a ported family's original layout (InternLM2's ``wqkv``
    ...), fetched the way a native checkpoint is (``_local_folder``), with the code and
    tokenizer files that ``save_model(format="original")`` copies beside its weights; ``None``
    for a local folder, any other model, a random init or a quantized one (which load whole),
    and a checkpoint without safetensors files (said in the log)."""
    name = settings.pretrained_model_name_or_path
    if settings.model_config is not None or not name or os.path.isdir(name) or (settings.lora or {}).get("quantization"):
        return None
    from packtune.ports import api as ports
    from packtune.ports.files import SIDE_FILES

    if ports.port_for(name) is None:  # config.json only
        return None
    folder = _local_folder(name, env, SIDE_FILES)
    if folder is None or ports.original_layout(folder) is None:
        return None
    if checkpoint_files(folder) is None:
        log.info("%s: a ported family's checkpoint without safetensors files: it is loaded whole", name)
        return None
    return folder


def skeleton(config, dtype: torch.dtype) -> torch.nn.Module:
    """The model of ``config`` on the CPU, its parameters allocated but never written.

    Built on the meta device (buffers real: rotary frequencies are computed as usual), then
    each parameter gets uninitialised memory (``torch.empty``): the operating system backs a
    page only once it is written, so the whole model costs no resident memory, while moving,
    LoRA (its adapters are real and seeded as usual) and hooks work as on a loaded model.
    ``fully_shard`` copies each rank's slice into shards of its own (the only pages written)
    and drops the rest; ``StreamedWeights`` then fills the shards.
    """
    model = _empty_model(config, dtype)
    allocated: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in allocated:  # tied weights stay tied
                allocated[id(param)] = torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype),
                                                          requires_grad=param.requires_grad)
            module._parameters[name] = allocated[id(param)]
    return model


def _empty_model(config, dtype: torch.dtype) -> torch.nn.Module:
    """The model of ``config`` with its parameters on the meta device (buffers real), tied as a
    loaded one is; a ported family's additions in place (``packtune.ports.api.prepare_ported``)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    import packtune.ports.baichuan_alibi  # noqa: F401  (registers packtune's class with the Auto classes)
    from packtune.ports.api import prepare_ported

    with init_empty_weights(include_buffers=False):
        model = prepare_ported(AutoModelForCausalLM.from_config(config, dtype=dtype))
    # Tied as a loaded model is: inside the context, accelerate makes each assigned parameter a new one.
    model.tie_weights()
    return model
