"""The training recipe as named steps: ``_setup``, ``_loop``, ``_finish`` (save), and ``train``'s cleanup.

Everything a step needs is explicit: the packs of the step come from ``StepPlan``, their
document boundaries travel in the ``Batch`` to the model, the loss is normalised by the
global batch (``accumulate_gradients``), and the engine (one process, DDP, FSDP2, DeepSpeed)
only decides how gradients are synchronised and weights updated.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import glob
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from packtune import __version__
from packtune.config import settings_to_dict
from packtune.config.settings import Settings
from packtune.data import DataError, DataOptions, load_tokenizer
from packtune.distributed import DistEnv, cleanup, init_distributed, on_main_rank
from packtune.packing.collate import collate_padded, collate_varlen
from packtune.parallel.groups import SequenceParallel, SequenceParallelError, init_sequence_parallel
from packtune.parallel.limits import check_splittable
from packtune.recipe import checkpoint as ckpt
from packtune.recipe.step_plan import StepPlan, data_parallel_size, empty_pack, keep_global_batch, processes
from packtune.recipe.engines import ENGINES, engine_kind, model_construction
from packtune.recipe.engines.base import CheckpointMismatch
from packtune.recipe.evaluate import evaluate
from packtune.recipe.metrics import MetricsLogger
from packtune.errors import SetupError
from packtune.recipe.model_setup import build_model, compute_dtype, model_source
from packtune.recipe.step import accumulate_gradients

log = logging.getLogger("packtune")


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm of a step is NaN or infinite (``on_nonfinite_loss="error"``)."""


@dataclass
class RunOptions:
    """How to run, as opposed to what to train (the settings)."""

    work_dir: str
    launcher: str = "none"
    resume: str | None = None  # "auto", a checkpoint path, or None
    deepspeed: str | None = None  # a built-in name or a JSON path
    fsdp: bool = False
    config_path: str | None = None  # copied into the work dir for the record


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _setup_logging(env: DistEnv) -> None:
    level = logging.INFO if env.is_main else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s packtune %(message)s", datefmt="%H:%M:%S")
    log.setLevel(level)


def _resume_path(opts: RunOptions) -> str | None:
    if not opts.resume:
        return None
    if opts.resume == "auto":
        path = ckpt.find_last(opts.work_dir)
        if path is None:
            log.info("--resume auto: no checkpoint in %s, starting from scratch", opts.work_dir)
        return path
    if not os.path.exists(opts.resume):
        raise FileNotFoundError(f"--resume {opts.resume}: no such checkpoint")
    return opts.resume


def _keep_global_batch(settings: Settings, meta: dict, path: str, dp_size: int):
    """``settings`` with the accumulation that keeps the checkpoint's global batch on this many
    data-parallel ranks (``keep_global_batch``; the processes, or the sequence-parallel groups
    under ``sequence_parallel_size``); a run that cannot keep it stops in one line."""
    try:
        accumulation = keep_global_batch(meta, settings.batch_size, settings.accumulative_counts, dp_size, path)
    except ValueError as exc:
        raise CheckpointMismatch(str(exc)) from None
    if accumulation == settings.accumulative_counts:
        return settings
    log.info("resuming on %s a run trained on %s: accumulative_counts %d instead of %d keeps its %d packs per step",
             processes(dp_size), processes(data_parallel_size(meta)), accumulation, settings.accumulative_counts,
             meta["global_packs"])
    return dataclasses.replace(settings, accumulative_counts=accumulation)


def _collate(dataset, pack_ids: list[int], settings: Settings, pad_id: int):
    packs = [dataset[i] for i in pack_ids] or [empty_pack(pad_id)]
    if settings.method != "sft":  # preference pairs: packed varlen rows (the config check insists)
        return _collate_packs(packs, settings, pad_id)
    if not settings.use_varlen_attn:
        return collate_padded(packs, pad_token_id=pad_id)
    # Sequence parallelism cuts the row into equal shards: pad it with a document of its own.
    sp = settings.sequence_parallel_size
    return collate_varlen(packs, pad_to_multiple_of=sp if sp > 1 else None, pad_token_id=pad_id)


