"""Build a model larger than one rank: ZeRO-3 under ``deepspeed.zero.Init``, FSDP2 from the meta device.

Without this, every rank builds the whole model before the engine shards it: a 70B model in
fp32 is 280 GB per rank, and the run dies before its first step. ``model_construction`` says,
for the engine of a run, how the model is built (``build_model`` does the rest as usual:
varlen, gradient checkpointing, LoRA):

* **ZeRO-3** keeps transformers' own DeepSpeed integration switched on for the run (an
  ``HfDeepSpeedConfig`` kept alive, so ``is_deepspeed_zero3_enabled()`` holds): ``from_config``
  and ``from_pretrained`` construct under ``deepspeed.zero.Init``, each parameter partitioned
  as it is created. That covers random init and every loader that goes through transformers.
  A checkpoint in safetensors with the model's own tensor names is streamed instead (the
  transformers loader holds the whole checkpoint on the main rank while it copies): the model
  is built as a skeleton (see FSDP2 below), partitioned by ``zero.Init(module=...)`` (each
  full parameter freed as soon as its partition exists), and ``StreamedWeights.load_zero3``
  fills the partitions: every rank reads only the rows that hold its own partition of each
  parameter, a block at a time.
* **FSDP2** builds the base model on the meta device (accelerate's ``init_empty_weights``), then
  gives each parameter CPU memory that is allocated but never written (no resident pages), so
  that varlen, LoRA (whose adapters are real and seeded as usual) and gradient checkpointing
  apply as on a loaded model. ``fully_shard`` then writes each rank's shards only (and moves
  them to the device), and ``StreamedWeights.load_into`` fills them: the main rank reads the
  checkpoint tensor by tensor (safetensors ``safe_open``, memory-mapped, one file open at a
  time) and ``set_model_state_dict(..., StateDictOptions(full_state_dict=True,
  broadcast_from_rank0=True))`` sends each module's tensors to every rank, which keeps its
  slice. No rank holds more than one module's full tensors beside its shards.

A model that cannot stream (random init under FSDP2, QLoRA, remote code, weights not in
safetensors, checkpoint names that differ from the model's, such as the ported families') is
built as before (whole on every rank under FSDP2; by transformers under ZeRO-3), and the log
says why. The varlen leak check (``check_no_leak``) runs on the loaded weights, never on empty
or partitioned ones: under ZeRO-3 before the engine, each module gathering its own weights
while it runs (``gathered_while_running``); under FSDP2 through the engine's forward.
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

log = logging.getLogger("packtune")

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"


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

    def check_partitioned(self, model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> None:
        """``check_no_leak`` on a ``zero.Init`` model, each module's parameters gathered only
        while it runs; a model whose modules read other modules' weights is checked with all
        of them gathered at once instead."""
        import deepspeed

        from packtune.modeling import LeakError, check_no_leak

        try:
            with gathered_while_running(model):
                check_no_leak(model, dtype=dtype)
            return
        except LeakError:
            raise
        except RuntimeError as exc:
            log.info("ZeRO-3: checking for leaks with all parameters gathered (module by module failed: %s)",
                     str(exc).splitlines()[0])
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            check_no_leak(model, dtype=dtype)

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



def hf_config(settings: Settings):
    """The transformers config of the model to train, without building it (``None`` when it
    cannot be read without remote code)."""
    from transformers import AutoConfig

    try:
        if settings.model_config is not None:
            import copy

            return AutoConfig.for_model(**copy.deepcopy(settings.model_config))
        return AutoConfig.from_pretrained(settings.pretrained_model_name_or_path, trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError, KeyError):
        return None


def _deepspeed_construction(settings: Settings, env: DistEnv, dtype: torch.dtype, deepspeed) -> Construction:
    from packtune.recipe.engine_deepspeed import prepare_deepspeed, run_config, zero_stage

    config = hf_config(settings)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    filled = run_config(deepspeed, settings, env.world_size, dtype, getattr(text, "hidden_size", None))
    if zero_stage(filled) != 3 or (settings.lora or {}).get("quantization"):
        return Construction("whole", deepspeed_config=filled)
    # Before transformers' ZeRO-3 switch is on: it would build these under zero.Init.
    files = _stream_source(settings, env, "ZeRO-3", "transformers loads it (the main rank holds the whole checkpoint while it does)",
                           config)
    base = skeleton(config, base_dtype(settings, dtype)) if files is not None else None
    prepare_deepspeed(env)  # zero.Init partitions over the process group: it must exist first
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    construction = Construction("zero3", deepspeed_config=filled, leak_check="partitioned", hf_deepspeed=HfDeepSpeedConfig(filled))
    if base is None:
        log.info("ZeRO-3: the model is built under deepspeed.zero.Init, each rank holding its partitions only")
        return construction
    # Partition the skeleton as if it had been built under zero.Init (every full parameter is
    # freed as soon as its partition exists), then stream the checkpoint into the partitions.
    deepspeed.zero.Init(module=base, config_dict_or_path=filled)
    StreamedWeights(base, files).load_zero3(env)
    log.info("ZeRO-3: the model is partitioned as it is built (deepspeed.zero.Init); each rank read its partitions "
             "of %s", settings.pretrained_model_name_or_path)
    construction.how, construction.base = "zero3_stream", base
    return construction


# --- FSDP2 -------------------------------------------------------------------------------------


def _fsdp_construction(settings: Settings, env: DistEnv, dtype: torch.dtype) -> Construction:
    config = hf_config(settings)
    files = _stream_source(settings, env, "FSDP2", "every rank builds the whole model before sharding", config)
    if files is None:
        return Construction("whole")
    base = skeleton(config, base_dtype(settings, dtype))
    log.info("FSDP2: the model is built on the meta device; rank 0 streams %s into every rank's shards",
             settings.pretrained_model_name_or_path)
    return Construction("fsdp_stream", base=base, weights=StreamedWeights(base, files), leak_check="engine")


def _stream_source(settings: Settings, env: DistEnv, engine: str, otherwise: str, config=None) -> dict[str, str] | None:
    """Tensor name -> safetensors file of the checkpoint, when its weights can be streamed into
    the model's own names; else ``None``, after logging why and what happens instead.
    ``config``: the model's ``hf_config``, when the caller has read it (else it is read here)."""
    if config is None:
        config = hf_config(settings)
    why = _cannot_stream(settings, config)
    folder = None if why else _local_folder(settings.pretrained_model_name_or_path, env)
    if folder is None and not why:
        why = "its files are not in a local folder"
    files = None if why else checkpoint_files(folder)
    if files is None and not why:
        why = "its weights are not in safetensors files"
    if files is not None:
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        with init_empty_weights(include_buffers=True):  # names and shapes only
            missing = StreamedWeights(AutoModelForCausalLM.from_config(config), files).missing
        if missing:
            why = f"the checkpoint names its tensors differently (no {', '.join(missing[:3])})"
    if why:
        log.info("%s: %s (%s)", engine, otherwise, why)
        return None
    return files


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


