"""FSDP2 (``torch.distributed.fsdp.fully_shard``) behind the engine interface.

Each decoder layer is sharded on its own, then the input embeddings and the output head (when
their weights are not tied), then the root (the rest; the transformers model, also under a PEFT
wrapper):
parameters become ``DTensor`` shards over a 1-D device mesh of all ranks (CUDA with NCCL, or
the CPU with gloo), gathered for a layer's forward and backward and resharded after. The
layers are found generically: the modules whose class is named in the transformers model's
``_no_split_modules``, or else the children of the largest ``nn.ModuleList``.

Gradients are reduce-scattered (averaged over ranks, as the recipe's loss scaling expects)
only on the last micro-batch of a step (``set_requires_gradient_sync``). Clipping uses the
recipe's own norm (``base.grad_norm``: each rank's shards in fp32 chunks, the squares
summed in fp64 and all-reduced), so it reports the norm one process reports. With a half
compute dtype, parameters are gathered in that dtype and gradients reduced in fp32
(``MixedPrecisionPolicy``); the sharded master weights stay fp32. fp16 on CUDA also scales the
loss (``torch.amp.GradScaler``, which handles DTensor gradients), as one process does.

Checkpoints are folders written with ``torch.distributed.checkpoint`` (each rank its shards):
``model/`` (``get_model_state_dict``; only the trainable tensors for LoRA on a downloaded
base), ``optim/`` (``get_optimizer_state_dict``), ``extra.pt`` (schedule, RNG states, meta).
``FSDPEngine.read_folder`` reads ``model/`` back in one process (``read_dcp``).

Construction (``FSDPEngine.construction``): a checkpoint each rank can read its own part of
(``construction.stream_source``) is streamed into the shards: the model is built as a
``skeleton`` and ``fully_shard`` writes only each rank's shards, which ``StreamedWeights``
then fills; the varlen leak check runs through the engine's forward, once the shards hold the
weights (``StreamedConstruction.ready``). Any other model is built whole on every rank and
checked in ``build_model``.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from packtune.config.settings import Settings
from packtune.distributed import DistEnv
from packtune.modeling import check_no_leak, transformers_model
from packtune.recipe import checkpoint as ckpt
from packtune.recipe.checkpoint_folders import atomic_folder, select_state, write_info
from packtune.recipe.engines.base import BaseEngine, build_optimizer, grad_scaler, lr_lambda, not_my_checkpoint
from packtune.recipe.engines.construction import (
    Construction,
    StreamedWeights,
    hf_config,
    ported_hub_folder,
    sharded_construction,
    skeleton,
    stream_source,
)
from packtune.recipe.model_setup import base_dtype

log = logging.getLogger("packtune")

#: The parts of an FSDP2 checkpoint folder: DCP shards of the model and optimizer, the rest.
FSDP_MODEL = "model"
FSDP_OPTIM = "optim"
FSDP_EXTRA = "extra.pt"


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of ``model`` (PEFT-wrapped or not), in order."""
    names = set(getattr(transformers_model(model), "_no_split_modules", None) or [])
    if names:
        layers = [m for m in model.modules() if type(m).__name__ in names]
        if layers:
            return layers
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        return []
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


def embedding_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The input embeddings and the output head of a transformers model, when they are two
    modules with weights of their own (tied weights must stay in one FSDP unit)."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    inp, out = (get_in() if get_in else None), (get_out() if get_out else None)
    if inp is None or out is None or getattr(inp, "weight", None) is None or getattr(out, "weight", None) is None:
        return []
    if inp.weight is out.weight:
        return []
    return [inp, out]


