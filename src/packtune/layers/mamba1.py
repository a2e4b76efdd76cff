"""Mamba1 (selective scan) mixers over packed rows: every document starts from a zero state.

``MambaMixer``, ``FalconMambaMixer`` and ``JambaMambaMixer`` are one layer (in_proj, causal
depthwise conv, x_proj to dt/B/C, with RMS norms on dt/B/C in Falcon-Mamba and Jamba, selective
scan, out_proj); ``ZambaMambaMixer`` splits it into independent heads. Their varlen forms run the
conv through ``varlen_causal_conv1d`` and the scan through ``varlen_selective_scan``.

Jamba's decoder layer, and Mamba's and Falcon-Mamba's blocks and backbones, call the mixer
without the forward's keyword arguments, so the boundaries never reach it. Their rows in
``VARLEN_LAYERS`` are therefore the nearest class that has them (Jamba's decoder layer, the
Mamba causal LM itself): its varlen form hands this forward's boundaries to its mixers, as an
argument bound to each mixer instance for the duration of the call.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from packtune.layers.conv import varlen_causal_conv1d
from packtune.layers.common import mask_padding, packed_segments
from packtune.layers.segments import Segments

#: The Mamba1 mixers that get the boundaries from the layer or model around them.
_BOUND_MIXERS = ("MambaMixer", "FalconMambaMixer", "JambaMambaMixer")


@functools.lru_cache(maxsize=1)
def _cuda_scan():
    """mamba_ssm's ``selective_scan_fn`` (CUDA only), or ``None``. It takes no ``seq_idx``."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return selective_scan_fn


def _reset_scan(u, delta, A, B, C, starts):
    """transformers' recurrent loop of ``mamba_selective_scan`` with the carried state dropped
    where a document starts (its decay set to exactly 0 there: the state is then ``dB * u``, as
    from a zero state). ``delta`` is already biased and softplus'ed."""
    dtype = u.dtype
    discrete_A = torch.exp(A[None, :, None, :] * delta[:, :, :, None])
    discrete_A = discrete_A * (~starts)[:, None, :, None].to(discrete_A.dtype)
    deltaB_u = delta[:, :, :, None] * B.transpose(1, 2)[:, None, :, :].float() * u[:, :, :, None].float()
    C = C.transpose(1, 2)
    state = torch.zeros(u.shape[0], u.shape[1], A.shape[-1], dtype=dtype, device=u.device)
    outs = []
    for t in range(u.shape[-1]):
        state = discrete_A[:, :, t] * state + deltaB_u[:, :, t]
        outs.append(torch.matmul(state.to(dtype), C[:, t, :].unsqueeze(-1))[:, :, 0])
    return torch.stack(outs, dim=-1)


def documents_as_rows(t: torch.Tensor, seg: Segments) -> torch.Tensor:
    """``(rows, channels, length)`` -> ``(documents, channels, longest)``: each document on a row
    of its own from position 0, zeros after its end (no host read: the longest is a host int)."""
    rows, channels, length = t.shape
    cu = seg.cu.tensor.long()
    index = cu[:-1, None] + torch.arange(seg.cu.longest, device=cu.device)
    index = torch.where(index < cu[1:, None], index, rows * length)  # past the end: the zero column
    flat = F.pad(t.transpose(0, 1).reshape(channels, rows * length), (0, 1))
    return flat[:, index].transpose(0, 1)


def rows_from_documents(t: torch.Tensor, seg: Segments) -> torch.Tensor:
    """Inverse of ``documents_as_rows``: ``(documents, channels, longest)`` back to ``(rows, channels, length)``."""
    picked = t[seg.seq_idx.long(), :, seg.pos]  # (rows, length, channels)
    return picked.permute(0, 2, 1)


