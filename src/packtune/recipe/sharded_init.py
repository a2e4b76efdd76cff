"""Build a model larger than one rank: ZeRO-3 under ``deepspeed.zero.Init``, FSDP2 from the meta device.

Without this, every rank builds the whole model before the engine shards it: a 70B model in
fp32 is 280 GB per rank, and the run dies before its first step. ``model_construction`` says,
for the engine of a run, how the model is built (``build_model`` does the rest as usual:
varlen, gradient checkpointing, LoRA):

* **ZeRO-3** keeps transformers' own DeepSpeed integration switched on for the run (an
  ``HfDeepSpeedConfig`` kept alive, so ``is_deepspeed_zero3_enabled()`` holds): ``from_config``
  and ``from_pretrained`` construct under ``deepspeed.zero.Init``, each parameter partitioned
  as it is created. A checkpoint in safetensors (with the model's own tensor names, or a
  ported family's original layout) is streamed instead: the model is built as a skeleton (see
  FSDP2 below), partitioned (``partition_only``: ``zero.Init(module=...)`` without its
  broadcast of every full parameter), and ``StreamedWeights.load_zero3`` fills the partitions:
  every rank reads only the elements of its own partition, a block at a time.
* **FSDP2** builds the base model on the meta device (accelerate's ``init_empty_weights``), then
  gives each parameter CPU memory that is allocated but never written (no resident pages), so
  that varlen, LoRA (whose adapters are real and seeded as usual) and gradient checkpointing
  apply as on a loaded model. ``fully_shard`` then writes each rank's shards only (and moves
  them to the device), and ``StreamedWeights.load_into`` fills them: each rank reads the rows
  of its own shards from the files; nothing is broadcast.

A ported family (InternLM 1/2, Baichuan, ChatGLM2/3, Qwen-1) in its original layout, a local
folder or a hub id (downloaded as a native one is: ``ported_hub_folder``), is built as its
native class (``packtune.ports``); its fused tensors are sliced at read time (``sharded_read``). A model that cannot stream (random init under FSDP2, QLoRA, remote code,
weights not in safetensors, checkpoint names the model does not have) is built as before
(whole on every rank under FSDP2; by transformers under ZeRO-3), and the log says why. The
varlen leak check (``check_no_leak``) runs on the loaded weights, never on empty or partitioned
ones: under ZeRO-3 before the engine, each module gathering its own weights while it runs
(``gathered_while_running``); under FSDP2 through the engine's forward.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

import torch

from packtune.config.settings import Settings
from packtune.distributed import DistEnv
from packtune.recipe.model_setup import base_dtype
from packtune.recipe.sharded_read import Source, StreamedWeights, checkpoint_files, checkpoint_sources

__all__ = ["Construction", "StreamedWeights", "hf_config", "model_construction", "ported_hub_folder", "skeleton"]

log = logging.getLogger("packtune")



class Construction:
    """How a run builds its model; ``model_construction`` makes one.

    ``base`` is what ``build_model`` starts from instead of loading (``None``: it loads as
    usual), ``weights`` what the FSDP2 engine loads into its shards, ``deepspeed_config`` the
    filled DeepSpeed config construction and engine share. ``leak_check`` says where the
    varlen leak check runs: ``"build"`` (in ``build_model``, on a whole model),
    ``"partitioned"`` (``check_partitioned``, before the engine, on a model partitioned by
    ``zero.Init``) or ``"engine"`` (through the FSDP2 engine's forward).
    """

    def __init__(self, how: str = "whole", *, base=None, weights: StreamedWeights | None = None,
                 deepspeed_config: dict | None = None, leak_check: str = "build", hf_deepspeed=None):
        self.how = how
        self.base = base
        self.weights = weights
        self.deepspeed_config = deepspeed_config
        self.leak_check = leak_check
        # transformers keeps only a weak reference: this one keeps ZeRO-3 detection alive.
        self._hf_deepspeed = hf_deepspeed

    def check_partitioned(self, model: torch.nn.Module, dtype: torch.dtype = torch.float32,
                          max_length: int | None = None) -> None:
        """``check_no_leak`` on a ``zero.Init`` model, each module's parameters gathered only
        while it runs (logits only: a module's weights are released before the backward would
        need them); a model whose modules read other modules' weights is checked with all of
        them gathered at once instead, gradients included."""
        import deepspeed

        from packtune.modeling import LeakError, check_no_leak

        try:
            with gathered_while_running(model):
                check_no_leak(model, dtype=dtype, max_length=max_length, grads=False)
            return
        except LeakError:
            raise
        except RuntimeError as exc:
            log.info("ZeRO-3: checking for leaks with all parameters gathered (module by module failed: %s)",
                     str(exc).splitlines()[0])
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            check_no_leak(model, dtype=dtype, max_length=max_length)

    def close(self) -> None:
        if self._hf_deepspeed is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            self._hf_deepspeed = None


@contextlib.contextmanager
def model_construction(kind: str, settings: Settings, env: DistEnv, dtype: torch.dtype, deepspeed: str | dict | None = None):
    """The ``Construction`` for engine ``kind`` (``single``, ``ddp``, ``fsdp``, ``deepspeed``),
    valid until the context exits (for ZeRO-3: transformers' DeepSpeed integration is on)."""
    construction = Construction()
    heap = contextlib.ExitStack()
    try:
        if kind in ("deepspeed", "fsdp"):
            heap.enter_context(freed_memory_returned())
        if kind == "deepspeed":
            construction = _deepspeed_construction(settings, env, dtype, deepspeed)
        elif kind == "fsdp":
            construction = _fsdp_construction(settings, env, dtype)
        yield construction
    finally:
        construction.close()
        heap.close()


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


# --- ZeRO-3 ------------------------------------------------------------------------------------


@contextlib.contextmanager
def gathered_while_running(model: torch.nn.Module):
    """A forward of a ``zero.Init`` model outside DeepSpeed's engine, holding one module's
    weights at a time: each module with partitioned parameters gathers them
    (``deepspeed.zero.GatheredParameters``) in a forward pre-hook and releases them after."""
    import deepspeed

    open_gathers: dict[int, list] = {}

    def gather(module, args):
        ctx = deepspeed.zero.GatheredParameters(list(module.parameters(recurse=False)))
        ctx.__enter__()
        open_gathers.setdefault(id(module), []).append(ctx)

    def release(module, args, output):
        open_gathers[id(module)].pop().__exit__(None, None, None)

    handles = []
    for module in model.modules():
        if any(hasattr(p, "ds_id") for p in module.parameters(recurse=False)):
            handles += [module.register_forward_pre_hook(gather), module.register_forward_hook(release)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for stack in open_gathers.values():  # a forward that raised midway
            while stack:
                stack.pop().__exit__(None, None, None)



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


def _deepspeed_construction(settings: Settings, env: DistEnv, dtype: torch.dtype, deepspeed) -> Construction:
    from packtune.recipe.engine_deepspeed import prepare_deepspeed, run_config, zero_stage

    def config_of(folder: str | None):
        config = hf_config(settings, folder)
        text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
        return config, run_config(deepspeed, settings, env.world_size, dtype, getattr(text, "hidden_size", None))

    config, filled = config_of(None)
    if zero_stage(filled) != 3 or (settings.lora or {}).get("quantization"):
        return Construction("whole", deepspeed_config=filled)
    folder = ported_hub_folder(settings, env)  # ZeRO-3 only: the download is what it streams from
    if folder is not None:
        config, filled = config_of(folder)
    # Before transformers' ZeRO-3 switch is on: it would build these under zero.Init.
    sources = _stream_source(settings, env, "ZeRO-3", "transformers loads it (the main rank holds the whole checkpoint while "
                             "it does; a ported family: every rank reads it whole)", config, folder)
    base = skeleton(config, base_dtype(settings, dtype)) if sources is not None else None
    prepare_deepspeed(env)  # zero.Init partitions over the process group: it must exist first
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    construction = Construction("zero3", deepspeed_config=filled, leak_check="partitioned", hf_deepspeed=HfDeepSpeedConfig(filled))
    if base is None:
        log.info("ZeRO-3: the model is built under deepspeed.zero.Init, each rank holding its partitions only")
        return construction
    # Partition the skeleton as if it had been built under zero.Init (every full parameter is
    # freed as soon as its partition exists), then stream the checkpoint into the partitions.
    partition_only(base, filled)
    StreamedWeights(base, sources).load_zero3(env)
    log.info("ZeRO-3: the model is partitioned as it is built (deepspeed.zero.Init); each rank read its partitions "
             "of %s", settings.pretrained_model_name_or_path)
    construction.how, construction.base = "zero3_stream", base
    return construction


# --- FSDP2 -------------------------------------------------------------------------------------


def _fsdp_construction(settings: Settings, env: DistEnv, dtype: torch.dtype) -> Construction:
    folder = ported_hub_folder(settings, env)
    config = hf_config(settings, folder)
    sources = _stream_source(settings, env, "FSDP2", "every rank builds the whole model before sharding", config, folder)
    if sources is None:
        return Construction("whole")
    base = skeleton(config, base_dtype(settings, dtype))
    log.info("FSDP2: the model is built on the meta device; each rank reads its shards of %s",
             settings.pretrained_model_name_or_path)
    return Construction("fsdp_stream", base=base, weights=StreamedWeights(base, sources), leak_check="engine")


def _stream_source(settings: Settings, env: DistEnv, engine: str, otherwise: str, config=None,
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


def partition_only(model: torch.nn.Module, ds_config: dict) -> None:
    """Partition ``model`` as ``deepspeed.zero.Init(module=model)`` does, without its broadcast.

    ``zero.Init`` broadcasts every full parameter from rank 0 before keeping each rank's
    partition, so that random values agree across ranks: each other rank then writes the
    whole parameter (the largest one, often the vocabulary, is that much extra memory per
    rank) and the network carries the whole model. A skeleton's values are about to be read
    from the checkpoint, so this subclass (this call only) partitions without it. A DeepSpeed
    without that step (``_zero_init_param``) is used as it is, broadcast included.
    """
    import deepspeed

    if not hasattr(deepspeed.zero.Init, "_zero_init_param"):
        log.info("ZeRO-3: this DeepSpeed has no _zero_init_param; partitioning with its broadcast")
        deepspeed.zero.Init(module=model, config_dict_or_path=ds_config)
        return

    class PartitionOnly(deepspeed.zero.Init):
        def _zero_init_param(self, param):
            self._convert_to_deepspeed_param(param)
            param.partition()

    PartitionOnly(module=model, config_dict_or_path=ds_config)
