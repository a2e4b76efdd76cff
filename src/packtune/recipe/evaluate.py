"""Answer prompts with a model, greedily, rendered with the training template.

Used for ``evaluation_inputs`` during training, by ``packtune chat``, and by the demo's score.
Generation stops at the tokenizer's EOS or the template's end-of-turn marker.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from packtune.data import render_prompt
from packtune.data.templates import get_template


def _stop_ids(tokenizer, stops: Sequence[str]) -> list[int]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text in stops:
        enc = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(enc) == 1:
            ids.append(enc[0])
    return sorted(set(ids))


@torch.no_grad()
def generate_reply(
    model: torch.nn.Module,
    tokenizer,
    messages: Sequence[dict] | str,
    template: str = "auto",
    max_new_tokens: int = 64,
    system_prompt: str | None = None,
) -> str:
    """The model's greedy reply to a conversation (or one user message given as a string)."""
    tpl = get_template(template, tokenizer)
    ids = render_prompt(messages, tokenizer, tpl, system_prompt)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    stops = _stop_ids(tokenizer, tpl.stop)
    was_training = model.training
    model.eval()
    try:
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


def evaluate(model, tokenizer, settings) -> list[dict]:
    """Replies to every ``evaluation_inputs`` prompt: ``[{"prompt", "answer"}]``."""
    return [
        {
            "prompt": prompt,
            "answer": generate_reply(model, tokenizer, prompt, settings.prompt_template, settings.max_new_tokens, settings.system_prompt),
        }
        for prompt in settings.evaluation_inputs
    ]