class FSDPEngine(BaseEngine):
    """FSDP2 over all ranks; see the module docs."""

    name = "fsdp"

    @classmethod
    def construction(cls, settings: Settings, env: DistEnv, dtype: torch.dtype, deepspeed: str | dict | None = None):
        """``StreamedConstruction`` when each rank can read its shards, else the whole model."""
        return sharded_construction(lambda: _construction(settings, env, dtype))

    @classmethod
    def create(cls, model, env: DistEnv, settings: Settings, total_steps: int, compute_dtype: torch.dtype,
               construction: Construction, resume: str | None = None) -> FSDPEngine:
        return cls(model, env, settings, total_steps, compute_dtype, weights=getattr(construction, "weights", None))

    @staticmethod
    def read_folder(folder: str, info: dict) -> dict | None:
        """The model state of an FSDP2 checkpoint folder, or of a bare DCP folder of a model
        state dict (``None``: neither)."""
        engine = info.get("engine")
        if engine == "fsdp" or (engine is None and os.path.isfile(os.path.join(folder, FSDP_MODEL, ".metadata"))):
            return select_state(read_dcp(os.path.join(folder, FSDP_MODEL)), info)
        if engine is None and os.path.isfile(os.path.join(folder, ".metadata")):
            return select_state(read_dcp(folder), info)
        return None

    @property
    def loss_scaling(self) -> bool:
        return self.scaler is not None

    def __init__(self, model, env: DistEnv, settings: Settings, total_steps: int, compute_dtype: torch.dtype, weights=None):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from packtune.distributed import ensure_process_group

        ensure_process_group(env)  # one process: a group of one
        self.env = env
        self.settings = settings
        self.max_norm = float(settings.max_norm)
        self.full_state = ckpt.needs_full_state(settings)
        self.mesh = init_device_mesh(env.device.type, (env.world_size,))
        mp = MixedPrecisionPolicy()
        if compute_dtype != torch.float32:
            mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        self.state_keys = list(model.state_dict().keys())
        self.trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
        for layer in reversed(decoder_layers(model)):  # an inner block before one holding it
            fully_shard(layer, mesh=self.mesh, mp_policy=mp)
        # The root is the transformers model even under PEFT: ``generate`` (evaluation) calls
        # it directly, so its hooks must sit there.
        self.root = transformers_model(model)
        for part in embedding_units(self.root):
            # Units of their own: gathered only while they compute. Left in the root, the
            # vocabulary-sized embeddings and head would stay gathered through a whole forward.
            fully_shard(part, mesh=self.mesh, mp_policy=mp)
        fully_shard(self.root, mesh=self.mesh, mp_policy=mp)
        if weights is not None:
            # Built from placeholders (``StreamedConstruction``): each rank's shards get the checkpoint's
            # values before the optimizer sees them.
            weights.load_into(env)
        self.model = model
        self.optimizer = build_optimizer(model, settings.lr, settings.betas, settings.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(total_steps, settings.warmup_ratio))
        self.scaler = grad_scaler(compute_dtype, env.device)

    @contextlib.contextmanager
    def accumulate(self, last: bool):
        self.root.set_requires_gradient_sync(last)
        try:
            yield
        finally:
            self.root.set_requires_gradient_sync(True)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> float:
        """Clip (global norm over every shard), update, schedule, clear; returns the norm."""
        return self.clip_and_update(self.max_norm, self.env.device)

    # --- checkpoints ----------------------------------------------------------------------

    def _options(self, loading: bool = False):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # Only the trainable tensors (LoRA on a downloaded base): loading leaves the frozen
        # base as it was loaded; dcp.load already fails on a tensor the checkpoint lacks.
        return StateDictOptions(ignore_frozen_params=not self.full_state, strict=self.full_state or not loading)

    def save(self, path: str, meta: dict) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        rng = ckpt.gather_rng_states(self.env)
        model_state = get_model_state_dict(self.model, options=self._options())
        optim_state = get_optimizer_state_dict(self.model, self.optimizer, options=self._options())
        with atomic_folder(path, self.env) as tmp:
            dcp.save(model_state, checkpoint_id=os.path.join(tmp, FSDP_MODEL))
            dcp.save(optim_state, checkpoint_id=os.path.join(tmp, FSDP_OPTIM))
            if self.env.is_main:
                extra = {"scheduler": self.scheduler.state_dict(), "rng": rng, "meta": meta,
                         "scaler": self.scaler.state_dict() if self.scaler else None}
                ckpt.atomic_torch_save(extra, os.path.join(tmp, FSDP_EXTRA))
                write_info(
                    tmp,
                    engine="fsdp",
                    full_state=self.full_state,
                    state_keys=self.state_keys,
                    trainable=self.trainable_names,
                    meta=meta,
                )

    def load(self, path: str) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if not os.path.isdir(path) or ckpt.read_info(path).get("engine") != "fsdp":
            raise not_my_checkpoint(path, "fsdp")
        model_state = get_model_state_dict(self.model, options=self._options())
        dcp.load(model_state, checkpoint_id=os.path.join(path, FSDP_MODEL))
        set_model_state_dict(self.model, model_state, options=self._options(loading=True))
        optim_state = get_optimizer_state_dict(self.model, self.optimizer, options=self._options())
        dcp.load(optim_state, checkpoint_id=os.path.join(path, FSDP_OPTIM))
        set_optimizer_state_dict(self.model, self.optimizer, optim_state, options=self._options())
        extra = torch.load(os.path.join(path, FSDP_EXTRA), map_location="cpu", weights_only=False)
        self.scheduler.load_state_dict(extra["scheduler"])
        if self.scaler and extra.get("scaler"):
            self.scaler.load_state_dict(extra["scaler"])
        ckpt.restore_rng_states(extra["rng"], self.env)
        return extra["meta"]


# --- construction ---------------------------------------------------------------------------


class StreamedConstruction(Construction):
    """A skeleton whose shards the engine fills from the checkpoint (``weights``), leak-checked
    through the engine's forward once they hold the weights."""

    how = "fsdp_stream"
    check_in_build = False

    def __init__(self, base: torch.nn.Module, weights: StreamedWeights):
        super().__init__(base)
        self.weights = weights

    def ready(self, engine, settings: Settings, env: DistEnv, dtype: torch.dtype) -> None:
        super().ready(engine, settings, env, dtype)
        if settings.use_varlen_attn:
            # The engine's forward gathers the sharded parameters.
            check_no_leak(engine.unwrapped(), dtype=dtype, max_length=settings.max_length)


def _construction(settings: Settings, env: DistEnv, dtype: torch.dtype) -> Construction:
    folder = ported_hub_folder(settings, env)
    config = hf_config(settings, folder)
    sources = stream_source(settings, env, "FSDP2", "every rank builds the whole model before sharding", config, folder)
    if sources is None:
        return Construction()
    base = skeleton(config, base_dtype(settings, dtype))
    log.info("FSDP2: the model is built on the meta device; each rank reads its shards of %s",
             settings.pretrained_model_name_or_path)
    return StreamedConstruction(base, StreamedWeights(base, sources))


# --- reading checkpoint folders ----------------------------------------------------------------


def read_dcp(folder: str) -> dict:
    """Every tensor of a ``torch.distributed.checkpoint`` folder, in one process, as a flat dict."""
    import warnings

    try:
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            return _load_state_dict_from_keys(checkpoint_id=folder)
    except ImportError:  # an older or newer torch without the helper: go through a torch.save file
        import tempfile

        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "state.pt")
            dcp_to_torch_save(folder, out)
            return torch.load(out, map_location="cpu", weights_only=False)
