"""Building a model larger than one rank: the skeleton, the streamed weights, the fallbacks.

In one process (a gloo group of one): the FSDP2 skeleton takes no resident memory and keeps
tied weights tied; streaming a sharded safetensors checkpoint into FSDP2 shards gives exactly
the weights (and, with LoRA, the adapters) of a plain ``from_pretrained`` build; ZeRO-3's
per-rank partition reads cover every element once for any number of ranks; checkpoints that
cannot stream are named with the reason. The multi-process runs (ZeRO-3 and FSDP2 matching
one process, with LoRA and gradient checkpointing) are in ``test_elastic_resume.py`` and
``test_distributed.py``.
"""

from __future__ import annotations

import itertools
import logging
import os

import pytest
import torch

from packtune.distributed import DistEnv

CONFIG = "tiny_mistral_full_demo"


def _llama(**overrides):
    from transformers import AutoConfig

    kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=1000, max_position_embeddings=256, tie_word_embeddings=False)
    return AutoConfig.for_model("llama", **{**kwargs, **overrides})


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """A 'downloaded' tiny Llama in several safetensors files."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_llama()).save_pretrained(path, max_shard_size="200KB")
    assert len([n for n in os.listdir(path) if n.endswith(".safetensors")]) > 2
    return str(path)


def _settings(folder: str, *extra: str):
    from packtune.config import load_settings

    return load_settings(CONFIG, [f"pretrained_model_name_or_path={folder!r}", "model_config=None",
                                  "tokenizer_name_or_path='packtune://mistral-v1'", *extra])


def _resident_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
def test_skeleton_takes_no_resident_memory():
    from transformers import AutoModelForCausalLM

    from packtune.recipe.engines.construction import skeleton

    config = _llama(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                    num_key_value_heads=16, vocab_size=32000, tie_word_embeddings=True)
    before = _resident_mb()
    model = skeleton(config, torch.float32)
    size = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    grown = _resident_mb() - before
    assert size > 300 and grown < 0.1 * size, f"a {size:.0f} MB skeleton took {grown:.0f} MB"
    assert model.lm_head.weight is model.model.embed_tokens.weight, "tied weights stay tied"
    assert all(p.device.type == "cpu" and p.is_contiguous() for p in model.parameters())
    # Buffers are real: the rotary frequencies are those of a model built as usual.
    reference = AutoModelForCausalLM.from_config(_llama())
    small = skeleton(_llama(), torch.float32)
    assert torch.equal(small.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)


def test_checkpoints_that_cannot_stream_say_why(folder, tmp_path, caplog):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from packtune.recipe.engines.construction import stream_source

    env = DistEnv()
    caplog.set_level(logging.INFO, logger="packtune")
    files = stream_source(_settings(folder), env, "FSDP2", "whole")
    assert files is not None and len({s.path for s in files.values()}) > 2 and "model.embed_tokens.weight" in files

    bin_folder = tmp_path / "bin"  # weights as pytorch_model.bin (transformers 5 writes only safetensors)
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.config.save_pretrained(bin_folder)
    torch.save(model.state_dict(), bin_folder / "pytorch_model.bin")
    assert stream_source(_settings(str(bin_folder)), env, "FSDP2", "whole") is None
    assert "not in safetensors files" in caplog.text

    renamed = tmp_path / "renamed"
    AutoModelForCausalLM.from_pretrained(folder).save_pretrained(renamed)
    state = load_file(renamed / "model.safetensors")
    state["model.norm.gamma"] = state.pop("model.norm.weight")
    save_file(state, renamed / "model.safetensors", metadata={"format": "pt"})
    assert stream_source(_settings(str(renamed)), env, "FSDP2", "whole") is None
    assert "names its tensors differently (no model.norm.weight)" in caplog.text

    from packtune.config import load_settings

    assert stream_source(load_settings(CONFIG, []), env, "FSDP2", "whole") is None
    assert "random-init model has no checkpoint" in caplog.text


@pytest.fixture
def group_of_one():
    from packtune.distributed import cleanup, ensure_process_group

    env = DistEnv()
    ensure_process_group(env)
    yield env
    cleanup()


@pytest.mark.parametrize("lora", [False, True])
def test_fsdp_streamed_weights_equal_a_plain_load(folder, group_of_one, lora):
    """Skeleton + LoRA + fully_shard + streamed weights == from_pretrained + LoRA, tensor for
    tensor (the adapters' seeded init included), and the leak check passes through the engine."""
    from packtune.modeling import check_no_leak
    from packtune.recipe.engines.construction import StreamedWeights, hf_config, skeleton
    from packtune.recipe.engines.fsdp import FSDPEngine
    from packtune.recipe.model_setup import base_dtype, build_model
    from packtune.recipe.sharded_read import checkpoint_sources

    settings = _settings(folder, *(["lora={'r': 4}"] if lora else []), "gradient_checkpointing=True")
    env = group_of_one
    torch.manual_seed(settings.seed)
    plain = build_model(settings, env.device, torch.float32)
    torch.manual_seed(settings.seed)
    base = skeleton(hf_config(settings), base_dtype(settings, torch.float32))
    weights = StreamedWeights(base, checkpoint_sources(folder))
    assert not weights.missing
    model = build_model(settings, env.device, torch.float32, base=base, leak_check=False)
    engine = FSDPEngine(model, env, settings, total_steps=2, compute_dtype=torch.float32, weights=weights)
    got = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in engine.model.state_dict().items()}
    want = plain.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    assert any("lora_A" in k for k in want) == lora
    check_no_leak(engine.unwrapped())


