"""Models of preference training: the reward model and the DPO reference.

* ``load_reward_model``: ``AutoModelForSequenceClassification`` with ``num_labels=1``, from a
  sequence-classification folder (its own head), or from a causal-LM folder or ``model_config``
  (its backbone, and a new ``score`` head initialised as transformers does, from ``seed``).
* ``make_reference``: the DPO reference's log-prob sums on the same packed layout and kernel:
  the base with the adapter disabled (LoRA), a frozen copy of the starting weights, or
  ``ref_model`` loaded with ``load_model``; ``precompute_reference`` runs it once over the data
  and caches its log-probs beside the pairs, keyed by the reference's ``weights_fingerprint``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import itertools
import json
import os
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

from packtune.config.settings import Settings
from packtune.modeling import check_no_leak, transformers_model


def _seq_cls_architecture(path: str, trust_remote_code: bool) -> bool:
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in (getattr(cfg, "architectures", None) or []))


def load_reward_model(settings, dtype: torch.dtype, load_causal) -> torch.nn.Module:
    """The reward model of ``settings`` (see the module docstring). ``load_causal(settings)``
    loads the causal LM whose backbone a new reward model takes."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = settings.pretrained_model_name_or_path
    if path is not None and _seq_cls_architecture(path, settings.trust_remote_code):
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=dtype, trust_remote_code=settings.trust_remote_code)
    if settings.model_config is not None:
        config = AutoConfig.for_model(**copy.deepcopy(settings.model_config))
    else:
        config = None
    causal = load_causal(settings) if config is None else None
    config = copy.deepcopy(causal.config if causal is not None else config)
    config.num_labels = 1
    config.architectures = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    if causal is not None:
        prefix = causal.base_model_prefix
        model.base_model.load_state_dict(getattr(causal, prefix).state_dict(), strict=True)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = getattr(model.config, "eos_token_id", None) if isinstance(
            getattr(model.config, "eos_token_id", None), int) else None
    return model


class _Scores(torch.nn.Module):
    """A reward model seen as a model whose ``logits`` are every position's score. The reward model
    is its ``module``, the way engines wrap a model, so ``transformers_model`` finds it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.module = model
        self.config = model.config

    def forward(self, **kwargs):
        tm = transformers_model(self.module)
        kwargs.pop("use_cache", None)
        hidden = tm.base_model(**kwargs, use_cache=False).last_hidden_state
        return SimpleNamespace(logits=tm.score(hidden))


def check_reward_no_leak(model: torch.nn.Module, dtype: torch.dtype = torch.float32, max_length: int | None = None) -> float:
    """``check_no_leak`` on every position's score of a reward model."""
    return check_no_leak(_Scores(model), dtype=dtype, max_length=max_length)


def check_same_vocabulary(policy_tokenizer, ref_path: str, ref_model: torch.nn.Module, policy: torch.nn.Module,
                          trust_remote_code: bool = False) -> None:
    """Refuse, in one line, a reference whose tokenizer or vocabulary differs from the policy's."""
    from packtune.data import load_tokenizer
    from packtune.modeling import text_config
    from packtune.errors import SetupError

    a, b = int(text_config(policy).vocab_size), int(text_config(ref_model).vocab_size)
    if a != b:
        raise SetupError(f"ref_model {ref_path!r} has a vocabulary of {b} tokens, the policy {a}: "
                         "a reference must share the policy's tokenizer")
    if os.path.isdir(ref_path) and not any(f.startswith(("tokenizer", "vocab")) for f in os.listdir(ref_path)):
        return  # a folder of weights alone: the vocabulary size was checked
    ref_tok = load_tokenizer(ref_path, trust_remote_code)
    if ref_tok.get_vocab() != policy_tokenizer.get_vocab():
        raise SetupError(f"ref_model {ref_path!r} has another tokenizer than the policy (their vocabularies differ): "
                         "a reference must share the policy's tokenizer")


class Reference:
    """The DPO reference, ``reference(shard, layout) -> sums`` (``fn``), and the module whose
    weights it runs (``module``; names holding ``skip`` are not the reference's: a disabled
    adapter), for ``weights_fingerprint``."""

    def __init__(self, fn: Callable, module: torch.nn.Module, skip: str | None = None) -> None:
        self.fn, self.module, self.skip = fn, module, skip

    def __call__(self, mb, layout) -> torch.Tensor:
        return self.fn(mb, layout)


def make_reference(settings: Settings, engine, model_before_engine: torch.nn.Module | None, tokenizer,
                   device: torch.device, dtype: torch.dtype, build_model: Callable[..., torch.nn.Module], sp=None):
    """The DPO reference: a ``Reference``, ``reference(shard, layout) -> sums`` (``packtune.preference.step``).

    ``model_before_engine``: a copy of the policy as built, before an engine wrapped it (the
    frozen reference of a full fine-tune); ``None`` otherwise. ``build_model``: the recipe's
    model builder (``packtune.recipe.model_setup.build_model``), which loads a ``ref_model``."""
    from packtune.preference.objective import Objective
    from packtune.preference.step import sequence_scores
    from packtune.errors import SetupError

    objective = Objective.from_settings(settings)
    if settings.ref_model is not None:
        ref_settings = dataclasses.replace(settings, pretrained_model_name_or_path=settings.ref_model,
                                           model_config=None, lora=None, gradient_checkpointing=False,
                                           method="sft", beta=0.1, dpo_loss="sigmoid", ref_model=None,
                                           precompute_ref_log_probs=False, dataset_format="auto")
        with _whole_model():
            ref = build_model(ref_settings, device, dtype)
        check_same_vocabulary(tokenizer, settings.ref_model, ref, engine.unwrapped(),
                              settings.trust_remote_code)
        module = _frozen(ref)
    elif settings.lora:
        def by_adapter(mb, layout):
            with torch.no_grad(), engine.unwrapped().disable_adapter():
                return sequence_scores(engine.model, mb, layout, objective, dtype, settings.loss_chunk_size, None, sp)
        return Reference(by_adapter, engine.unwrapped(), skip="lora_")
    else:
        if model_before_engine is None or any(p.is_meta for p in model_before_engine.parameters()):
            raise SetupError("the frozen reference copies the starting weights, which this engine builds sharded; "
                             "set `ref_model` to the starting checkpoint, or train with LoRA")
        module = _frozen(model_before_engine)

    def by_model(mb, layout):
        with torch.no_grad():
            return sequence_scores(module, mb, layout, objective, dtype, settings.loss_chunk_size, None, sp)
    return Reference(by_model, module)


