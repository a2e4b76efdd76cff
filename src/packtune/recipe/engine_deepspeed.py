"""DeepSpeed ZeRO (stages 1, 2, 3, with or without CPU offload) behind the engine interface.

``--deepspeed NAME`` picks a built-in JSON (``deepspeed_zero1``, ``deepspeed_zero2``,
``deepspeed_zero3``, ``deepspeed_zero2_offload``, ``deepspeed_zero3_offload``, shipped in
``packtune/configs/deepspeed/``); anything else is a path to the user's JSON. ``"auto"``
values are filled from the config:

=================================  ===================================================
``train_micro_batch_size_per_gpu``  ``batch_size``
``gradient_accumulation_steps``     ``accumulative_counts``
``train_batch_size``                micro batch x accumulation x processes
``gradient_clipping``               ``max_norm``
``fp16.enabled`` / ``bf16.enabled`` the compute dtype (``dtype``)
``reduce_bucket_size`` and the      from the model's hidden size, as Hugging Face's
ZeRO-3 bucket/threshold sizes       Trainer does
=================================  ===================================================

The batch geometry is the recipe's (``StepPlan``): an explicit micro batch or accumulation in
the JSON that disagrees with the config is an error, not a silent second opinion.

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
name and renamed when every rank has written its shards. ``packtune.recipe.sharded`` reads
them back into one plain state dict (``convert pth_to_hf``). A ZeRO checkpoint written by
another number of ranks is loaded through DeepSpeed's universal checkpoint: converted once by
``ds_to_universal`` (``sharded.deepspeed_universal``) and loaded with ``"checkpoint":
{"load_universal": true}``, which the engine must know before ``deepspeed.initialize``
(``resume``). Under ZeRO-3 the model is built partitioned (``sharded_init``), so parameters
reach the engine as flat stubs whose shape is ``ds_shape``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import math
import os

import torch

from packtune.config.settings import Settings
from packtune.distributed import DistEnv, ensure_process_group
from packtune.modeling import text_config
from packtune.recipe import checkpoint as ckpt
from packtune.recipe import sharded
from packtune.recipe.sharded import INSTALL_HINT
from packtune.recipe.engine_base import CheckpointMismatch, Engine, build_optimizer, lr_lambda, not_my_checkpoint

log = logging.getLogger("packtune")

BUILTIN = (
    "deepspeed_zero1",
    "deepspeed_zero2",
    "deepspeed_zero3",
    "deepspeed_zero2_offload",
    "deepspeed_zero3_offload",
)
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "deepspeed")


def require_deepspeed():
    """``import deepspeed``, or an ``ImportError`` whose message says how to install it."""
    if importlib.util.find_spec("deepspeed") is None:
        raise ImportError(INSTALL_HINT)
    try:
        import deepspeed
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} (importing it failed: {exc})") from exc
    return deepspeed


def builtin_path(name: str) -> str | None:
    """The JSON of built-in config ``name`` (``deepspeed_zero2`` or ``deepspeed_zero2.json``)."""
    stem = name[:-5] if name.endswith(".json") else name
    if stem in BUILTIN:
        return os.path.join(CONFIG_DIR, stem + ".json")
    return None


def resolve_deepspeed_config(name_or_path: str | dict) -> dict:
    """The DeepSpeed config dict for a built-in name, a JSON path, or a dict (copied).

    Also checks that DeepSpeed is installed, so ``packtune train --deepspeed ...`` fails in
    one line before any model is loaded. Raises ``ImportError``, ``FileNotFoundError`` or
    ``ValueError`` with a message meant for the user.
    """
    require_deepspeed()
    if isinstance(name_or_path, dict):
        return copy.deepcopy(name_or_path)
    # A built-in name wins over a path of the same name: `--work-dir deepspeed_zero2
    # --deepspeed deepspeed_zero2` names the built-in config, not the work dir.
    path = builtin_path(name_or_path) or name_or_path
    if not os.path.isfile(path):
        what = "a directory, " if os.path.isdir(path) else ""
        raise FileNotFoundError(
            f"--deepspeed {name_or_path}: {what}not a built-in config ({', '.join(BUILTIN)}) nor a JSON file"
        )
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--deepspeed {path}: not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"--deepspeed {path}: the JSON must be an object, got {type(config).__name__}")
    return config


def _is_auto(value) -> bool:
    return isinstance(value, str) and value.lower() == "auto"


def _fill_geometry(config: dict, key: str, want: int, problems: list[str], what: str) -> None:
    value = config.get(key, "auto")
    if _is_auto(value):
        config[key] = want
    elif value != want:
        problems.append(f'"{key}": {value} disagrees with {what} = {want}; set it to "auto" (or to {want})')


def fill_auto(config: dict, *, micro_batch: int, accumulation: int, world_size: int, max_norm: float,
              dtype: torch.dtype, hidden_size: int | None = None) -> dict:
    """A copy of ``config`` with every ``"auto"`` replaced by the value packtune uses.

    >>> c = fill_auto({"train_micro_batch_size_per_gpu": "auto", "bf16": {"enabled": "auto"}},
    ...               micro_batch=2, accumulation=4, world_size=8, max_norm=1.0, dtype=torch.bfloat16)
    >>> c["train_batch_size"], c["gradient_accumulation_steps"], c["gradient_clipping"], c["bf16"]["enabled"]
    (64, 4, 1.0, True)
    """
    config = copy.deepcopy(config)
    problems: list[str] = []
    _fill_geometry(config, "train_micro_batch_size_per_gpu", micro_batch, problems, "batch_size")
    _fill_geometry(config, "gradient_accumulation_steps", accumulation, problems, "accumulative_counts")
    _fill_geometry(config, "train_batch_size", micro_batch * accumulation * world_size, problems,
                   "batch_size x accumulative_counts x processes")
    if _is_auto(config.get("gradient_clipping", "auto")):
        config["gradient_clipping"] = float(max_norm)
    for key, half in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        section = config.setdefault(key, {})
        if _is_auto(section.get("enabled", "auto")):
            section["enabled"] = dtype == half
    if config["fp16"]["enabled"] and config["bf16"]["enabled"]:
        problems.append('"fp16" and "bf16" are both enabled; enable at most one')
    zero = config.get("zero_optimization", {})
    sizes = {
        "reduce_bucket_size": lambda h: h * h,
        "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
        "stage3_param_persistence_threshold": lambda h: 10 * h,
    }
    for key, size in sizes.items():
        if _is_auto(zero.get(key)):
            if hidden_size:
                zero[key] = size(hidden_size)
            else:
                del zero[key]  # DeepSpeed's default
    left = sorted(_auto_keys(config))
    if left:
        problems.append(f"packtune cannot fill these \"auto\" values: {', '.join(left)}; give numbers")
    if problems:
        raise ValueError("DeepSpeed config: " + "; ".join(problems))
    return config


def run_config(deepspeed_config: str | dict | None, settings: Settings, world_size: int, dtype: torch.dtype,
               hidden_size: int | None) -> dict:
    """The DeepSpeed config of a run: ``--deepspeed`` (default ``deepspeed_zero2``) with every
    ``"auto"`` filled from the settings (``fill_auto``)."""
    return fill_auto(
        resolve_deepspeed_config(deepspeed_config or "deepspeed_zero2"),
        micro_batch=settings.batch_size,
        accumulation=settings.accumulative_counts,
        world_size=world_size,
        max_norm=settings.max_norm,
        dtype=dtype,
        hidden_size=hidden_size,
    )


def _auto_keys(node, prefix: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _auto_keys(value, f"{prefix}{key}.")
    elif _is_auto(node):
        yield prefix.rstrip(".")


def zero_stage(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


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


class DeepSpeedEngine(Engine):
    """``deepspeed.initialize`` with packtune's optimizer and schedule; see the module docs."""

    name = "deepspeed"

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
        written_by = sharded.deepspeed_world_size(resume) if resume and self.stage >= 1 else None
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
        with sharded.atomic_folder(path, self.env) as tmp:
            self.model.save_checkpoint(
                tmp,
                tag=sharded.DEEPSPEED_TAG,
                client_state={"packtune_meta": meta, "packtune_rng": rng},
                exclude_frozen_parameters=not self.full_state,
            )
            if self.env.is_main:
                sharded.write_info(
                    tmp,
                    engine="deepspeed",
                    zero_stage=self.stage,
                    full_state=self.full_state,
                    state_keys=self.state_keys,
                    trainable=self.trainable_names,
                    meta=meta,
                )

    def load(self, path: str) -> dict:
        if not os.path.isdir(path) or sharded.read_info(path).get("engine") != "deepspeed":
            raise not_my_checkpoint(path, "deepspeed")
        tag = sharded.DEEPSPEED_TAG
        if self.universal:
            written_by = sharded.deepspeed_world_size(path)
            log.info("%s was written by %d processes: loading it on %d through DeepSpeed's universal checkpoint",
                     path, written_by, self.world_size)
            try:
                tag = sharded.deepspeed_universal(path, self.env)
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
