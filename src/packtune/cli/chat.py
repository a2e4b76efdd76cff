"""``packtune chat MODEL``: talk to a converted model, interactively or with one ``--prompt``."""

from __future__ import annotations

import argparse
import os
import sys

from packtune.cli.errors import CliError

HELP = "Chat with a Hugging Face model folder (e.g. the output of convert pth_to_hf)."
EXAMPLES = """\
packtune chat hf_out --prompt "What sound does a cow make?"
packtune chat hf_out --prompt-template mistral --max-new-tokens 128
packtune chat adapter_out            # a PEFT adapter folder loads its base model too
packtune chat internlm/internlm-chat-7b   # ported families (InternLM, Baichuan, ChatGLM2/3, Qwen-1), either layout
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a model folder (or hub id), or a PEFT adapter folder")
    parser.add_argument("--prompt", default=None, help="answer this one prompt and exit")
    parser.add_argument("--prompt-template", default="auto",
                        help="template name (default: the tokenizer's chat template, else 'default')")
    parser.add_argument("--system", default=None, help="a system prompt")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def load_chat_model(path: str, device: str | None = None):
    """``(model, tokenizer)`` from a model folder, hub id, or PEFT adapter folder.

    Models load through ``packtune.load_model`` (so ported families work in either layout),
    with the KV cache that it turns off for training turned back on.
    """
    import json

    import torch

    from packtune.data import load_tokenizer
    from packtune.modeling import model_configs
    from packtune.ports.api import load_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    adapter = os.path.join(path, "adapter_config.json")
    if os.path.exists(adapter):
        from peft import PeftModel

        with open(adapter) as f:
            base = json.load(f)["base_model_name_or_path"]
        model = PeftModel.from_pretrained(load_model(base, dtype="auto"), path)
    else:
        model = load_model(path, dtype="auto")
    for cfg in model_configs(model):
        cfg.use_cache = True
    return model.to(device).eval(), load_tokenizer(path)


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise CliError("--max-new-tokens must be >= 1")
    if not os.path.exists(args.model) and os.sep in args.model:
        raise CliError(f"no model folder at {args.model}")
    from packtune.data import DataError
    from packtune.data.templates import check_template_name
    from packtune.ports.layout import PortError
    from packtune.recipe.evaluate import generate_reply

    if args.prompt_template != "auto":
        try:
            check_template_name(args.prompt_template)
        except ValueError as exc:
            raise CliError(str(exc)) from exc
    try:
        model, tokenizer = load_chat_model(args.model, args.device)
    except OSError as exc:
        raise CliError(f"cannot load {args.model}: {str(exc).splitlines()[0]}") from exc
    except PortError as exc:  # ChatGLM-6B v1, a config that fits no known model
        raise CliError(str(exc)) from exc
    except DataError as exc:  # the model loaded, its tokenizer did not
        raise CliError(str(exc)) from exc
    history = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        print(generate_reply(model, tokenizer, history + [{"role": "user", "content": args.prompt}],
                             args.prompt_template, args.max_new_tokens))
        return 0
    print("packtune chat: type a message, 'clear' to forget the conversation, 'exit' or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            text = input("user> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if text.strip() in ("exit", "quit"):
            return 0
        if text.strip() == "clear":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": text})
        reply = generate_reply(model, tokenizer, history, args.prompt_template, args.max_new_tokens)
        history.append({"role": "assistant", "content": reply})
        print(f"assistant> {reply}")