@contextlib.contextmanager
def _whole_model():
    """Inside, transformers builds whole models even under ZeRO-3: the reference runs outside
    DeepSpeed's engine, which would otherwise leave it as empty partitions (``zero.Init``)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    held = hf_deepspeed._hf_deepspeed_config_weak_ref  # transformers keeps no public getter of the object
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = held


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


#: Of a cache entry of reference log-probs (``DataCache`` kind ``reflogps``).
REF_ARRAYS = ("ref_logps",)


def reference_cache_parts(settings: Settings, dtype: torch.dtype, device: torch.device) -> dict:
    """What, besides the pairs and the reference's weights, changes the reference's log-probs:
    the compute dtype, the device's kernels, the attention, the head's chunks, the row's cut."""
    return {"dtype": str(dtype), "device": device.type, "use_varlen_attn": settings.use_varlen_attn,
            "attn_backend": settings.attn_backend, "loss_chunk_size": settings.loss_chunk_size,
            "sequence_parallel_size": settings.sequence_parallel_size}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a weight: a ZeRO-3 partition, an FSDP2 shard, or the tensor."""
    if hasattr(t, "ds_tensor"):
        return t.ds_tensor
    return t.to_local() if hasattr(t, "to_local") else t


def weights_fingerprint(module: torch.nn.Module, skip: str | None = None) -> str:
    """A hash of ``module``'s config and of every weight's name, dtype, shape and bytes (those
    whose name holds ``skip`` left out). Under a sharding engine each rank hashes its shards and
    the ranks' hashes are combined, so every rank returns the same fingerprint.

    >>> a = torch.nn.Linear(2, 2); b = copy.deepcopy(a)
    >>> weights_fingerprint(a) == weights_fingerprint(b)
    True
    >>> with torch.no_grad(): _ = b.bias.add_(1e-6)
    >>> weights_fingerprint(a) == weights_fingerprint(b)
    False
    """
    h = hashlib.blake2b(digest_size=16)
    config = getattr(transformers_model(module), "config", None)
    if config is not None:
        h.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    for name, t in itertools.chain(module.named_parameters(), module.named_buffers()):
        if skip is not None and skip in name:
            continue
        local = _local(t).detach()
        h.update(f"{name} {local.dtype} {tuple(local.shape)}".encode())
        h.update(local.reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
    digest = h.hexdigest()
    if _distributed():
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, digest)
        if len(set(every)) > 1:  # sharded: the ranks' parts together
            digest = hashlib.blake2b(" ".join(every).encode(), digest_size=16).hexdigest()
    return digest


def precompute_reference(dataset, reference, collate, device: torch.device, key_parts: dict | None = None) -> bool:
    """Every pair's reference log-probs (``dataset.ref_logps``), computed once pack by pack.

    With ``key_parts`` (``reference_cache_parts``), a cached dataset (``dataset.cache_key``)
    and a ``Reference``, they are cached beside the pairs (``DataCache`` kind ``reflogps``),
    keyed by the pairs and their layout, the reference's ``weights_fingerprint`` and
    ``key_parts``: a later run on the same pairs and reference loads them, another reference
    never does. Every rank loads or every rank computes (a sharded reference computes in step);
    the main rank writes. Returns whether they came from the cache."""
    from packtune.data.cache import DataCache, cache_key
    from packtune.preference.step import row_layout

    pairs = int(dataset.margins.size)
    cache = key = None
    module = getattr(reference, "module", None)
    if key_parts is not None and getattr(dataset, "cache_key", None) is not None and module is not None:
        cache = DataCache(dataset.cache_dir)
        key = cache_key({"pairs": dataset.cache_key, "reference": weights_fingerprint(module, reference.skip),
                         **key_parts})
        hit = cache.load("reflogps", key, REF_ARRAYS)
        found = hit is not None and hit[0]["ref_logps"].shape == (2 * pairs,)
        if _distributed():
            flag = torch.tensor([int(found)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            found = bool(flag.item())
        if found:
            dataset.ref_logps = np.asarray(hit[0]["ref_logps"])
            return True
    out = np.zeros(2 * pairs, np.float64)
    for p in range(len(dataset)):
        batch = collate([dataset[p]]).to(device)
        if not batch.pairs:
            continue
        sums = reference(batch, row_layout(batch))
        ids = dataset.pair_ids(p)
        out.reshape(-1, 2)[ids] = sums.double().cpu().numpy().reshape(-1, 2)
    dataset.ref_logps = out
    if key is not None and (not _distributed() or dist.get_rank() == 0):
        cache.save("reflogps", key, {"ref_logps": out}, {"pairs": pairs, "dataset": dataset.cache_key, **key_parts})
    return False