def _local_folder(name: str, env: DistEnv) -> str | None:
    """The local folder of a checkpoint: ``name`` itself, or its copy in the Hugging Face cache
    (downloaded by the main rank first, then found by the others)."""
    if os.path.isdir(name):
        return name
    try:
        from huggingface_hub import snapshot_download

        from packtune.distributed import on_main_rank

        patterns = ["*.json", "*.safetensors"]
        on_main_rank(env, lambda: snapshot_download(name, allow_patterns=patterns))
        return snapshot_download(name, allow_patterns=patterns)
    except Exception:  # offline, gated, or not a hub id: transformers says why when it loads
        return None


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


def skeleton(config, dtype: torch.dtype) -> torch.nn.Module:
    """The model of ``config`` on the CPU, its parameters allocated but never written.

    Built on the meta device (buffers real: rotary frequencies are computed as usual), then
    each parameter gets uninitialised memory (``torch.empty``): the operating system backs a
    page only once it is written, so the whole model costs no resident memory, while moving,
    LoRA (its adapters are real and seeded as usual) and hooks work as on a loaded model.
    ``fully_shard`` copies each rank's slice into shards of its own (the only pages written)
    and drops the rest; ``StreamedWeights`` then fills the shards.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Tied as a loaded model is: inside the context, accelerate makes each assigned parameter a new one.
    model.tie_weights()
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


class StreamedWeights:
    """A checkpoint's tensors, read on the main rank one module at a time and sent to the shards.

    Made from the skeleton before LoRA and sharding: it remembers which module holds each
    checkpoint tensor (modules survive LoRA wrapping and ``fully_shard``; parameters do not).
    ``missing`` lists the skeleton's tensors the checkpoint does not hold under the same name.
    """

    def __init__(self, model: torch.nn.Module, files: dict[str, str]):
        self.files = files
        self.targets: dict[int, tuple[torch.nn.Module, list[tuple[str, str]]]] = {}
        seen: set[int] = set()
        self.missing: list[str] = []
        for prefix, module in model.named_modules():
            tensors = list(module._parameters.items()) + [
                (n, b) for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set]
            for attr, tensor in tensors:
                if tensor is None or id(tensor) in seen:
                    continue
                key = f"{prefix}.{attr}" if prefix else attr
                if key not in files:
                    if isinstance(tensor, torch.nn.Parameter):
                        self.missing.append(key)
                    continue
                seen.add(id(tensor))
                self.targets.setdefault(id(module), (module, []))[1].append((attr, key))
        self.missing = [k for k in self.missing if not self._tied_elsewhere(model, k, seen)]

    @staticmethod
    def _tied_elsewhere(model, key: str, loaded: set[int]) -> bool:
        return id(model.get_parameter(key)) in loaded

    def _in_file_order(self):
        """The modules to fill, grouped by file, so that one file at a time is open."""
        return sorted(self.targets.values(), key=lambda t: self.files[t[1][0][1]])

    def load_into(self, env: DistEnv) -> int:
        """Fill every rank's FSDP2 shards (after ``fully_shard``); returns the tensors loaded.

        Per module: the main rank reads its tensors (memory-mapped, no copy) and
        ``set_model_state_dict(..., broadcast_from_rank0=True)`` sends them one by one to every
        rank, which copies its slice into its shard (``strict=False``: one module at a time).
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        loaded = 0
        with _Reader() as reader:
            for module, entries in self._in_file_order():
                state = {attr: reader.tensor(self.files[key], key) for attr, key in entries} if env.is_main else {}
                set_model_state_dict(module, state, options=options)
                loaded += len(entries)
                del state
        return loaded

    def load_zero3(self, env: DistEnv) -> int:
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
            for module, entries in self._in_file_order():
                for attr, key in entries:
                    tensor = getattr(module, attr)
                    if getattr(tensor, "ds_tensor", None) is None:
                        copy_in_blocks(tensor, self.files[key], key)
                    elif getattr(tensor, "ds_secondary_tensor", None) is not None:
                        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0):
                            if env.is_main:
                                copy_in_blocks(tensor, self.files[key], key)
                    else:
                        _read_partition(tensor, self.files[key], key)
                        if tensor.dim() == 2 and (probe is None or tensor.ds_numel < probe[0].ds_numel):
                            probe = (tensor, key)
                    loaded += 1
            if probe is not None:
                param, key = probe
                from safetensors import safe_open

                with deepspeed.zero.GatheredParameters([param]), safe_open(self.files[key], framework="pt") as f:
                    if not torch.equal(param.data, f.get_tensor(key).to(param.dtype)):
                        raise RuntimeError(f"ZeRO-3 partitions of {key} hold other values than the checkpoint: this "
                                           "DeepSpeed lays partitions out differently from what packtune writes")
        return loaded


