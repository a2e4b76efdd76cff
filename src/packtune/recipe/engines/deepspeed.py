"""DeepSpeed ZeRO (stages 1, 2, 3, with or without CPU offload) behind the engine interface.

``--deepspeed NAME`` names a built-in JSON or the user's, its ``"auto"`` values filled from
the config (``deepspeed_config``: ``run_config``).

How the recipe's step maps onto DeepSpeed: the optimizer is a plain ``torch.optim.AdamW``
with packtune's parameter groups (no C++ extension is compiled, on any device; the built-in
configs set ``zero_allow_untested_optimizer`` and ``zero_force_ds_cpu_optimizer: false``,
as XTuner's do), the schedule is packtune's warmup + cosine ``LambdaLR``. Before each
micro-batch the accumulation boundary is set explicitly (``set_gradient_accumulation_boundary``),
``backward`` runs with ``scale_wrt_gas=False`` (the loss is already normalised by the global
batch, see ``recipe/step.py``) and ``step()`` is called once per optimizer step. DeepSpeed
averages gradients over ranks like DDP, so the update equals a one-process run with the same
global batch (``tests/test_distributed.py`` checks the loss and gradient norm).

Checkpoints are folders ``iter_<step>.pth/`` written by ``save_checkpoint`` under a temporary
name and renamed when every rank has written its shards (``checkpoint_folders``);
``read_folder`` reads them back into one plain state dict (``convert pth_to_hf``), and also
DeepSpeed folders that packtune did not write (a ``global_step*`` tag folder or its parent with
``latest``). A ZeRO checkpoint written by another number of ranks is loaded through DeepSpeed's
universal checkpoint: converted once by ``ds_to_universal`` (``deepspeed_universal``) and loaded
with ``"checkpoint": {"load_universal": true}``, which the engine must know before
``deepspeed.initialize`` (``resume``).

Construction (``construction``): under ZeRO-3 the model is built partitioned (transformers'
``deepspeed.zero.Init``, or a partitioned skeleton the checkpoint streams into), so parameters
reach the engine as flat stubs whose shape is ``ds_shape``; the varlen leak check then runs
before the engine, each module gathering its own weights while it runs (``Zero3Construction``).
ZeRO 0-2 build the whole model on every rank, checked in ``build_model``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import re
import shutil

import torch

from packtune.config.settings import Settings
from packtune.distributed import DistEnv, ensure_process_group, on_main_rank, peak_memory
from packtune.modeling import text_config
from packtune.recipe import checkpoint as ckpt
from packtune.recipe.checkpoint_folders import atomic_folder, select_state, write_info
from packtune.recipe.engines.base import BaseEngine, CheckpointMismatch, build_optimizer, lr_lambda, not_my_checkpoint
from packtune.recipe.engines.construction import (
    Construction,
    StreamedWeights,
    hf_config,
    ported_hub_folder,
    sharded_construction,
    skeleton,
    stream_source,
)
from packtune.recipe.engines.deepspeed_config import INSTALL_HINT, require_deepspeed, run_config, zero_stage
from packtune.recipe.model_setup import base_dtype

log = logging.getLogger("packtune")

#: The tag (sub-folder) of the state packtune saves in a DeepSpeed checkpoint folder.
DEEPSPEED_TAG = "state"
#: DeepSpeed's universal form of ``state`` (made on a resume with another number of processes).
UNIVERSAL_TAG = "state_universal"


def _hidden_size(model: torch.nn.Module) -> int | None:
    if getattr(model, "config", None) is None:
        return None
    return getattr(text_config(model), "hidden_size", None)


def _launcher_variables(env: DistEnv) -> None:
    """Set the variables a launcher would have set, where missing (one process without a
    launcher): DeepSpeed reads them while it starts and later (``LOCAL_RANK``), and without
    them goes looking for MPI."""
    wanted = {"RANK": str(env.rank), "LOCAL_RANK": str(env.local_rank), "WORLD_SIZE": str(env.world_size),
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    for key, value in wanted.items():
        os.environ.setdefault(key, value)


def _skip_cpu_shm_op() -> None:
    """Do not compile DeepSpeed's shared-memory all-reduce for the CPU accelerator.

    DeepSpeed builds it (C++, one to two minutes on first use) when its communication backend
    starts, but uses it only for ``inference_all_reduce``; training collectives go through
    ``torch.distributed`` (gloo on the CPU) either way. Marking it unavailable, as DeepSpeed
    does on platforms without it, saves the compile.
    """
    try:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except Exception:  # another DeepSpeed layout: it builds the op as usual
        pass


def prepare_deepspeed(env: DistEnv) -> None:
    """What DeepSpeed needs before it starts (``zero.Init`` or ``initialize``): a process group
    (one of its own for a single process), the launcher's variables, no shared-memory op build."""
    ensure_process_group(env)
    _launcher_variables(env)
    if env.device.type == "cpu":
        _skip_cpu_shm_op()
    # DeepSpeed's communication layer over the existing group: its configs read the world size there.
    require_deepspeed().init_distributed(dist_backend="gloo" if env.device.type == "cpu" else "nccl")


