"""``packtune train CONFIG``: fine-tune as the config says (one process, torchrun, slurm, DeepSpeed)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from packtune.cli import add_config_arguments
from packtune.cli.errors import CliError
from packtune.config import load_settings

HELP = "Train a config: packed rows, varlen attention, checkpoints in the work dir."
EXAMPLES = """\
packtune train tiny_mistral_full_demo --work-dir work_dirs/demo
packtune train ./my_config.py --cfg-options lr=1e-4 max_steps=100
packtune train ./my_config.py --resume auto          # continue from work_dir/last_checkpoint
NPROC_PER_NODE=8 packtune train ./my_config.py --deepspeed deepspeed_zero2
NPROC_PER_NODE=8 packtune train ./my_config.py --cfg-options sequence_parallel_size=4   # 2 x 4: long rows
srun -N2 --ntasks-per-node=8 packtune train ./my_config.py --launcher slurm --deepspeed deepspeed_zero3
torchrun --nproc_per_node=2 -m packtune train ./my_config.py --launcher pytorch --fsdp
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--work-dir", default=None, help="where checkpoints and logs go (default: ./work_dirs/<config name>/)")
    parser.add_argument("--deepspeed", default=None, metavar="NAME_OR_JSON",
                        help="a built-in DeepSpeed config (deepspeed_zero1, deepspeed_zero2, deepspeed_zero3, "
                             "deepspeed_zero2_offload, deepspeed_zero3_offload) or a path to a JSON file")
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (torch.distributed.fsdp.fully_shard)")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm"], default="none",
                        help="how the processes were started (set NPROC_PER_NODE=N to start N under torchrun)")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="'auto': continue from the work dir's last checkpoint; or a checkpoint path")
    parser.add_argument("--seed", type=int, default=None, help="overrides the config's seed")


def _work_dir(args: argparse.Namespace) -> str:
    if args.work_dir:
        return args.work_dir
    return os.path.join("work_dirs", Path(args.config).stem)


def _check_world(sequence_parallel_size: int) -> None:
    """Before starting ``NPROC_PER_NODE`` x ``NNODES`` processes: can they be split?"""
    from packtune.config.sizes import world_problem

    try:
        world = int(os.environ["NPROC_PER_NODE"]) * int(os.environ.get("NNODES", "1"))
    except ValueError:
        return  # torchrun's own spellings ("gpu", "auto", "1:2"): each rank checks at setup
    problem = world_problem(sequence_parallel_size, world)
    if problem:
        raise CliError(f"{problem} (NPROC_PER_NODE x NNODES)")


def run(args: argparse.Namespace) -> int:
    # Validation first: a config error never waits for torch, a model or the data.
    overrides = list(args.cfg_options) + ([f"seed={args.seed}"] if args.seed is not None else [])
    settings = load_settings(args.config, overrides)
    from packtune.distributed import run_under_torchrun, torchrun_args

    if args.launcher == "none" and torchrun_args(args.argv):
        _check_world(settings.sequence_parallel_size)
        # NPROC_PER_NODE: this process becomes torchrun's agent and ends with the failing
        # rank's one-line error (exit 2 for a config/data/setup error, 1 otherwise).
        return run_under_torchrun(args.argv, "packtune train")
    if args.deepspeed:
        from packtune.recipe.engines.deepspeed_config import resolve_deepspeed_config

        try:
            resolve_deepspeed_config(args.deepspeed)
        except (FileNotFoundError, ImportError, ValueError) as exc:
            raise CliError(str(exc)) from exc
    from packtune.data import DataError
    from packtune.modeling import LeakError
    from packtune.errors import SetupError
    from packtune.recipe.engines.base import CheckpointMismatch
    from packtune.recipe.train import RunOptions, train

    config_path = args.config if os.path.isfile(args.config) else None
    opts = RunOptions(
        work_dir=_work_dir(args),
        launcher=args.launcher,
        resume=args.resume,
        deepspeed=args.deepspeed,
        fsdp=args.fsdp,
        config_path=config_path,
    )
    try:
        summary = train(settings, opts)
    except (SetupError, LeakError, DataError, CheckpointMismatch, FileNotFoundError) as exc:
        raise CliError(str(exc)) from exc
    if summary.get("checkpoint") and os.environ.get("RANK", "0") == "0":  # once, not per rank
        print(f"checkpoint: {summary['checkpoint']}")
    if args.launcher != "none":
        # A finished worker leaves without the interpreter's teardown, where threads torch
        # keeps past destroy_process_group can abort it (see packtune.distributed.exit_process).
        from packtune.distributed import exit_process

        exit_process(0)
    return 0
