"""``packtune convert pth_to_hf | merge``: checkpoints to Hugging Face folders."""

from __future__ import annotations

import argparse
import os

from packtune.cli.errors import CliError
from packtune.config import load_settings

HELP = "Convert a training checkpoint to a Hugging Face folder (pth_to_hf), or merge a LoRA adapter (merge)."
EXAMPLES = """\
packtune convert pth_to_hf tiny_mistral_full_demo work_dirs/demo/iter_200.pth hf_out
packtune convert pth_to_hf ./my_lora_config.py work_dirs/my_lora_config/iter_500.pth adapter_out
packtune convert pth_to_hf ./my_lora_config.py work_dirs/my_lora_config/iter_500.pth merged_out --merge
packtune convert pth_to_hf ./internlm_7b_full_oasst1_e3_copy.py work_dirs/internlm_7b_full_oasst1_e3_copy/iter_500.pth out
packtune convert pth_to_hf ./internlm_7b_full_oasst1_e3_copy.py work_dirs/internlm_7b_full_oasst1_e3_copy/iter_500.pth out --format native
packtune convert merge meta-llama/Llama-2-7b-hf adapter_out merged_out
"""
FORMAT_HELP = ("layout of ported families (InternLM, Baichuan, ChatGLM2/3, Qwen-1): 'original' (their own names, fused "
               "shapes, config and code files; the default) or 'native' (the transformers class); other models have one layout")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=type(parser))
    p = sub.add_parser("pth_to_hf", help="a checkpoint of CONFIG to a Hugging Face folder (or PEFT adapter)")
    p.add_argument("config", metavar="CONFIG", help="the config the checkpoint was trained with (name or path)")
    p.add_argument("pth", metavar="PTH", help="iter_<step>.pth (a file, or a folder written by FSDP2/DeepSpeed)")
    p.add_argument("save_path", metavar="SAVE_PATH", help="output folder")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE", help="the overrides used for training")
    p.add_argument("--fp32", action="store_true", help="save fp32 weights (default: the training dtype)")
    p.add_argument("--max-shard-size", default="2GB", help="largest weight file (default 2GB)")
    p.add_argument("--safe-serialization", action=argparse.BooleanOptionalAction, default=True,
                   help="write .safetensors (default) rather than .bin")
    p.add_argument("--merge", action="store_true", help="LoRA runs: merge the adapter into the base weights")
    p.add_argument("--format", choices=("original", "native"), default=None, help=FORMAT_HELP)
    m = sub.add_parser("merge", help="merge a PEFT adapter folder into its base model")
    m.add_argument("base", metavar="BASE", help="base model folder or hub id")
    m.add_argument("adapter", metavar="ADAPTER", help="PEFT adapter folder")
    m.add_argument("save_path", metavar="SAVE_PATH", help="output folder")
    m.add_argument("--max-shard-size", default="2GB")
    m.add_argument("--safe-serialization", action=argparse.BooleanOptionalAction, default=True)
    m.add_argument("--format", choices=("original", "native"), default=None, help=FORMAT_HELP)


def run(args: argparse.Namespace) -> int:
    if args.action == "pth_to_hf":
        settings = load_settings(args.config, args.cfg_options)
        if not os.path.exists(args.pth):
            raise CliError(f"no checkpoint at {args.pth}")
        from packtune.convert import ADAPTER_NATIVE_ONLY, ported, pth_to_hf

        port = ported(settings)
        if port is not None and settings.lora and not args.merge and args.format is None:
            print(f"note: {ADAPTER_NATIVE_ONLY.format(label=port.label)}")
        try:
            out = pth_to_hf(
                settings,
                args.pth,
                args.save_path,
                fp32=args.fp32,
                max_shard_size=args.max_shard_size,
                safe_serialization=args.safe_serialization,
                merge=args.merge,
                format=args.format,
            )
        except (ValueError, OSError) as exc:  # a mismatched checkpoint, a base model that cannot be loaded
            raise CliError(str(exc)) from exc
    else:
        if not os.path.isdir(args.adapter):
            raise CliError(f"no adapter folder at {args.adapter}")
        from packtune.convert import merge_adapter

        try:
            out = merge_adapter(args.base, args.adapter, args.save_path, max_shard_size=args.max_shard_size,
                                safe_serialization=args.safe_serialization, format=args.format)
        except (ValueError, OSError) as exc:  # a base that cannot be loaded or ported
            raise CliError(str(exc).splitlines()[0]) from exc
    print(f"saved {out}")
    return 0