def _collate_packs(packs: list[dict], settings: Settings, pad_id: int):
    """Packs of preference pairs as one row (``collate_pairs``), padded for sequence parallelism."""
    from packtune.preference.step import collate_pairs

    sp = settings.sequence_parallel_size
    return collate_pairs(packs, pad_to_multiple_of=sp if sp > 1 else None, pad_token_id=pad_id)


def _prepare_data(settings: Settings, tokenizer, env: DistEnv):
    """Tokenize and pack on the main rank first, so the others read its cache.

    A failure there (a bad row, a missing file) is raised on every rank (``on_main_rank``), so
    all end with the same line and exit code; under slurm, where no launcher picks the first
    error, each task's last line is then the cause, not a peer's broken connection.
    """
    options = DataOptions.from_settings(settings)
    from packtune.preference.data import dataset_builder

    build = dataset_builder(settings.method)
    dataset = on_main_rank(env, lambda: build(options, tokenizer), shared=(DataError,))
    return dataset if env.is_main else build(options, tokenizer)


def _sequence_parallel(settings: Settings, env: DistEnv) -> SequenceParallel | None:
    """The ``(dp, sp)`` grid for ``sequence_parallel_size`` (None when it is 1); a world it
    cannot split is a one-line ``SetupError`` naming the sizes that work."""
    try:
        sp = init_sequence_parallel(settings.sequence_parallel_size, env.rank, env.world_size, env.device.type)
    except SequenceParallelError as exc:
        raise SetupError(str(exc)) from exc
    if sp:
        log.info("sequence parallel: %d data-parallel groups x %d ranks (Ulysses)", sp.dp_size, sp.size)
    return sp


def _check_splittable(settings: Settings, env: DistEnv, model) -> None:
    """A model sequence parallelism cannot split is a one-line ``SetupError``."""
    try:
        check_splittable(model, settings.sequence_parallel_size, env.world_size)
    except SequenceParallelError as exc:
        raise SetupError(str(exc)) from exc


def _save(engine, opts: RunOptions, settings: Settings, step: int, plan: StepPlan, env: DistEnv) -> str:
    path = ckpt.checkpoint_path(opts.work_dir, step)
    meta = {
        "step": step,
        "total_steps": plan.total_steps,
        "world_size": env.world_size,
        "data_parallel_size": plan.world_size,
        "global_packs": plan.global_packs,
        **plan.position(step),
        "settings": settings_to_dict(settings),
        "packtune_version": __version__,
    }
    engine.save(path, meta)
    if env.is_main:
        ckpt.mark_last(opts.work_dir, path)
        ckpt.rotate(opts.work_dir, settings.save_total_limit)
    log.info("saved %s", path)
    return path