def varlen_selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    seg: Segments,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """The Mamba1 selective scan (``selective_scan_fn``'s layout: ``u``/``delta``/``z``
    ``(b, d, l)``, ``A`` ``(d, n)``, ``B``/``C`` ``(b, n, l)``) restarted at every document start
    of ``seg``: each document's output is what it gets alone.

    On CUDA with mamba_ssm (whose ``selective_scan_fn`` takes no ``seq_idx``), the documents are
    laid one per row, zero-padded at their ends, and scanned in one kernel call: the scan is
    causal, so the padding after a document never reaches it. Elsewhere, transformers' own loop
    over tokens with the state dropped at document starts.
    """
    kernel = _cuda_scan() if u.is_cuda else None
    if kernel is not None:
        docs = [documents_as_rows(t, seg) for t in (u, delta, B, C)]
        z_docs = None if z is None else documents_as_rows(z, seg)
        out = kernel(*docs[:2], A, *docs[2:], D=D, z=z_docs, delta_bias=delta_bias, delta_softplus=delta_softplus)
        return rows_from_documents(out, seg)
    if delta_bias is not None:
        delta = delta + delta_bias.to(delta.dtype)[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    out = _reset_scan(u, delta, A, B, C, seg.starts)
    if D is not None:
        out = out + u * D[None, :, None]
    if z is not None:
        out = out * F.silu(z)
    return out


def mamba1_mixer_forward(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    cache=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """Varlen form of ``MambaMixer``, ``FalconMambaMixer`` and ``JambaMambaMixer`` (their
    ``forward``'s signature), restarting the conv and the scan at document starts."""
    rows, length, _ = hidden_states.shape
    seg = packed_segments(module, rows, length, cache, kwargs)
    if seg is None:
        return type(module).forward(module, hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
    dtype = hidden_states.dtype
    projected = module.in_proj(mask_padding(module, hidden_states, attention_mask)).transpose(1, 2)
    x, gate = projected.chunk(2, dim=1)
    x = varlen_causal_conv1d(x, module.conv1d.weight.squeeze(1), module.conv1d.bias, seg, module.activation)
    x = mask_padding(module, x.transpose(1, 2), attention_mask)
    time_step, B, C = module.x_proj(x).split([module.time_step_rank, module.ssm_state_size, module.ssm_state_size], -1)
    if hasattr(module, "dt_layernorm"):  # Jamba and Falcon-Mamba normalise dt, B and C
        time_step, B, C = module.dt_layernorm(time_step), module.b_layernorm(B), module.c_layernorm(C)
    if hasattr(module.config, "_is_quantized"):  # as transformers: a quantized dt_proj is called
        time_step = (module.dt_proj(time_step) - module.dt_proj.bias).transpose(1, 2)
    else:
        time_step = module.dt_proj.weight @ time_step.transpose(1, 2)
    bias = module.dt_proj.bias
    out = varlen_selective_scan(
        x.transpose(1, 2),
        time_step,
        -torch.exp(module.A_log.float()),
        B.transpose(1, 2),
        C.transpose(1, 2),
        seg,
        D=module.D.float(),
        z=gate,
        delta_bias=None if bias is None else bias.float(),
        delta_softplus=True,
    )
    return module.out_proj(out.transpose(1, 2).to(dtype))


def zamba_mixer_forward(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    cache=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """Varlen form of ``ZambaMambaMixer``: the Mamba1 mixer split into heads scanned apart."""
    rows, length, _ = hidden_states.shape
    seg = packed_segments(module, rows, length, cache, kwargs)
    if seg is None:
        return type(module).forward(module, hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
    dtype = hidden_states.dtype
    heads, head_dim = module.n_mamba_heads, module.mamba_head_dim
    projected = module.in_proj(mask_padding(module, hidden_states, attention_mask)).transpose(1, 2)
    x, gate = projected.view(rows, -1, 2, length).chunk(2, dim=2)
    gate = gate.reshape(rows, heads, head_dim, length).transpose(0, 1)
    x = varlen_causal_conv1d(x.squeeze(2), module.conv1d.weight.squeeze(1), module.conv1d.bias, seg, module.activation)
    x = mask_padding(module, x.transpose(1, 2), attention_mask).transpose(1, 2)
    x = x.reshape(rows, heads, head_dim, length).transpose(0, 1)
    ssm = (module.x_proj_weight[:, None] @ x).transpose(-1, -2)
    time_step, B, C = ssm.split([module.time_step_rank, module.ssm_state_size, module.ssm_state_size], dim=-1)
    time_step = module.dt_proj_weight[:, None] @ time_step.transpose(-1, -2)
    A = -torch.exp(module.A_log.float())
    outs = [
        varlen_selective_scan(
            x[h], time_step[h], A[h], B[h].transpose(1, 2), C[h].transpose(1, 2), seg,
            D=module.D[h].float(), z=gate[h], delta_bias=module.dt_proj_bias[h].float(), delta_softplus=True,
        )  # fmt: skip
        for h in range(heads)
    ]
    return module.out_proj(torch.cat(outs, dim=1).transpose(1, 2).to(dtype))


@contextlib.contextmanager
def _bound(modules: list[torch.nn.Module], form, bounds):
    """Within the block, each of ``modules`` runs ``form`` with ``bounds`` as its boundaries
    argument (per instance; its own forward is back afterwards)."""
    before = [module.__dict__.get("forward") for module in modules]  # e.g. an accelerate hook's
    for module in modules:
        module.forward = functools.partial(form, module, bounds)
    try:
        yield
    finally:
        for module, forward in zip(modules, before):
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def _mixer_with(mixer: torch.nn.Module, bounds, *args, **kwargs) -> torch.Tensor:
    from packtune.attention.hf import BOUNDARIES_KWARG

    return mamba1_mixer_forward(mixer, *args, **{**kwargs, BOUNDARIES_KWARG: bounds})


def _mixers_in(root: torch.nn.Module) -> list[torch.nn.Module]:
    mixers = [m for m in root.modules() if type(m).__name__ in _BOUND_MIXERS]
    if not mixers:
        raise TypeError(f"{type(root).__name__} holds none of {', '.join(_BOUND_MIXERS)}: no varlen form fits it")
    return mixers


def _is_checkpoint_wrapper(forward) -> bool:
    """transformers' ``GradientCheckpointingLayer`` wraps each subclass's ``forward`` in
    ``forward_with_checkpointing`` (functools.wraps keeps the name, not the code's)."""
    code = getattr(forward, "__code__", None)
    return code is not None and code.co_name == "forward_with_checkpointing" and hasattr(forward, "__wrapped__")


def _own_forward_with_mixers_given(layer: torch.nn.Module, bounds, args: tuple, kwargs: dict):
    """``layer``'s own forward with every Mamba1 mixer in it given ``bounds``.

    Under gradient checkpointing, transformers checkpoints the class's forward, whose replay in
    the backward pass would call the mixers without the boundaries; this call is checkpointed
    instead (cache off, as transformers does there), so the replay gives them too.
    """
    forward = type(layer).forward
    if bounds is None:
        return forward(layer, *args, **kwargs)
    wrapped = _is_checkpoint_wrapper(forward)
    inner = forward.__wrapped__ if wrapped else forward
    mixers = _mixers_in(layer)

    def run(*a, **kw):
        with _bound(mixers, _mixer_with, bounds):
            return inner(layer, *a, **kw)

    if wrapped and layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
        off = {"use_cache": False, "cache": None, "layer_past": None}
        kwargs = {k: off[k] if k in off else v for k, v in kwargs.items()}
        return layer._gradient_checkpointing_func(functools.partial(run, **kwargs), *args)
    return run(*args, **kwargs)


def jamba_mamba_layer_forward(layer: torch.nn.Module, *args, **kwargs):
    """Varlen form of ``JambaMambaDecoderLayer``, which calls its mixer without the forward's
    keyword arguments: its own forward, with its mixer given this forward's boundaries."""
    from packtune.attention.hf import BOUNDARIES_KWARG

    return _own_forward_with_mixers_given(layer, kwargs.get(BOUNDARIES_KWARG), args, kwargs)


def _block_with(block: torch.nn.Module, bounds, *args, **kwargs):
    return _own_forward_with_mixers_given(block, bounds, args, kwargs)


def mamba_lm_forward(model: torch.nn.Module, *args, **kwargs):
    """Varlen form of ``MambaForCausalLM`` and ``FalconMambaForCausalLM``, whose backbone and
    blocks pass no keyword arguments on: the boundaries are validated here (enable_varlen's
    boundary hook, called on the LM's own inputs) and given to every block for this forward,
    which gives them to its mixer (inside its gradient checkpoint, when it has one)."""
    from packtune.attention.hf import BOUNDARIES_KWARG
    from packtune.attention.hf import attach_boundaries

    attached = attach_boundaries(model, args, kwargs)
    if attached is not None:
        args, kwargs = attached
    bounds = kwargs.get(BOUNDARIES_KWARG)
    if bounds is None:
        return type(model).forward(model, *args, **kwargs)
    mixers = _mixers_in(model)
    blocks = [m for m in model.modules() if any(c in mixers for c in m.children())]
    with _bound(blocks, _block_with, bounds):
        return type(model).forward(model, *args, **kwargs)