def _read_partition(param: torch.Tensor, path: str, key: str, block_bytes: int = 16 << 20) -> None:
    """Write this rank's ZeRO-3 partition of ``param`` (see ``load_zero3``) from the checkpoint."""
    import deepspeed
    from safetensors import safe_open

    part = param.ds_tensor
    size = part.numel()
    start = size * deepspeed.comm.get_rank(group=param.ds_process_group)
    end = min(start + size, param.ds_numel)
    part.zero_()  # the padding past the last element
    if start >= end:
        return
    shape = tuple(param.ds_shape)
    row = max(1, param.ds_numel // shape[0]) if shape else 1
    rows_per_block = max(1, block_bytes // (row * part.element_size()))
    first, last = start // row, (end - 1) // row + 1
    for r0 in range(first, last, rows_per_block):
        r1 = min(r0 + rows_per_block, last)
        with safe_open(path, framework="pt", device="cpu") as f:
            block = f.get_slice(key)[r0:r1] if shape else f.get_tensor(key)
            flat = block.reshape(-1)
            lo, hi = max(start, r0 * row), min(end, r1 * row)  # this block's share of the partition
            part[lo - start : hi - start].copy_(flat[lo - r0 * row : hi - r0 * row])
            del block, flat


def copy_in_blocks(dest: torch.Tensor, path: str, key: str, block_bytes: int = 16 << 20) -> None:
    """Copy tensor ``key`` of safetensors file ``path`` into ``dest``, ``block_bytes`` of rows at
    a time, the file mapped only while a block is read: the copy adds one block to the memory,
    not the tensor's size of mapped file pages."""
    from safetensors import safe_open

    rows = dest.shape[0] if dest.dim() else 1
    per_row = max(1, dest.numel() // max(rows, 1)) * dest.element_size()
    step = max(1, block_bytes // per_row)
    for start in range(0, rows, step):
        with safe_open(path, framework="pt", device="cpu") as f:
            if dest.dim() == 0:
                dest.copy_(f.get_tensor(key))
                return
            block = f.get_slice(key)[start : start + step]
            dest[start : start + step].copy_(block)
            del block


class _Reader:
    """safetensors files opened one at a time (an open file's pages count as resident memory)."""

    def __init__(self):
        self.path, self.handle, self.stack = None, None, contextlib.ExitStack()

    def tensor(self, path: str, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if path != self.path:
            self.stack.close()
            self.stack = contextlib.ExitStack()
            self.handle = self.stack.enter_context(safe_open(path, framework="pt", device="cpu"))
            self.path = path
        return self.handle.get_tensor(key)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stack.close()