def _evaluate(engine, tokenizer, settings: Settings, metrics: MetricsLogger, step: int, env: DistEnv) -> None:
    if not settings.evaluation_inputs:
        return
    answers = evaluate(engine.unwrapped(), tokenizer, settings)
    if env.is_main:
        with open(os.path.join(metrics.work_dir, "eval.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "answers": answers}) + "\n")
        for item in answers:
            log.info("eval step %d | %s -> %s", step, item["prompt"], item["answer"])
            metrics.text("eval", f"**{item['prompt']}**\n\n{item['answer']}", step)


def train(settings: Settings, opts: RunOptions) -> dict:
    """Train ``settings`` as ``opts`` says; returns a summary (steps, last loss, checkpoint).

    An error on one rank is logged with that rank's number, and the rank leaves the process
    group without waiting for the others (which may be inside a collective it will never
    join): torchrun then stops them, and a job ends with that rank's error instead of hanging.
    """
    env = init_distributed(opts.launcher)
    try:
        with contextlib.ExitStack() as resources:
            summary = _train(settings, opts, env, resources)
    except BaseException as exc:
        if env.distributed:
            log.error("rank %d of %d failed: %s: %s", env.rank, env.world_size, type(exc).__name__, exc)
        cleanup(ok=False)
        raise
    cleanup()
    return summary


#: Debug aid: ``PACKTUNE_DEBUG_RAISE=RANK:STEP`` makes rank RANK raise ``InjectedFault`` when it
#: starts global step STEP (1-based), to rehearse how a job and its cluster handle a failing rank.
DEBUG_RAISE_ENV = "PACKTUNE_DEBUG_RAISE"


class InjectedFault(RuntimeError):
    """The failure asked for by ``PACKTUNE_DEBUG_RAISE``."""


def _injected_fault(env: DistEnv) -> int | None:
    """The step at which this rank must raise (``PACKTUNE_DEBUG_RAISE``), or None."""
    spec = os.environ.get(DEBUG_RAISE_ENV)
    if not spec:
        return None
    try:
        rank, step = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"{DEBUG_RAISE_ENV}={spec!r}: expected RANK:STEP, e.g. 1:2") from None
    return step if rank == env.rank else None


@dataclass
class Run:
    """What the steps of a run share, made once by ``_setup`` before the first step."""

    settings: Settings  # as resumed: the accumulation may keep a checkpoint's global batch
    opts: RunOptions
    env: DistEnv
    tokenizer: Any
    pad_id: int
    dataset: Any  # a PackedDataset, or a PairDataset for the preference methods
    dtype: torch.dtype
    kind: str  # the engine's name in ENGINES
    sp: SequenceParallel | None
    dp_rank: int  # this rank's data-parallel slot (its sequence-parallel group's, under sp)
    plan: StepPlan
    engine: Any
    start: int  # the first step to train (0, or the resumed checkpoint's)
    metrics: MetricsLogger
    objective: Any = None  # the preference objective; None for SFT
    reference: Any = None  # the preference reference model, when computed during training


def _train(settings: Settings, opts: RunOptions, env: DistEnv, resources: contextlib.ExitStack) -> dict:
    """The recipe: set up, train every step, save and evaluate the last (``train`` cleans up)."""
    run = _setup(settings, opts, env, resources)
    result, last_saved = _loop(run)
    return _finish(run, result, last_saved)


# --- setup ------------------------------------------------------------------------------------


def _setup(settings: Settings, opts: RunOptions, env: DistEnv, resources: contextlib.ExitStack) -> Run:
    """Everything before the first step, in the order the random state and the log expect:
    data, model, plan, engine, resumed position, preference reference."""
    _setup_logging(env)
    _setup_work_dir(opts, env)
    seed_everything(settings.seed)
    tokenizer, pad_id, dataset = _setup_data(settings, env)
    dtype = compute_dtype(settings.dtype, env.device)
    kind = engine_kind(env, opts.deepspeed, opts.fsdp)
    sp = _sequence_parallel(settings, env)  # before the model: a world it cannot split fails fast
    # The ranks of a sequence-parallel group share their packs: data parallelism is over groups.
    dp_size, dp_rank = (sp.dp_size, sp.dp_rank) if sp else (env.world_size, env.rank)
    resume = _resume_path(opts)
    if resume:
        settings = _keep_global_batch(settings, ckpt.read_meta(resume), resume, dp_size)
    log.info("model: %s, compute %s, varlen %s, on %s x%d", model_source(settings), dtype, settings.use_varlen_attn, env.device.type, env.world_size)
    # The engine's construction says how the model is built and where its leak check runs.
    construction = resources.enter_context(model_construction(kind, settings, env, dtype, opts.deepspeed))
    model, frozen = _setup_model(settings, env, dtype, construction)
    plan = StepPlan(
        dataset,
        settings.batch_size,
        settings.accumulative_counts,
        dp_size,
        settings.max_epochs,
        settings.max_steps,
        balance=settings.balance_attention,
    )
    engine = ENGINES[kind].create(model, env, settings, plan.total_steps, dtype, construction, resume=resume)
    construction.ready(engine, settings, env, dtype)
    start = _setup_start(engine, plan, resume, opts, env)
    metrics = MetricsLogger(opts.work_dir, plan.total_steps, start, enabled=env.is_main)
    run = Run(settings, opts, env, tokenizer, pad_id, dataset, dtype, kind, sp, dp_rank, plan, engine, start, metrics)
    if settings.method != "sft":
        _setup_preference(run, frozen)
    log.info("%d packs, %d steps (%d per epoch), %d packs per step, engine %s", len(dataset), plan.total_steps, plan.steps_per_epoch, plan.global_packs, kind)
    return run


def _setup_work_dir(opts: RunOptions, env: DistEnv) -> None:
    """The work dir, with a copy of the config file for the record (main rank)."""
    os.makedirs(opts.work_dir, exist_ok=True)
    if env.is_main and opts.config_path and os.path.isfile(opts.config_path):
        shutil.copy(opts.config_path, os.path.join(opts.work_dir, os.path.basename(opts.config_path)))


def _setup_data(settings: Settings, env: DistEnv) -> tuple[Any, int, Any]:
    """``(tokenizer, pad id, dataset)``; a dataset with no trainable sample stops in one line."""
    tokenizer = load_tokenizer(
        settings.tokenizer_name_or_path or settings.pretrained_model_name_or_path, settings.trust_remote_code
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    dataset = _prepare_data(settings, tokenizer, env)
    if len(dataset) == 0:
        r = dataset.report
        raise DataError(f"the dataset has no trainable samples: {r.samples_read} rows read, skipped {r.skipped or 0}, "
                        f"dropped {r.dropped or 0} (packtune log-dataset CONFIG shows the full report)")
    return tokenizer, pad_id, dataset


def _setup_model(settings: Settings, env: DistEnv, dtype: torch.dtype, construction: Any) -> tuple[Any, Any]:
    """The model built as the engine's ``construction`` says, checked for sequence parallelism,
    and DPO's frozen reference (None when the method has none, or gets it otherwise)."""
    model = build_model(settings, env.device, dtype, base=construction.base, leak_check=construction.check_in_build)
    construction.built(model, settings, env, dtype)
    _check_splittable(settings, env, model)
    # DPO's frozen reference: the starting weights, copied before an engine wraps or shards them.
    frozen = (copy.deepcopy(model) if settings.method == "dpo" and not settings.lora and settings.ref_model is None
              else None)
    return model, frozen


def _setup_start(engine: Any, plan: StepPlan, resume: str | None, opts: RunOptions, env: DistEnv) -> int:
    """The first step: the resumed checkpoint's (its weights and optimizer loaded into
    ``engine``), or 0, with a warning when the work dir holds an earlier run's checkpoints."""
    if resume:
        meta = engine.load(resume)
        try:
            start = plan.resume_step(meta, resume)
        except ValueError as exc:
            raise CheckpointMismatch(str(exc)) from None
        log.info("resumed from %s at step %d (%d packs trained on)", resume, start, plan.packs_consumed(start))
        return start
    earlier = sorted(glob.glob(os.path.join(opts.work_dir, "iter_*.pth")))
    if earlier and env.is_main:
        log.warning(
            "%s already holds checkpoints of an earlier run (%s): starting from scratch beside them "
            "(use --resume auto to continue that run, or another --work-dir)",
            opts.work_dir, ", ".join(os.path.basename(p) for p in earlier[:3]),
        )
    return 0


def _setup_preference(run: Run, frozen: Any) -> None:
    """``run``'s preference objective and, when it needs one, its reference model; with
    ``precompute_ref_log_probs`` the reference's log-probs are stored in the dataset instead."""
    from packtune.preference.model import make_reference, precompute_reference, reference_cache_parts
    from packtune.preference.objective import Objective

    settings = run.settings
    run.objective = Objective.from_settings(settings)
    if not run.objective.needs_reference:
        return
    run.reference = make_reference(settings, run.engine, frozen, run.tokenizer, run.env.device, run.dtype,
                                   build_model, run.sp)
    if settings.precompute_ref_log_probs:
        cached = precompute_reference(run.dataset, run.reference, lambda packs: _collate_packs(packs, settings, run.pad_id),
                                      run.env.device, reference_cache_parts(settings, run.dtype, run.env.device))
        run.reference = None
        log.info("reference log-probs of %d pairs %s", run.dataset.margins.size,
                 "loaded from the data cache" if cached else "precomputed")


# --- loop -------------------------------------------------------------------------------------


def _loop(run: Run) -> tuple[Any, str | None]:
    """Steps ``run.start`` to the end, logging, evaluating and saving on the settings' cadence;
    the last step's result and the last checkpoint saved (None if none)."""
    settings, plan = run.settings, run.plan
    run.engine.model.train()
    last_saved, result, tic, window_tokens = None, None, time.perf_counter(), 0
    fault_step = _injected_fault(run.env)
    for step in range(run.start, plan.total_steps):
        if fault_step == step + 1:
            raise InjectedFault(f"{DEBUG_RAISE_ENV}: rank {run.env.rank} raises at step {step + 1}")
        result, grad_norm = _train_step(run, step)
        done = step + 1
        window_tokens += result.tokens
        run.metrics.advance()
        if done % settings.log_steps == 0 or done == plan.total_steps:
            elapsed = time.perf_counter() - tic
            _log_step(run, done, result, grad_norm, window_tokens / max(elapsed, 1e-9))
            tic, window_tokens = time.perf_counter(), 0
        if settings.evaluation_freq and done % settings.evaluation_freq == 0 and done != plan.total_steps:
            _evaluate(run.engine, run.tokenizer, settings, run.metrics, done, run.env)
        if done % settings.save_steps == 0 and done != plan.total_steps:
            last_saved = _save(run.engine, run.opts, settings, done, plan, run.env)
    return result, last_saved


def _train_step(run: Run, step: int) -> tuple[Any, float]:
    """One optimizer step (0-based ``step``) over this rank's micro-batches: its result and
    gradient norm. A non-finite loss or norm stops the run or skips the step
    (``on_nonfinite_loss``); an fp16 overflow is skipped by the engine's loss scaling."""
    settings, engine = run.settings, run.engine
    slots = run.plan.micro_batches(step, run.dp_rank)
    batches = [_collate(run.dataset, ids, settings, run.pad_id).to(run.env.device) for ids in slots]
    if run.objective is None:
        result = accumulate_gradients(engine, batches, settings.loss_reduction, run.dtype, settings.loss_chunk_size,
                                      sequence_parallel=run.sp)
    else:
        from packtune.preference.step import accumulate_preference

        result = accumulate_preference(engine, batches, run.objective, run.dtype, settings.loss_chunk_size,
                                       sequence_parallel=run.sp, reference=run.reference)
    grad_norm = engine.step() if math.isfinite(result.loss) else float("nan")
    if math.isfinite(result.loss) and not math.isfinite(grad_norm) and engine.loss_scaling:
        # fp16 loss scaling: the engine skipped the overflowing step and lowered the scale.
        log.info("step %d: fp16 gradient overflow, step skipped and loss scale lowered", step + 1)
    elif not (math.isfinite(result.loss) and math.isfinite(grad_norm)):
        what = f"non-finite {'loss' if not math.isfinite(result.loss) else 'gradient norm'} at step {step + 1} (packs {run.plan.step_packs(step)})"
        if settings.on_nonfinite_loss == "error":
            raise NonFiniteLossError(what + "; set on_nonfinite_loss = 'skip' to skip such steps")
        if not math.isfinite(result.loss):
            engine.skip_step()
        log.warning("skipped %s", what)
    return result, grad_norm


def _log_step(run: Run, done: int, result: Any, grad_norm: float, tokens_per_s: float) -> None:
    """The metrics line of step ``done`` (1-based)."""
    run.metrics.log(
        {
            "step": done,
            "epoch": round(run.plan.epoch_progress(done), 4),
            "loss": result.loss,
            "lr": run.engine.lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "tokens": result.tokens,
            "trained_tokens": result.trained_tokens,
            "start_step": run.start,
            **({"pairs": result.pairs, **result.metrics} if run.objective is not None else {}),
        }
    )


# --- save -------------------------------------------------------------------------------------


def _finish(run: Run, result: Any, last_saved: str | None) -> dict:
    """Save the last step (unless the run had nothing left to train), evaluate it, close the
    metrics; the run's summary."""
    plan = run.plan
    if plan.total_steps > run.start:
        last_saved = _save(run.engine, run.opts, run.settings, plan.total_steps, plan, run.env)
    _evaluate(run.engine, run.tokenizer, run.settings, run.metrics, plan.total_steps, run.env)
    curve = run.metrics.close()
    return {
        "steps": plan.total_steps,
        "start_step": run.start,
        "loss": result.loss if result else None,
        "checkpoint": last_saved or ckpt.find_last(run.opts.work_dir),
        "loss_curve": curve,
        "data_report": getattr(run.dataset, "report", None),
    }
