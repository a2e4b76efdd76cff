"""Converting preference checkpoints (issue 17, Workflow: Convert).

* A reward checkpoint (full, and LoRA merged: its ``score`` head trains in full) converts to a
  folder that a fresh Python without packtune loads with ``AutoModelForSequenceClassification``;
  on a right-padded batch the folder's rewards equal the scores training read from the packed
  row, at each completion's end-of-turn. Unmerged, a reward LoRA adapter is refused in one line
  naming the fix (``--merge``): it would need a sequence-classification base that no published
  checkpoint is.
* A DPO checkpoint converts like an SFT one: the folder holds the trained weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_ran, launch_env, run_command

from packtune.cli.main import main
from packtune.convert import REWARD_ADAPTER_MERGE_ONLY

CONFIG = "tiny_mistral_dpo_demo"
COMMON = ["max_steps=2", "log_steps=1", "save_steps=100", "max_samples=32", "max_length=128", "lr=1e-2"]
REWARD = ["method='reward'", "beta=0.1", "evaluation_inputs=[]"]

FRESH = r"""
import json, sys
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
folder, seqs = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
batch = tok.pad({"input_ids": seqs}, return_tensors="pt")  # right padding, the folder's own pad
with torch.no_grad():
    rewards = model(**batch).logits[:, 0].tolist()
print(json.dumps({"rewards": rewards, "packtune_loaded": any(m.split(".")[0] == "packtune" for m in sys.modules)}))
"""


def _train(work: str, options: list[str], cache: str) -> str:
    cmd = [sys.executable, "-m", "packtune", "train", CONFIG, "--work-dir", work, "--cfg-options", *options]
    rc, out, _ = run_command(cmd, launch_env(cache))
    assert_ran(rc, out, "packtune train")
    return os.path.join(work, "iter_2.pth")


def _trained_scores(options: list[str], pth: str):
    """The first packs' sequences and the rewards training reads for them (the packed row)."""
    from packtune.config import load_settings
    from packtune.data import DataOptions, load_tokenizer
    from packtune.preference.data import build_preference_dataset
    from packtune.preference.objective import Objective
    from packtune.preference.step import collate_pairs, row_layout, sequence_scores
    from packtune.recipe.checkpoint import load_trainable_state
    from packtune.recipe.model_setup import build_model
    from packtune.convert import read_checkpoint

    settings = load_settings(CONFIG, options)
    model = build_model(settings, torch.device("cpu"), torch.float32)
    load_trainable_state(model, read_checkpoint(pth))
    model.eval()
    dataset = build_preference_dataset(DataOptions.from_settings(settings), load_tokenizer(settings.tokenizer_name_or_path))
    batch = collate_pairs([dataset[i] for i in range(min(3, len(dataset)))])
    with torch.no_grad():
        scores = sequence_scores(model, batch, row_layout(batch), Objective("reward"), torch.float32, None, None)
    cu = batch.cu_seqlens.tolist()
    seqs = [batch.input_ids.view(-1)[cu[i]:cu[i + 1]].tolist() for i in range(2 * batch.pairs)]
    return seqs, scores.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora_merged"])
def test_reward_checkpoint_loads_without_packtune(lora, tmp_path, monkeypatch, capsys):
    cache = str(tmp_path / "cache")
    monkeypatch.setenv("PACKTUNE_CACHE", cache)
    options = [*COMMON, *REWARD, *(["lora={'r': 4, 'dropout': 0.0}"] if lora else [])]
    pth = _train(str(tmp_path / "work"), options, cache)
    folder = str(tmp_path / "hf")
    if lora:  # unmerged, the adapter is refused in one line that names the fix
        capsys.readouterr()
        assert main(["convert", "pth_to_hf", CONFIG, pth, str(tmp_path / "adapter"), "--cfg-options", *options]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"packtune convert: error: {REWARD_ADAPTER_MERGE_ONLY}" and "\n" not in err
        assert err.endswith("add --merge") and not (tmp_path / "adapter").exists()
    assert main(["convert", "pth_to_hf", CONFIG, pth, folder, *(["--merge"] if lora else []), "--cfg-options", *options]) == 0
    assert json.load(open(os.path.join(folder, "config.json")))["architectures"] == ["MistralForSequenceClassification"]
    seqs, want = _trained_scores(options, pth)
    assert len({len(s) for s in seqs}) > 1  # different lengths: the batch is padded
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # packtune is not on the path
    proc = subprocess.run([sys.executable, "-c", FRESH, folder, json.dumps(seqs)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["packtune_loaded"] is False
    assert got["rewards"] == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert max(want) - min(want) > 1e-3  # the trained head tells the sequences apart
    if not lora:
        # The folder trains on as a reward model with its own head (not a new one from `seed`).
        from safetensors.torch import load_file

        from packtune.config import load_settings
        from packtune.recipe.model_setup import load_base_model

        again = load_settings(CONFIG, [*options, f"pretrained_model_name_or_path={folder!r}", "model_config=None",
                                       "tokenizer_name_or_path=None", "seed=7"])
        model = load_base_model(again, torch.device("cpu"))
        saved = load_file(os.path.join(folder, "model.safetensors"))
        assert type(model).__name__ == "MistralForSequenceClassification"
        assert torch.equal(model.score.weight, saved["score.weight"])


@pytest.mark.slow
def test_dpo_checkpoint_converts_like_sft(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from packtune.convert import read_checkpoint

    cache = str(tmp_path / "cache")
    monkeypatch.setenv("PACKTUNE_CACHE", cache)
    options = [*COMMON, "evaluation_inputs=[]"]
    pth = _train(str(tmp_path / "work"), options, cache)
    folder = str(tmp_path / "hf")
    assert main(["convert", "pth_to_hf", CONFIG, pth, folder, "--cfg-options", *options]) == 0
    state = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    trained = read_checkpoint(pth)
    assert set(trained) <= set(state)
    assert all(torch.equal(state[k], v.to(state[k].dtype)) for k, v in trained.items())
