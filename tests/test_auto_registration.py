"""``import packtune`` makes transformers' Auto classes know packtune's ``baichuan_alibi``: a
Baichuan-13B saved with ``save_model(..., format="native")`` loads in a fresh process with
exactly ``import packtune`` and ``AutoModelForCausalLM.from_pretrained(out)``, and gives the
logits of the model that saved it. ``import packtune`` itself still imports neither torch nor
transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from ports_reference import write_checkpoint

from packtune.ports.api import load_model, save_model
from packtune.ports.detect import find_port

FRESH = """
import json, sys
import packtune
assert "transformers" not in sys.modules and "torch" not in sys.modules, "import packtune stays cheap"
from transformers import AutoModelForCausalLM
import torch
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(ids).logits
print(json.dumps({"class": type(model).__name__, "logits": logits.tolist()}))
"""


def test_native_baichuan_13b_loads_after_import_packtune_in_a_fresh_process(tmp_path):
    write_checkpoint(tmp_path / "base", "baichuan2-13b")
    cfg_path = tmp_path / "base" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["z_loss_weight"]  # Baichuan-13B (v1): ALiBi, no NormHead
    cfg_path.write_text(json.dumps(cfg))
    assert find_port(cfg).label == "Baichuan-13B"
    model = load_model(tmp_path / "base")
    out = save_model(model, tmp_path / "native", format="native")
    assert json.loads((Path(out) / "config.json").read_text())["model_type"] == "baichuan_alibi"

    ids = [[3, 17, 9, 40, 5, 22, 8]]
    with torch.no_grad():
        expected = model(torch.tensor(ids)).logits
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-c", FRESH, out, json.dumps(ids)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["class"] == "BaichuanAlibiForCausalLM"
    torch.testing.assert_close(torch.tensor(got["logits"]), expected, rtol=1e-5, atol=1e-5)