def test_zero3_partition_reads_cover_every_element(tmp_path, monkeypatch):
    """Each rank's block-wise read of its ZeRO-3 partition (``ds_tensor``: elements
    ``[r * P, (r + 1) * P)`` of the flattened tensor, the last padded), for shapes and rank
    counts that do not divide evenly and blocks smaller than a partition: together, the tensor.
    The same for a part of a fused tensor (rows picked out of order, as InternLM2's ``wqkv``)."""
    deepspeed = pytest.importorskip("deepspeed")
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from packtune.recipe.sharded_read import Source, read_partition

    tensors = {"w": torch.arange(7 * 13, dtype=torch.float32).reshape(7, 13), "v": torch.arange(10, dtype=torch.float32),
               "one": torch.tensor([3.0])}
    path = str(tmp_path / "t.safetensors")
    save_file(tensors, path)
    rows = torch.tensor([5, 6, 0, 1, 3])  # a fused part: runs of original rows
    cases = [(Source(path, k, tuple(t.shape)), t) for k, t in tensors.items()]
    cases.append((Source(path, "w", (7, 13), rows), tensors["w"][rows]))
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:  # a fused part is read run by run, never joined into one block
        pieces = [(first, piece.clone()) for first, piece in cases[-1][0].pieces(f, 0, 5)]
    assert [(first, len(piece)) for first, piece in pieces] == [(0, 2), (2, 2), (4, 1)]
    assert torch.equal(torch.cat([piece for _, piece in pieces]), tensors["w"][rows])
    for source, tensor in cases:
        for world, block in itertools.product((1, 2, 3, 4), (3 * 4, 2 * 13 * 4, 1 << 20)):  # a few rows per block, or all
            size = -(-tensor.numel() // world)
            parts = []
            for rank in range(world):
                monkeypatch.setattr(deepspeed.comm, "get_rank", lambda group=None, r=rank: r)
                param = SimpleNamespace(ds_tensor=torch.full((size,), -1.0), ds_numel=tensor.numel(), ds_shape=tensor.shape,
                                        ds_process_group=None)
                read_partition(param, source, block_bytes=block)
                parts.append(param.ds_tensor)
            flat = torch.cat(parts)
            assert torch.equal(flat[: tensor.numel()], tensor.reshape(-1)), (source.key, world, block)
            assert not flat[tensor.numel():].any(), "the padding is zero"


def test_fsdp_units_for_untied_embeddings_only():
    from transformers import AutoModelForCausalLM

    from packtune.recipe.engines.fsdp import embedding_units

    untied = AutoModelForCausalLM.from_config(_llama())
    assert embedding_units(untied) == [untied.model.embed_tokens, untied.lm_head]
    tied = AutoModelForCausalLM.from_config(_llama(tie_word_embeddings=True))
    assert embedding_units(tied) == [], "tied weights stay in one unit"


def test_a_ported_hub_id_streams_from_its_download(tmp_path, monkeypatch, group_of_one):
    """A ported family given as a hub id streams from its download, as a native hub id does
    (here found offline in a Hugging Face cache folder): the snapshot's safetensors, under the
    native class's names (``wqkv`` sliced), the snapshot as the record's source (its code and
    tokenizer files are what ``save_model(format="original")`` copies). An id that cannot be
    fetched is left to the whole load, which says why."""
    import huggingface_hub.constants as hub
    from ports_reference import write_hub_cache

    from packtune.ports.detect import META
    from packtune.recipe.engines import model_construction
    from packtune.recipe.engines.construction import ported_hub_folder

    snapshot = write_hub_cache(tmp_path, "packtune-test/tiny-internlm2", "internlm2")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    settings = _settings("packtune-test/tiny-internlm2")
    with model_construction("fsdp", settings, group_of_one, torch.float32) as construction:
        assert construction.how == "fsdp_stream"
        sources = construction.weights.sources
        assert {os.path.dirname(s.path) for s in sources.values()} == {snapshot}
        assert sources["model.layers.0.self_attn.k_proj.weight"].key == "model.layers.0.attention.wqkv.weight"
        assert sources["model.layers.0.self_attn.k_proj.weight"].rows is not None
        assert getattr(construction.base.config, META)["source"] == snapshot
    assert ported_hub_folder(_settings("packtune-test/not-in-the-cache"), group_of_one) is None