class DeepSpeedEngine(BaseEngine):
    """``deepspeed.initialize`` with packtune's optimizer and schedule; see the module docs."""

    name = "deepspeed"

    @classmethod
    def construction(cls, settings: Settings, env: DistEnv, dtype: torch.dtype, deepspeed: str | dict | None = None):
        """``DeepSpeedConstruction`` (or ``Zero3Construction``) for ``--deepspeed deepspeed``."""
        return sharded_construction(lambda: _construction(settings, env, dtype, deepspeed))

    @classmethod
    def create(cls, model, env: DistEnv, settings: Settings, total_steps: int, compute_dtype: torch.dtype,
               construction: Construction, resume: str | None = None) -> DeepSpeedEngine:
        return cls(model, env, settings, total_steps, compute_dtype, construction.deepspeed_config, resume=resume)

    @staticmethod
    def read_folder(folder: str, info: dict) -> dict | None:
        """The model state of a DeepSpeed checkpoint folder (``None``: not one)."""
        location = _deepspeed_location(folder)
        if info.get("engine") == "deepspeed" or location:
            if location is None:
                raise FileNotFoundError(f"{folder}: a DeepSpeed checkpoint without its 'latest' file")
            return select_state(_read_deepspeed(*location, info), info)
        return None

    def __init__(self, model, env: DistEnv, settings: Settings, total_steps: int, compute_dtype: torch.dtype, deepspeed_config,
                 resume: str | None = None):
        deepspeed = require_deepspeed()
        prepare_deepspeed(env)
        self.env = env
        self.settings = settings
        self.full_state = ckpt.needs_full_state(settings)
        self.config = run_config(deepspeed_config, settings, env.world_size, compute_dtype, _hidden_size(model))
        self.stage = zero_stage(self.config)
        # A ZeRO checkpoint written by another number of ranks loads through DeepSpeed's
        # universal form; the engine must be told before it is built.
        written_by = deepspeed_world_size(resume) if resume and self.stage >= 1 else None
        self.universal = written_by is not None and written_by != env.world_size
        if self.universal:
            self.config.setdefault("checkpoint", {})["load_universal"] = True
        # DeepSpeed's fp16/bf16 optimizers check overflow and compute the norm themselves.
        self._half = bool(self.config["fp16"]["enabled"] or self.config["bf16"]["enabled"])
        self.loss_scaling = bool(self.config["fp16"]["enabled"])
        # Names as the unwrapped model's state_dict has them: what a converted checkpoint holds.
        self.state_keys = list(model.state_dict().keys())
        self.trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
        optimizer = build_optimizer(model, settings.lr, settings.betas, settings.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, settings.warmup_ratio))
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.config
        )

    def unwrapped(self) -> torch.nn.Module:
        return self.model.module

    def accumulate(self, last: bool):
        # Gradients are reduced (ZeRO-1, stage 0) or their partitions finalised (ZeRO-2/3)
        # only on the boundary; the recipe tells which micro-batch is the last.
        self.model.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss, scale_wrt_gas=False)

    def _local_grad_norm(self) -> float:
        grads = [p.grad for p in self.trainable() if p.grad is not None]
        if not grads:
            return 0.0
        return float(torch.nn.utils.get_total_norm(grads, 2.0))

    def step(self) -> float:
        """One optimizer step; returns the global gradient norm before clipping.

        ZeRO (and DeepSpeed's fp16/bf16 optimizers) discard a step whose gradient norm is not
        finite (their overflow check); for fp32 without ZeRO (stage 0) packtune checks the
        norm itself. Either way the schedule advances, as in every other engine.
        """
        self.model.set_gradient_accumulation_boundary(True)
        if self.stage == 0 and not self._half:
            # Gradients are already averaged over ranks (reduced in the last backward).
            norm = self._local_grad_norm()
            if not math.isfinite(norm):
                self.skip_step()
                return norm
            self.model.step()
            return norm
        self.model.step()
        norm = self.model.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        if not self.model.was_step_applied():
            self.scheduler.step()
        return norm

    def skip_step(self) -> None:
        """Drop this step's gradients (non-finite loss); the schedule still advances."""
        self.model.set_gradient_accumulation_boundary(True)
        if self.stage == 0 and not self._half:
            self.model.zero_grad()
            self.scheduler.step()
            return
        # A non-finite loss leaves non-finite gradients, which ZeRO's overflow check discards
        # (clearing its partitions); there is no other public way to drop them.
        self.model.step()
        if self.model.was_step_applied():
            log.warning("DeepSpeed applied the step although its loss was not finite (its gradients were)")
        else:
            self.scheduler.step()

    @property
    def lr(self) -> float:
        return float(self.model.get_lr()[0])

    def _repair_universal_stage3(self, groups: list[dict]) -> None:
        """Undo two slips of DeepSpeed's ZeRO-3 universal load (0.19) with torch's AdamW.

        It gives every parameter group one and the same ``step`` tensor, which AdamW increments
        in place once per group, so after a step each group's bias correction is off; and it
        copies the first group's hyperparameters into every group, giving biases and norms the
        weight decay packtune keeps off them. (ZeRO-1/2 load per-parameter steps and groups.)
        """
        base = self.model.optimizer.optimizer
        for state in base.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        for group, before in zip(base.param_groups, groups):
            group["weight_decay"] = before["weight_decay"]

    # --- checkpoints ----------------------------------------------------------------------

    def save(self, path: str, meta: dict) -> None:
        """``iter_<step>.pth/``: DeepSpeed's folder (tag ``state``) plus ``packtune.json``."""
        rng = ckpt.gather_rng_states(self.env)
        with atomic_folder(path, self.env) as tmp:
            self.model.save_checkpoint(
                tmp,
                tag=DEEPSPEED_TAG,
                client_state={"packtune_meta": meta, "packtune_rng": rng},
                exclude_frozen_parameters=not self.full_state,
            )
            if self.env.is_main:
                write_info(
                    tmp,
                    engine="deepspeed",
                    zero_stage=self.stage,
                    full_state=self.full_state,
                    state_keys=self.state_keys,
                    trainable=self.trainable_names,
                    meta=meta,
                )

    def load(self, path: str) -> dict:
        if not os.path.isdir(path) or ckpt.read_info(path).get("engine") != "deepspeed":
            raise not_my_checkpoint(path, "deepspeed")
        tag = DEEPSPEED_TAG
        if self.universal:
            written_by = deepspeed_world_size(path)
            log.info("%s was written by %d processes: loading it on %d through DeepSpeed's universal checkpoint",
                     path, written_by, self.world_size)
            try:
                tag = deepspeed_universal(path, self.env)
            except Exception as exc:  # every rank gets the main rank's conversion error
                raise CheckpointMismatch(
                    f"{path} was written by {written_by} processes, and DeepSpeed's ds_to_universal cannot convert it "
                    f"for {self.world_size} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}): resume it "
                    f"on {written_by} processes") from exc
        groups = [dict(g) for g in self.model.optimizer.optimizer.param_groups] if self.universal else []
        loaded, client = self.model.load_checkpoint(
            path,
            tag=tag,
            load_module_strict=self.full_state,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if loaded is None:
            raise FileNotFoundError(f"{path}: DeepSpeed found no checkpoint to load")
        if self.universal and self.stage == 3:
            self._repair_universal_stage3(groups)
        ckpt.restore_rng_states(client["packtune_rng"], self.env)
        return client["packtune_meta"]


# --- construction ---------------------------------------------------------------------------


class DeepSpeedConstruction(Construction):
    """ZeRO 0-2 (and ZeRO-3 with QLoRA): the whole model on every rank, checked in
    ``build_model``; ``deepspeed_config`` is the filled config construction and engine share."""

    def __init__(self, deepspeed_config: dict, base: torch.nn.Module | None = None):
        super().__init__(base)
        self.deepspeed_config = deepspeed_config


class Zero3Construction(DeepSpeedConstruction):
    """ZeRO-3: the model is partitioned as it is built (``how``: ``zero3``, or ``zero3_stream``
    when the checkpoint streams into a partitioned skeleton), loaded before the engine, and
    leak-checked then (``check_partitioned``)."""

    how = "zero3"
    check_in_build = False

    def __init__(self, deepspeed_config: dict, hf_deepspeed):
        super().__init__(deepspeed_config)
        # transformers keeps only a weak reference: this one keeps ZeRO-3 detection alive.
        self._hf_deepspeed = hf_deepspeed

    def built(self, model: torch.nn.Module, settings: Settings, env: DistEnv, dtype: torch.dtype) -> None:
        log.info("model built and loaded (%s): %s", self.how, peak_memory(env))
        if settings.use_varlen_attn:
            self.check_partitioned(model, dtype, settings.max_length)

    def ready(self, engine, settings: Settings, env: DistEnv, dtype: torch.dtype) -> None:
        log.info("engine ready (%s): %s", self.how, peak_memory(env))  # the engine adds only the optimizer

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


def _construction(settings: Settings, env: DistEnv, dtype: torch.dtype, deepspeed) -> DeepSpeedConstruction:
    def config_of(folder: str | None):
        config = hf_config(settings, folder)
        text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
        return config, run_config(deepspeed, settings, env.world_size, dtype, getattr(text, "hidden_size", None))

    config, filled = config_of(None)
    if zero_stage(filled) != 3 or (settings.lora or {}).get("quantization"):
        return DeepSpeedConstruction(filled)
    folder = ported_hub_folder(settings, env)  # ZeRO-3 only: the download is what it streams from
    if folder is not None:
        config, filled = config_of(folder)
    # Before transformers' ZeRO-3 switch is on: it would build these under zero.Init.
    sources = stream_source(settings, env, "ZeRO-3", "transformers loads it (the main rank holds the whole checkpoint while "
                             "it does; a ported family: every rank reads it whole)", config, folder)
    base = skeleton(config, base_dtype(settings, dtype)) if sources is not None else None
    prepare_deepspeed(env)  # zero.Init partitions over the process group: it must exist first
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    construction = Zero3Construction(filled, HfDeepSpeedConfig(filled))
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


# --- reading checkpoint folders ----------------------------------------------------------------


def _deepspeed_location(folder: str) -> tuple[str, str] | None:
    """``(checkpoint_dir, tag)`` if ``folder`` is a DeepSpeed checkpoint (or one of its tags)."""
    if os.path.isfile(os.path.join(folder, "latest")):
        with open(os.path.join(folder, "latest")) as f:
            return folder, f.read().strip()
    if any(name.endswith("model_states.pt") for name in os.listdir(folder)):
        return os.path.dirname(os.path.abspath(folder)), os.path.basename(os.path.abspath(folder))
    return None


def deepspeed_world_size(folder: str) -> int | None:
    """The number of data-parallel ranks that wrote the ZeRO checkpoint in ``folder`` (one
    optimizer partition each), or ``None`` when it holds no partitioned optimizer state."""
    location = _deepspeed_location(folder) if os.path.isdir(folder) else None
    if location is None:
        return None
    tag_dir = os.path.join(*location)
    if not os.path.isdir(tag_dir):
        return None
    ranks = {m.group(1) for n in os.listdir(tag_dir) if (m := re.match(r".*zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$", n))}
    return len(ranks) or None


def deepspeed_universal(folder: str, env) -> str:
    """The tag of the universal form of the ZeRO checkpoint in ``folder``, made once.

    DeepSpeed's ZeRO checkpoints hold each rank's partition of the flat optimizer state, so they
    load only on the number of ranks that wrote them. DeepSpeed's own ``ds_to_universal``
    rewrites them per parameter (``state_universal/zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt``),
    which any number of ranks loads (``"checkpoint": {"load_universal": true}``). The main rank
    converts into a temporary folder renamed when complete (a kill leaves no half conversion);
    the others wait, and a failed conversion stops every rank with the same error.
    """
    target = os.path.join(folder, UNIVERSAL_TAG)

    def convert() -> None:
        if os.path.isdir(target):
            return
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        location = _deepspeed_location(folder)
        if location is None:
            raise FileNotFoundError(f"{folder}: a DeepSpeed checkpoint without its 'latest' file")
        tmp = f"{target}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        args = argparse.Namespace(input_folder=os.path.join(*location), output_folder=tmp, num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        # One worker: a pool forked from a rank with live process-group threads is not safe.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # DeepSpeed narrates every step
            ds_to_universal(args)
        # It points `latest_universal` at the temporary name; the tag is passed explicitly instead.
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, "latest_universal"))
        os.replace(tmp, target)
        ckpt.fsync_dir(folder)

    on_main_rank(env, convert)
    return UNIVERSAL_TAG


def _read_deepspeed(directory: str, tag: str, info: dict) -> dict:
    tag_dir = os.path.join(directory, tag)
    optim_files = [n for n in os.listdir(tag_dir) if n.endswith("optim_states.pt")]
    stage = info.get("zero_stage")
    if stage is None:
        stage = 1 if optim_files and any("zero_pp_rank" in n for n in optim_files) else 0
    if stage == 0:
        model_file = next(n for n in sorted(os.listdir(tag_dir)) if n.endswith("model_states.pt"))
        state = torch.load(os.path.join(tag_dir, model_file), map_location="cpu", weights_only=False)
        return state["module"]
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as exc:
        raise ImportError(f"reading the ZeRO checkpoint {directory} needs DeepSpeed: " + INSTALL_HINT.split(": ", 1)[1]) from exc
    exclude_frozen = info.get("full_state") is False
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed narrates every file it reads
        return get_fp32_state_dict_from_zero_checkpoint(directory, tag=tag, exclude_frozen_parameters=exclude_frozen)
