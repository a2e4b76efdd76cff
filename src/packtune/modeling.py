"""Make a transformers model safe for packed rows, and prove it before training starts.

``enable_varlen`` switches a model to the ``"packtune_varlen"`` attention, gives every layer with
state its varlen form, and turns the KV cache off for training. ``check_no_leak`` then proves the
result: one packed row of documents longer than any window, chunk, sparse block, convolution or
scan chunk of the model's config, the later ones at large offsets, against each document run
alone, comparing the logits and the gradient of every trainable parameter. Any layer that lets
the tokens of one sample reach another shows up as a difference, and training is refused
(``LeakError``) rather than silently wrong.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import re

import torch

from packtune.attention.hf import (
    ATTN_IMPLEMENTATION,
    BACKEND_ATTR,
    attach_boundaries,
    text_config,
)
from packtune.attention.varlen import BACKENDS
from packtune.layers import install_varlen_layers


#: Where ``enable_varlen`` keeps the attention implementation the model had (on the model instance,
#: never in its config, which would be saved with the checkpoint).
REFERENCE_ATTR = "_packtune_reference_attn"


class LeakError(RuntimeError):
    """Tokens of one packed sample influence another: the model does not honour boundaries."""


def model_configs(model: torch.nn.Module) -> list:
    """The model's config and its text config, each once (they are often the same object)."""
    return list({id(c): c for c in (model.config, text_config(model))}.values())


def transformers_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under PEFT and engine (DDP, DeepSpeed) wrappers."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


