"""Answer prompts with a model, greedily, rendered with the training template.

Used for ``evaluation_inputs`` during training, by ``packtune chat``, and by the demo's score.
Generation stops at the tokenizer's EOS or the template's end-of-turn marker. During training
it runs under the training step's autocast (``evaluate``), so that the attention kernels see
the dtype they see in training (fp32 master weights would otherwise reach a half-only kernel).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from packtune.config.settings import Settings
from packtune.data import render_prompt
from packtune.data.templates import get_template, stop_token_ids
from packtune.modeling import autocast_context
from packtune.recipe.model_setup import compute_dtype


@torch.no_grad()
def generate_reply(
    model: torch.nn.Module,
    tokenizer,
    messages: Sequence[dict] | str,
    template: str = "auto",
    max_new_tokens: int = 64,
    system_prompt: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> str:
    """The model's greedy reply to a conversation (or one user message given as a string).

    ``dtype``: autocast to it while generating (fp32: none), as the training step does.
    """
    tpl = get_template(template, tokenizer)
    ids = render_prompt(messages, tokenizer, tpl, system_prompt)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    stops = stop_token_ids(tokenizer, tpl.stop)
    was_training = model.training
    model.eval()
    try:
        with autocast_context(device, dtype):
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops or [0])[0],
                eos_token_id=stops or None,
            )
    finally:
        model.train(was_training)
    new = out[0, input_ids.shape[1] :].tolist()
    cut = next((i for i, t in enumerate(new) if t in stops), len(new))
    text = tokenizer.decode(new[:cut], skip_special_tokens=True)
    for stop in tpl.stop:
        text = text.split(stop)[0] if stop else text
    return text.strip()


def evaluate(model, tokenizer, settings: Settings) -> list[dict]:
    """Replies to every ``evaluation_inputs`` prompt: ``[{"prompt", "answer"}]``, under the
    autocast of the training step (``dtype``)."""
    dtype = compute_dtype(settings.dtype, next(model.parameters()).device)
    return [
        {
            "prompt": prompt,
            "answer": generate_reply(
                model, tokenizer, prompt, settings.prompt_template, settings.max_new_tokens, settings.system_prompt, dtype
            ),
        }
        for prompt in settings.evaluation_inputs
    ]
