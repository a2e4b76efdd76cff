"""A chunked loss head: the cross-entropy of the output layer without ``(tokens, vocab)`` logits.

With 16,384 trained tokens and a 151,936-token vocabulary, the logits alone are 9.7 GB in
fp32, and their gradient as much again. ``chunked_loss_sum`` computes the same

    sum over trained tokens of  weight * cross_entropy(transform(hidden @ weight.T), target)

``chunk_size`` tokens at a time. Its forward pass also computes the gradient of each chunk
(the cross-entropy's is ``softmax - onehot``, written down rather than recorded), adds it to
the gradient of the output weight and writes the gradient of the chunk's hidden states; the
backward pass only multiplies both by the incoming scale. So a chunk's logits live only
while it is computed, nothing is recomputed, and it costs the same three matrix products as
the plain head: logits, gradient of the hidden states, gradient of the weight. The price is
one weight-sized buffer held from forward to backward (the gradient of the weight), which the
plain head also allocates, in its backward.

``transform`` is what the model does to the output layer's result before the loss, as a
tuple of steps applied in order: ``("softcap", c)`` (gemma2/gemma3
``final_logit_softcapping``: ``tanh(x / c) * c``), ``("scale", s)`` (cohere ``logit_scale``:
``x * s``), ``("divide", s)`` (granite ``logits_scaling``: ``x / s``).

``ChunkedHead`` applies it to a transformers model during training (``packtune.recipe.step``):
a forward pre-hook on the output layer takes the hidden states the model hands it (the
trained positions only, with ``logits_to_keep``), computes the chunked loss there (inside the
model's forward, where DDP, FSDP2 and DeepSpeed have the weight gathered) and lets the layer
itself run on zero rows. The empty logits stay part of the loss (their sum, 0), so every
engine's backward hooks on the model's outputs still fire. ``chunked_head(model, size)``
returns ``None``, with one log line, for a model whose head packtune does not know
(``HEAD_TRANSFORMS``) or whose output layer it cannot split (anything other than an
``nn.Linear``, or a peft LoRA layer on one), and the plain head is used.

>>> h, w = torch.randn(5, 4), torch.randn(7, 4)
>>> t, wt = torch.tensor([1, -100, 3, 6, 0]), torch.tensor([1.0, 0.0, 0.5, 0.5, 1.0])
>>> plain = (torch.nn.functional.cross_entropy(h @ w.T, t, reduction="none") * wt).sum()
>>> bool(torch.isclose(chunked_loss_sum(h, w, t, wt, chunk_size=2), plain))
True
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Callable, Iterator

import torch

from packtune.config.settings import LOSS_CHUNK_SIZE
from packtune.modeling import text_config, transformers_model
from packtune.packing.packs import IGNORE_INDEX

log = logging.getLogger("packtune")

__all__ = ["LOSS_CHUNK_SIZE", "HEAD_TRANSFORMS", "ChunkedHead", "chunked_head", "chunked_loss_sum"]

Transform = tuple[tuple[str, float], ...]


@functools.lru_cache(maxsize=None)
def takes_logits_mask(model_class: type) -> bool:
    """Whether ``model_class`` slices its hidden states with a boolean ``logits_to_keep`` mask.

    True when its forward takes ``logits_to_keep`` and hands it to transformers'
    ``slice_logits_to_keep``, and that function (transformers >= 5) keeps exactly the masked
    positions; older or custom model code gets full logits.
    """
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:
        return False
    if "logits_to_keep" not in inspect.signature(model_class.forward).parameters:
        return False
    forward = inspect.unwrap(model_class.forward)  # past transformers' decorators
    if getattr(forward, "__globals__", {}).get("slice_logits_to_keep") is not slice_logits_to_keep:
        return False
    try:
        kept = slice_logits_to_keep(torch.zeros(1, 3, 1), torch.tensor([[True, False, True]]))
    except Exception:  # an older transformers: integer counts and index tensors only
        return False
    return tuple(kept.shape) == (2, 1)


def _softcap(model) -> Transform:
    cap = text_config(model).final_logit_softcapping
    return () if cap is None else (("softcap", float(cap)),)


def _plain(model) -> Transform:
    return ()


#: Causal LM classes whose forward is ``logits = self.lm_head(slice_logits_to_keep(h, keep))``
#: followed by nothing but the transform given here (read from transformers' source, and
#: each one tested against the plain head in tests/test_loss_head_models.py).
HEAD_TRANSFORMS: dict[str, Callable[[torch.nn.Module], Transform]] = {
    **{
        name: _plain
        for name in (
            "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM", "Qwen2MoeForCausalLM",
            "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "GemmaForCausalLM", "Phi3ForCausalLM", "Starcoder2ForCausalLM",
            "GPTBigCodeForCausalLM", "Olmo2ForCausalLM", "DeepseekV3ForCausalLM", "Glm4ForCausalLM",
        )
    },
    "Gemma2ForCausalLM": _softcap,
    "Gemma3ForCausalLM": _softcap,
    "CohereForCausalLM": lambda m: (("scale", float(m.logit_scale)),),
    "Cohere2ForCausalLM": lambda m: (("scale", float(m.logit_scale)),),
    "GraniteForCausalLM": lambda m: (("divide", float(text_config(m).logits_scaling)),),
    "GraniteMoeForCausalLM": lambda m: (("divide", float(text_config(m).logits_scaling)),),
}


def _chunk(x, w, targets, weights, transform: Transform, need_grad: bool):
    """Loss sum of one chunk and, when ``need_grad``, the gradient of that sum w.r.t. its logits.

    Everything runs in place on one fp32 ``(chunk, vocab)`` buffer (two with soft-capping,
    whose derivative needs ``tanh``). The gradient of ``weight * ce`` w.r.t. the transformed
    logits ``z`` is ``weight * (softmax(z) - onehot(target))``, then the chain rule through
    the transform, last step first.
    """
    z = torch.mm(x, w.t()).float()
    saved = []  # tanh of each soft-cap, for its derivative 1 - tanh^2
    for kind, value in transform:
        if kind == "softcap":
            t = z.div_(value).tanh_()
            z = t * value if need_grad else t.mul_(value)
            saved.append(t if need_grad else None)
        elif kind == "scale":
            z.mul_(value)
        elif kind == "divide":
            z.div_(value)
        else:
            raise ValueError(f"unknown head transform {kind!r}")
    valid = targets != IGNORE_INDEX
    index = targets.clamp(min=0).unsqueeze(1)
    picked = z.gather(1, index).squeeze(1)
    top = z.amax(dim=1, keepdim=True)
    e = z.sub_(top).exp_()  # z is consumed: e = exp(z - max)
    total = e.sum(dim=1)
    lse = top.squeeze(1) + total.log()
    w_valid = torch.where(valid, weights, torch.zeros_like(weights))
    ce = torch.where(valid, lse - picked, torch.zeros_like(lse))
    loss = (ce * w_valid).sum()
    if not need_grad:
        return loss, None
    e.mul_((w_valid / total).unsqueeze(1))  # weight * softmax
    e.scatter_add_(1, index, -w_valid.unsqueeze(1))  # - weight * onehot (0 where untrained)
    return loss, _chain(e, transform, saved)


def _chain(g: torch.Tensor, transform: Transform, saved: list) -> torch.Tensor:
    """The gradient ``g`` w.r.t. the transformed logits, taken back through the transform."""
    caps = iter(reversed(saved))
    for kind, value in reversed(transform):
        if kind == "softcap":
            t = next(caps)
            g.mul_(t.mul_(t).neg_().add_(1.0))  # d(c tanh(x / c))/dx = 1 - tanh^2
        elif kind == "scale":
            g.mul_(value)
        elif kind == "divide":
            g.div_(value)
    return g


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward: the loss sum and, chunk by chunk, its gradients; backward: scale them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, chunk_size: int, transform: Transform, compute_dtype):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Casts are explicit (autocast's choice of dtype, taken by the caller), so that the
        # gradient products run in the same dtype as the logits, as autograd would.
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                x = hidden[rows].to(compute_dtype)
                part, g = _chunk(x, w, targets[rows], weights[rows].float(), transform, need_h or need_w)
                loss += part
                if g is None:
                    continue
                g = g.to(compute_dtype)
                if need_h:
                    grad_h[rows] = torch.mm(g, w)
                if need_w:
                    if g.dtype == torch.float32:
                        grad_w.addmm_(g.t(), x)
                    else:  # accumulate the chunks in fp32
                        grad_w.add_(torch.mm(g.t(), x))
                del g, x
        ctx.grads = (grad_h, grad_w, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("the chunked loss head supports one backward pass per forward (its gradients are consumed)")
        grad_h, grad_w, weight_dtype = ctx.grads
        ctx.grads = None
        if grad_h is not None:
            grad_h.mul_(grad_loss.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_loss.float()).to(weight_dtype)
        return grad_h, grad_w, None, None, None, None, None


def product_dtype(device: torch.device, fallback: torch.dtype) -> torch.dtype:
    """The dtype autocast would give a matrix product here, or ``fallback`` without autocast."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return fallback