def autocast_context(device: torch.device, dtype: torch.dtype):
    """Autocast to ``dtype`` on ``device``, or nothing for fp32 (the training step's context)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def enable_varlen(model: torch.nn.Module, backend: str = "auto") -> torch.nn.Module:
    """Route every attention layer of ``model`` through ``varlen_attn_func``; cache off.

    Also installs ``attach_boundaries`` on the model's backbone, so a packed row given by
    ``position_ids`` alone is exact on every family, and gives every layer with state (scans,
    causal convolutions) its varlen form from ``packtune.layers.VARLEN_LAYERS``. Raises
    ``ValueError`` when the model cannot switch attention implementation (remote code that does
    not use transformers' ``AttentionInterface``), and ``StatefulLayerError`` (a ``ValueError``)
    naming any layer with state that packtune has no varlen form of.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attn_backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    install_varlen_layers(model)
    current = getattr(model.config, "_attn_implementation", None)
    hf_model = transformers_model(model)
    if current != ATTN_IMPLEMENTATION and not hasattr(hf_model, REFERENCE_ATTR):
        setattr(hf_model, REFERENCE_ATTR, current)  # what check_no_leak runs each document alone with
    if current != ATTN_IMPLEMENTATION:
        try:
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
        except (ValueError, AttributeError, KeyError) as exc:
            raise ValueError(
                f"{type(model).__name__} cannot use packtune's varlen attention ({exc}); "
                "set use_varlen_attn = False and pack_to_max_length = False"
            ) from exc
    for cfg in model_configs(model):
        setattr(cfg, BACKEND_ATTR, backend)
        cfg.use_cache = False
    # The transformers backbone, under any PEFT wrapper: a PeftModel made without a task type
    # calls the LM directly, past its LoraModel, so a hook there would never run.
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(inner, "base_model", None) or inner
    if not getattr(backbone, "_packtune_boundaries", False):
        backbone.register_forward_pre_hook(attach_boundaries, with_kwargs=True)
        backbone._packtune_boundaries = True
    return model


#: Config settings that bound how far a layer reaches back (attention windows and chunks, sparse
#: blocks and top-k, convolution kernels, scan chunks): the leak check's documents are longer than
#: the largest of them, so that every such boundary falls inside a document.
_REACH = re.compile(r"window|chunk|topk|top_k|block|kernel|conv|cache")
#: Names that match ``_REACH`` but count layers, heads, experts or channels, not tokens.
_NOT_REACH = re.compile(r"^(num|n)_|layers|heads|experts|_per_|ratio|hidden|dim$|stride")
#: The shortest span the check's long documents exceed: scans whose chunk is fixed in code rather
#: than in the config (transformers' torch Gated DeltaNet and KDA chunk by 64 tokens).
MIN_REACH = 64
#: Random projections of each parameter's gradient compared between the packed row and its
#: documents alone (a differing gradient shows in all of them, each with its full size).
_PROJECTIONS = 3
_BLOCK = 1 << 20
#: Relative tolerance of the leak check: fp32 differs only by summation order; bf16/fp16 (weights
#: or autocast) round every matmul to 8 (11) significant bits, which over a deep model's two
#: different kernels (packed vs alone) reaches a few percent of the largest logit.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}
#: The same for gradients. In fp32 a gradient sums every token's contribution through the whole
#: backward, and transformers' own torch scans round more than that: the gradient of Gated
#: DeltaNet's decay (``A_log``, a few elements whose per-token terms nearly cancel) from
#: transformers' fp32 chunked scan, each document alone, is 1e-5 to 2.3e-5 from packtune's scan
#: run in fp64 (itself equal to a fp64 recurrence to 1e-9). A leak is orders of magnitude larger.
GRAD_TOLERANCE = {**TOLERANCE, torch.float32: 5e-5}


def reach(model: torch.nn.Module) -> int:
    """The longest span any layer of ``model`` sees at once, read from its text config: the
    largest window, attention chunk, sparse block or top-k, convolution kernel or scan chunk
    (at least ``MIN_REACH``)."""
    found = [MIN_REACH]
    for cfg in model_configs(model):
        for name, value in vars(cfg).items():
            if not _REACH.search(name) or _NOT_REACH.search(name):
                continue
            values = value if isinstance(value, (list, tuple)) else [value]
            found += [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    return max(found)


def leak_check_lengths(model: torch.nn.Module, max_length: int | None = None) -> tuple[int, ...]:
    """The documents of the leak check's packed row: a long first one (so the others start at a
    large offset), a short one, and another long one, the long ones longer than ``reach(model)``.

    ``max_length``: the training row length; no document of training is longer, so a window or
    chunk beyond it can never cut one, and the row is kept within it (and within the model's
    position embeddings).
    """
    span = reach(model)
    limits = [getattr(cfg, "max_position_embeddings", None) for cfg in model_configs(model)]
    limits = [n - 7 for n in limits if isinstance(n, int) and n > 16]
    if max_length is not None:
        limits.append((max_length - 15) // 2)
    span = max(min([span, *limits]), 4)
    return (span + 7, 5, span + 3)


def leak_check_ids(model: torch.nn.Module, lengths: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """``(1, sum(lengths))`` token ids of the leak check's row: within each document all distinct
    and none a special token (padding, bos, eos), where the vocabulary allows.

    A top-k selection over scores that tie exactly (a sparse attention indexer, Doge's dynamic
    mask) breaks the tie by the key's slot in the row, which differs between the packed row and
    the document alone: the document alone is then no reference at all. Exact ties come from a
    repeated token (identical first-layer keys, biases and router scores) and from a token whose
    embedding is zero (padding, as initialised); distinct ordinary tokens leave none, and lose
    nothing of a leak.
    """
    vocab = int(getattr(text_config(model), "vocab_size", None) or 32000)
    allowed = torch.ones(vocab, dtype=torch.bool)
    for cfg in model_configs(model):
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(cfg, name, None)
            for token in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(token, int) and 0 <= token < vocab:
                    allowed[token] = False
    tokens = allowed.nonzero().flatten() if allowed.any() else torch.arange(vocab)
    gen = torch.Generator().manual_seed(seed)
    docs = [
        tokens[torch.randperm(len(tokens), generator=gen)[:n]]
        if len(tokens) >= n
        else tokens[torch.randint(len(tokens), (n,), generator=gen)]
        for n in lengths
    ]
    return torch.cat(docs).unsqueeze(0)


@functools.lru_cache(maxsize=4)
def _sketch_vectors(device: torch.device, seed: int) -> torch.Tensor:
    """``(_PROJECTIONS, _BLOCK)`` float64 random directions, made once: every block of every
    gradient is projected on the same ones (a difference between two gradients does not depend on
    them, so each projection still sees it with its full size)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((_PROJECTIONS, _BLOCK), generator=gen, dtype=torch.float64).to(device)


def _projections(grad: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``_PROJECTIONS`` random projections of ``grad`` and its squared norm (float64, on its device).

    Summed in float64, a block of ``_BLOCK`` elements at a time: a float32 dot over millions of
    elements rounds by more than the check's tolerance, and a whole float64 copy of a large
    gradient would cost memory. A sharded (DTensor) gradient is gathered first, on every rank
    alike: all ranks then reach the same verdict.
    """
    if hasattr(grad, "full_tensor"):
        grad = grad.full_tensor()
    flat = grad.detach().reshape(-1)
    vectors = _sketch_vectors(flat.device, seed)
    proj = torch.zeros(_PROJECTIONS, dtype=torch.float64, device=flat.device)
    sq = torch.zeros((), dtype=torch.float64, device=flat.device)
    for block in flat.split(_BLOCK):
        block = block.double()
        sq += block.square().sum()
        proj += vectors[:, : block.numel()] @ block
    return proj, sq


@contextlib.contextmanager
def _gradient_sketch(params: list[torch.nn.Parameter], sketch: dict, seed: int):
    """While open, each backward adds ``_projections`` of every parameter's new gradient to
    ``sketch[i]`` and drops the gradient: the check never holds more than one parameter's
    gradient beyond what a training step would (the parameters' own ``.grad`` are set aside and
    given back)."""
    kept = [p.grad for p in params]
    handles = []

    def record(index: int):
        def hook(p: torch.nn.Parameter) -> None:
            proj, sq = _projections(p.grad, seed)
            old = sketch.get(index)
            sketch[index] = (proj, sq) if old is None else (old[0] + proj, old[1] + sq)
            p.grad = None

        return hook

    try:
        for i, p in enumerate(params):
            p.grad = None
            handles.append(p.register_post_accumulate_grad_hook(record(i)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for p, g in zip(params, kept):
            p.grad = g


@contextlib.contextmanager
def _as_transformers_built(model: torch.nn.Module):
    """While open, ``model`` runs as transformers built it: the attention implementation it had
    before ``enable_varlen`` (``sdpa``, else ``eager``, when it was loaded with packtune's), and
    every layer with a varlen form runs its class's own forward. The leak check runs each document
    alone this way, so that a packed row is compared with the model itself, not with packtune.
    The boundary hook is set aside too: the original forwards get what a user's plain call gives
    them, never packtune's ``cu_seq_lens`` (transformers' Gated DeltaNet hands those to its torch
    scan, which refuses them)."""
    hf_model = transformers_model(model)
    current = getattr(hf_model.config, "_attn_implementation", None)
    reference = getattr(hf_model, REFERENCE_ATTR, None if current == ATTN_IMPLEMENTATION else current)
    switched = [m for m in hf_model.modules() if "forward" in vars(m) and getattr(m, "_packtune_varlen_layer", False)]
    forwards = [vars(m).pop("forward") for m in switched]
    # Each hooked module's pre-hooks as they were (in order), restored as they were.
    hooked = [m for m in hf_model.modules() if attach_boundaries in m._forward_pre_hooks.values()]
    pre_hooks = [dict(m._forward_pre_hooks) for m in hooked]
    for module in hooked:
        for key in [k for k, hook in module._forward_pre_hooks.items() if hook is attach_boundaries]:
            del module._forward_pre_hooks[key]
    try:
        if reference != current:
            for candidate in ([reference] if reference else ["sdpa", "eager"]):
                try:
                    hf_model.set_attn_implementation(candidate)
                    break
                except (ValueError, ImportError, KeyError):
                    continue
        yield
    finally:
        if getattr(hf_model.config, "_attn_implementation", None) != current:
            hf_model.set_attn_implementation(current)
        for module, forward in zip(switched, forwards):
            module.forward = forward
        for module, hooks in zip(hooked, pre_hooks):
            module._forward_pre_hooks.clear()
            module._forward_pre_hooks.update(hooks)


def _leak_errors(model, ids, pos, cu, lengths, dtype, grads, seed):
    """Relative errors of the packed row against each document alone: logits (largest |difference|
    over the largest |logit|, per document) and gradients (per parameter, the largest difference of
    a random projection over the gradient's norm); returns ``(logits, gradients, worst parameter)``."""
    device = ids.device
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad] if grads else []
    bounds = list(zip(cu.tolist(), cu.tolist()[1:]))
    vocab_gen = torch.Generator().manual_seed(seed + 1)
    packed_sketch: dict = {}
    alone_sketch: dict = {}
    longest = max(lengths)
    with torch.set_grad_enabled(bool(params)), autocast_context(device, dtype):  # logits only: no graph held
        with _gradient_sketch([p for _, p in params], packed_sketch, seed):
            packed = model(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                           max_length_q=longest, max_length_k=longest, use_cache=False).logits[0].float()
            # The gradient of a random projection of the logits: every logit gets a weight.
            weights = torch.randn(packed.shape, generator=vocab_gen).to(device)
            if params:
                (packed * weights).sum().backward()
            packed = packed.detach()
        logit_error = 0.0
        with _gradient_sketch([p for _, p in params], alone_sketch, seed), _as_transformers_built(model):
            # One backward over all documents: each gradient is sketched once, and the graphs
            # held together are those of the packed row's tokens, no more.
            loss = 0.0
            for a, b in bounds:
                alone = model(input_ids=ids[:, a:b], position_ids=pos[:, a:b], use_cache=False).logits[0].float()
                loss = loss + (alone * weights[a:b]).sum()
                alone = alone.detach()
                scale = alone.abs().max().clamp(min=1e-6)
                logit_error = max(logit_error, float((packed[a:b] - alone).abs().max() / scale))
            if params:
                loss.backward()
    grad_error, worst = 0.0, None
    if params:
        norms = {i: float(sq.sqrt()) for i, (_, sq) in packed_sketch.items()}
        floor = 1e-3 * max(norms.values(), default=0.0) + 1e-30
        zero = (torch.zeros(_PROJECTIONS, dtype=torch.float64), torch.zeros((), dtype=torch.float64))
        for i, (name, _) in enumerate(params):
            mine, theirs = packed_sketch.get(i, zero)[0].cpu(), alone_sketch.get(i, zero)[0].cpu()
            error = float((mine - theirs).abs().max()) / max(norms.get(i, 0.0), floor)
            if error > grad_error:
                grad_error, worst = error, name
    return logit_error, grad_error, worst


def check_no_leak(
    model: torch.nn.Module,
    dtype: torch.dtype = torch.float32,
    *,
    max_length: int | None = None,
    grads: bool = True,
    seed: int = 0,
) -> float:
    """Prove that ``model`` trains a packed row exactly as its documents alone; raises ``LeakError``.

    One packed row (``leak_check_lengths``: documents longer than any window, chunk, sparse block,
    convolution or scan chunk of the config, the later ones at large offsets), given in packtune's
    batch format (``position_ids`` and ``cu_seq_lens_q/k``), against each of its documents run
    alone through the same model as transformers built it (its own attention implementation, its
    layers' own forwards, no packtune keywords: ``_as_transformers_built``): the logits, and the
    gradient of every trainable parameter (of a random projection of the logits; compared through
    random projections of each parameter's gradient, so the check holds no second copy of the
    gradients), both relative, within ``TOLERANCE`` and ``GRAD_TOLERANCE``. Runs in eval mode (no
    dropout) under the training step's autocast to ``dtype``, so that the kernel training will use
    runs (``auto`` resolves per dtype and device); with fp32 weights and a reduced ``dtype`` the row
    is checked in fp32 first, at fp32's tolerance, so that a small leak is not lost in the
    rounding. ``grads=False`` compares logits only (a model whose weights are gathered for the
    forward alone). Returns the largest relative error.
    """
    device = next(model.parameters()).device
    weights = next(model.parameters()).dtype
    lengths = leak_check_lengths(model, max_length)
    ids = leak_check_ids(model, lengths, seed).to(device)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(device)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    passes = [dtype] if dtype == torch.float32 or weights != torch.float32 else [torch.float32, dtype]
    was_training = model.training
    model.eval()
    worst_error = 0.0
    try:
        for compute in passes:
            logit_error, grad_error, param = _leak_errors(model, ids, pos, cu, lengths, compute, grads, seed)
            tolerances = []
            for table in (TOLERANCE, GRAD_TOLERANCE):
                tolerance = table[weights if compute == torch.float32 else compute]
                if weights != torch.float32:
                    tolerance = max(tolerance, table.get(weights, table[torch.bfloat16]))
                tolerances.append(tolerance)
            for what, error, tolerance in (
                ("logits differ", logit_error, tolerances[0]),
                (f"gradient of {param} differs", grad_error, tolerances[1]),
            ):
                if not error <= tolerance:
                    raise LeakError(
                        f"{type(model).__name__}: on a packed row of documents of {', '.join(map(str, lengths))} "
                        f"tokens, the {what} from the documents alone by {error:.3g} (relative, "
                        f"{str(compute).replace('torch.', '')}, tolerance {tolerance:g}); the model does not "
                        "honour packing boundaries (attn_implementation="
                        f"{getattr(model.config, '_attn_implementation', None)!r}). Refusing to train on packed "
                        "rows: set use_varlen_attn = False and pack_to_max_length = False"
                    )
            worst_error = max(worst_error, logit_error, grad_error)
    finally:
        model.train(was_training)
    return worst_error
