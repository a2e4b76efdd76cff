"""``packtune log-dataset``, run in-process: the report, ``--show`` with trained text marked,
``--plot`` writing a real PNG, ``--json``, and one-line errors."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest

from packtune.cli.main import main
from packtune.data import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture
def env(tmp_path_factory, tmp_path, monkeypatch):
    """PACKTUNE_CACHE shared by the tests (the tokenizer is converted once); a fresh data cache."""
    cache = tmp_path_factory.getbasetemp() / "tokcache"
    load_tokenizer("packtune://mistral-v1", cache_dir=cache)
    monkeypatch.setenv("PACKTUNE_CACHE", str(cache))
    return tmp_path


def write_config(folder: Path, **settings) -> str:
    values = dict(
        dataset=[str(FIXTURES / "alpaca.json"), str(FIXTURES / "sharegpt.json")],
        tokenizer_name_or_path="packtune://mistral-v1",
        model_config=dict(model_type="mistral", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=128, vocab_size=32000),
        prompt_template="chatml",
        max_length=128,
        data_cache_dir=str(folder / "datacache"),
    )
    values.update(settings)
    path = folder / "cfg.py"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in values.items()))
    return str(path)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_show_and_plot(env, capsys):
    cfg = write_config(env)
    png = env / "out" / "packs.png"
    assert main(["log-dataset", cfg, "--show", "2", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"samples read +19\n +kept +7\n +skipped +12\n", out)
    assert "missing_field" in out and "ends_with_tool" in out
    for word in ("tokens", "truncated", "dropped", "packs", "utilization", "docs per pack", "tokens/s"):
        assert word in out
    assert out.count("=== pack ") == 2 and "--- document 1/" in out
    assert "«" in out and "»" in out and "<|im_end|>»" in out  # trained text marked, end-of-turn included
    assert "«<|im_start|>user" not in out  # user turns are not marked
    assert f"wrote {png}" in out
    width, height = png_size(png)
    assert 800 <= width <= 4000 and 600 <= height <= 4000
    assert 20_000 < png.stat().st_size < 5_000_000


def test_second_run_reports_a_cache_hit(env, capsys):
    cfg = write_config(env)
    assert main(["log-dataset", cfg]) == 0
    assert re.search(r"\ncache +built", capsys.readouterr().out)
    assert main(["log-dataset", cfg]) == 0
    assert re.search(r"\ncache +hit", capsys.readouterr().out)


def test_json_report_and_cfg_options(env, capsys):
    cfg = write_config(env)
    assert main(["log-dataset", cfg, "--json", "--cfg-options", "max_length=64", "pack_strategy=sequential"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_length"] == 64 and report["strategy"] == "sequential"
    assert report["samples_read"] == report["kept"] + sum(report["skipped"].values())


def test_errors_are_one_line(env, capsys):
    cfg = write_config(env, dataset=str(env / "missing.jsonl"))
    assert main(["log-dataset", cfg]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("packtune log-dataset: error:") and "no such file" in err and "\n" not in err
    cfg = write_config(env, dataset=str(FIXTURES / "malformed.jsonl"))
    assert main(["log-dataset", cfg]) == 2
    assert "malformed.jsonl, line 3: not valid JSON" in capsys.readouterr().err


def test_help_has_examples(capsys):
    assert main(["log-dataset", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--show N" in out and "--plot FILE.png" in out and "packtune log-dataset tiny_mistral_full_demo" in out