def chunked_loss_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    chunk_size: int = LOSS_CHUNK_SIZE,
    transform: Transform = (),
) -> torch.Tensor:
    """``sum(weights * cross_entropy(transform(hidden @ weight.T), targets))``, ``chunk_size`` rows at a time.

    ``hidden`` is ``(tokens, hidden_size)``, ``weight`` ``(vocab, hidden_size)``; ``targets``
    ``(tokens,)`` with ``-100`` where untrained, ``weights`` ``(tokens,)`` (``target_weights``).
    The same value and gradients as ``weighted_loss_sum`` over the full logits (the
    cross-entropy in fp32, the products in autocast's dtype when autocast is on); at most
    ``chunk_size x vocab`` logits exist at a time. Differentiable once.
    """
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be (tokens, d) and (vocab, d)")
    if targets.shape != (hidden.shape[0],) or weights.shape != (hidden.shape[0],):
        raise ValueError(f"targets {tuple(targets.shape)} and weights {tuple(weights.shape)} must be ({hidden.shape[0]},)")
    dtype = product_dtype(hidden.device, weight.dtype)
    return _LinearCrossEntropy.apply(hidden, weight, targets, weights, chunk_size, tuple(transform), dtype)


# --- on a transformers model ------------------------------------------------------------------


def _lora_layer(module: torch.nn.Module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    return isinstance(module, LoraLayer)


def _unsupported(module: torch.nn.Module | None) -> str | None:
    """Why the output layer cannot be split into chunks here, or ``None`` when it can."""
    if module is None:
        return "the model has no output layer (get_output_embeddings() is None)"
    if type(module) is torch.nn.Linear:
        return None
    if not _lora_layer(module):
        return f"its output layer is a {type(module).__name__}, not an nn.Linear"
    base = module.get_base_layer()
    if type(base) is not torch.nn.Linear:
        return f"its LoRA output layer wraps a {type(base).__name__}, not an nn.Linear"
    active = [name for name in module.active_adapters if name in module.lora_A]
    if any(name in getattr(module, "lora_variant", {}) for name in active):
        return "its LoRA output layer uses a LoRA variant (DoRA, ...) whose math packtune does not split"
    if any(module.lora_B[name].bias is not None for name in active):
        return "its LoRA output layer has a lora_bias"
    return None


def head_operands(module: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden', weight')`` with ``module(hidden) == hidden' @ weight'.T``, differentiable.

    A peft LoRA layer adds ``scaling * lora_B(lora_A(dropout(x)))``: the rank-``r`` product
    ``u = lora_A(dropout(x))`` is computed here, through the adapter's own modules (and its
    dropout), and appended to the hidden states, with ``scaling * lora_B.weight`` appended to
    the weight, so the chunked head runs on ``[x, u] @ [W, s B].T``. A bias is a column of ones.
    """
    if type(module) is torch.nn.Linear:
        base, xs, ws = module, [hidden], [module.weight]
    else:
        base = module.get_base_layer()
        xs, ws = [hidden], [base.weight]
        if not (module.disable_adapters or module.merged):  # merged: the base weight holds the adapters
            for name in module.active_adapters:
                if name not in module.lora_A:
                    continue
                a, b = module.lora_A[name], module.lora_B[name]
                u = a(module.lora_dropout[name](hidden.to(a.weight.dtype)))
                xs.append(u.to(hidden.dtype))
                ws.append((b.weight * module.scaling[name]).to(base.weight.dtype))
    if base.bias is not None:
        xs.append(torch.ones_like(hidden[:, :1]))
        ws.append(base.bias.unsqueeze(1))
    if len(xs) == 1:
        return hidden, ws[0]
    return torch.cat(xs, dim=1), torch.cat(ws, dim=1)


class ChunkedHead:
    """The chunked loss head on one model's output layer (see the module docs).

    ``with head.capture(targets, weights): out = model(...)`` computes the loss when the model
    calls its output layer; ``head.loss(out.logits)`` returns it. ``targets``/``weights`` are
    those of the positions the model hands its output layer (all of them, or the kept ones
    with ``logits_to_keep``); untrained ones are dropped before the head.
    """

    def __init__(self, module: torch.nn.Module, transform: Transform, chunk_size: int) -> None:
        self.module = module
        self.transform = transform
        self.chunk_size = chunk_size
        self._targets: torch.Tensor | None = None
        self._weights: torch.Tensor | None = None
        self._loss: torch.Tensor | None = None

    @contextlib.contextmanager
    def capture(self, targets: torch.Tensor, weights: torch.Tensor) -> Iterator[ChunkedHead]:
        self._targets, self._weights, self._loss = targets.reshape(-1), weights.reshape(-1), None
        # Registered now, after any engine's hooks (DeepSpeed ZeRO-3 gathers the weight in
        # its own pre-hook), and removed after the forward: generate() sees the plain layer.
        handle = self.module.register_forward_pre_hook(self._pre_hook)
        try:
            yield self
        finally:
            handle.remove()
            self._targets = self._weights = None

    def _pre_hook(self, module: torch.nn.Module, args: tuple):
        if self._loss is not None:
            raise RuntimeError(f"{type(module).__name__} (the output layer) ran twice in one forward; the chunked loss head expects one call")
        if not args:
            raise RuntimeError("the output layer was called without positional hidden states")
        x = args[0]
        hidden = x.reshape(-1, x.shape[-1])
        targets, weights = self._targets, self._weights
        if hidden.shape[0] != targets.numel():
            raise RuntimeError(f"the output layer got {hidden.shape[0]} positions for {targets.numel()} targets: its logits_to_keep does not keep what was asked")
        keep = targets != IGNORE_INDEX
        if not bool(keep.all()):
            hidden, targets, weights = hidden[keep], targets[keep], weights[keep]
        hidden, weight = head_operands(module, hidden)
        self._loss = chunked_loss_sum(hidden, weight, targets, weights, self.chunk_size, self.transform)
        # The layer itself runs on zero rows: no logits, but it stays in the graph.
        return (x.narrow(-2, 0, 0), *args[1:])

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        """The loss sum captured in the forward, plus the (empty, zero) model logits."""
        if self._loss is None:
            raise RuntimeError("the model never called its output layer: the chunked loss head got no hidden states")
        loss, self._loss = self._loss, None
        if logits.numel():
            raise RuntimeError(f"the model returned logits of shape {tuple(logits.shape)} after its output layer ran on zero rows")
        # Keeps the model's outputs in the loss: engines hook their backward there (FSDP2's
        # root, DeepSpeed ZeRO-3's re-gather of the output layer before its gradient lands).
        return loss + logits.float().sum()


_reported: set[str] = set()


def _say_once(level: int, line: str) -> None:
    if line not in _reported:
        _reported.add(line)
        log.log(level, line)


def _fall_back(model: torch.nn.Module, why: str) -> None:
    _say_once(logging.WARNING, f"loss head: {type(model).__name__}: {why}; using the plain head (loss_chunk_size has no effect)")


def chunked_head(model: torch.nn.Module, chunk_size: int | None = LOSS_CHUNK_SIZE) -> ChunkedHead | None:
    """The chunked head for ``model`` (PEFT/engine-wrapped or not), or ``None`` for the plain head.

    ``None`` when ``chunk_size`` is ``None``, and, with one log line per model class and
    reason, when packtune does not know the model's head or cannot split its output layer.
    """
    if chunk_size is None:
        return None
    tm = transformers_model(model)
    known = next((c for c in type(tm).__mro__ if c.__name__ in HEAD_TRANSFORMS), None)
    if known is None:
        _fall_back(tm, "packtune does not know what this model does to its logits (HEAD_TRANSFORMS)")
        return None
    if type(tm).forward is not known.forward:  # a subclass with a forward of its own
        _fall_back(tm, f"its forward is not {known.__name__}'s")
        return None
    module = tm.get_output_embeddings()
    why = _unsupported(module)
    if why is not None:
        _fall_back(tm, why)
        return None
    transform = HEAD_TRANSFORMS[known.__name__](tm)
    steps = ", ".join(f"{kind} {value:g}" for kind, value in transform) or "none"
    _say_once(logging.INFO, f"loss head: chunks of {chunk_size} trained tokens ({known.__name__}, head transform: {steps})")
    return ChunkedHead(module, transform, chunk_size)
