"""A million samples: read, tokenized and packed in bounded memory (flat arrays, streamed
input, nothing held as per-row Python objects), and a second run is an instant cache hit.

Runs in a fresh interpreter so its peak memory is its own. A tiny word-level fast tokenizer
keeps the run short: what is measured is the pipeline, not a big vocabulary.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

N = 1_000_000

SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time
    from pathlib import Path

    import numpy as np
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from packtune.data import DataOptions, build_dataset

    n, folder = int(sys.argv[1]), Path(sys.argv[2])
    path = folder / "rows.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            if i % 100_000 == 7:
                f.write('{"instruction": "no output"}\\n')  # one bad row per 100k, counted
            else:
                f.write('{"instruction": "w%d w%d", "input": "", "output": "w%d"}\\n' % (i % 97, i % 13, i % 89))
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(100)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="</s>")
    opts = DataOptions(dataset=str(path), prompt_template="default", max_length=512, data_cache_dir=str(folder))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    ds = build_dataset(opts, tok)
    built_s = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    hit = build_dataset(opts, tok)
    hit_s = time.perf_counter() - t0
    s = ds.samples
    print(json.dumps({
        "report": ds.report.as_dict(), "built_s": built_s, "hit_s": hit_s, "hit": hit.report.cache_hit,
        "rss_before_mb": rss0 / 1024, "rss_peak_mb": rss1 / 1024,
        "array_mb": (s.input_ids.nbytes + s.labels.nbytes + s.offsets.nbytes) / 2**20,
        "types": [type(s.input_ids).__name__, str(s.input_ids.dtype), str(s.labels.dtype)],
        "hit_mmap": isinstance(hit.samples.input_ids, np.memmap) or isinstance(hit.samples.input_ids.base, np.memmap),
        "pack_ok": bool(len(hit[len(hit) - 1]["input_ids"]) > 0),
    }))
    """
)


@pytest.mark.slow
def test_a_million_samples_in_bounded_memory(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(N), str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    r = out["report"]
    print({k: v for k, v in out.items() if k != "report"}, {k: r[k] for k in ("packs", "utilization", "num_proc",
                                                                               "tokenize_tokens_per_s")})
    bad = len(range(7, N, 100_000))
    assert r["samples_read"] == N and r["skipped"] == {"missing_field": bad} and r["kept"] == N - bad
    assert r["packed"] == N - bad and r["packs"] <= r["min_packs"] * 1.01 + 1
    assert out["types"] == ["ndarray", "int32", "int32"]
    # Flat arrays of ids and offsets, and bounded extra memory: far from the gigabytes that a
    # million rows held as Python objects (dicts, lists of lists of ints) would take.
    assert out["rss_peak_mb"] - out["rss_before_mb"] < 500, out
    assert out["hit"] and out["hit_mmap"] and out["pack_ok"]
    assert out["hit_s"] < 5.0
