"""One process of the sharded-load test (run by torchrun, gloo on the CPU).

    python -m torch.distributed.run --nproc_per_node=2 tests/sharded_weights_worker.py OUT ENGINE FOLDER...

For each checkpoint folder, under ENGINE (``zero3`` or ``fsdp``): the model is built the way
``packtune train`` builds it (``model_construction``, then ``build_model`` on the skeleton;
FSDP2 then ``fully_shard`` and the streamed read), each rank reading only its own part. Then
every parameter is gathered with the engine's own collective (DeepSpeed's
``GatheredParameters``, DTensor's ``full_tensor``) and compared, bit for bit, with what one
process loads (``packtune.load_model``). Each rank writes ``OUT/rank<r>.json``: per folder, how
it was built and the keys that differ (none, when it works).
"""

from __future__ import annotations

import json
import os
import sys

import torch


def gathered_state(construction, model, env, settings) -> dict[str, torch.Tensor]:
    if construction.how == "zero3_stream":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {k: v.detach().clone() for k, v in model.state_dict().items()}
    from packtune.recipe.engines.fsdp import FSDPEngine

    engine = FSDPEngine(model, env, settings, total_steps=1, compute_dtype=torch.float32, weights=construction.weights)
    state = engine.model.state_dict()
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in state.items()}


def main() -> None:
    out, engine, folders = sys.argv[1], sys.argv[2], sys.argv[3:]
    from packtune import load_model
    from packtune.config import load_settings
    from packtune.distributed import init_distributed
    from packtune.recipe.model_setup import build_model
    from packtune.recipe.engines import model_construction

    env = init_distributed("pytorch")
    kind, ds = {"zero3": ("deepspeed", "deepspeed_zero3"), "fsdp": ("fsdp", None)}[engine]
    report = {}
    for folder in folders:
        settings = load_settings("tiny_llama_full_demo", [f"pretrained_model_name_or_path={folder!r}", "model_config=None",
                                                          "tokenizer_name_or_path='packtune://mistral-v1'", "dtype='float32'"])
        with model_construction(kind, settings, env, torch.float32, ds) as construction:
            model = build_model(settings, env.device, torch.float32, base=construction.base, leak_check=False)
            got = gathered_state(construction, model, env, settings)
        want = {k: v.detach() for k, v in load_model(folder).state_dict().items()}
        differ = sorted(k for k in want if k not in got or got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k]))
        report[folder] = {"how": construction.how, "keys": len(want), "extra": sorted(set(got) - set(want)), "differ": differ}
    with open(os.path.join(out, f"rank{env.rank}.json"), "w") as f:
        json.dump(report, f)
    from packtune.distributed import cleanup

    cleanup()


if __name__ == "__main__":
    main()
