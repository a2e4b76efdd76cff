"""How a distributed run ends when it fails: the launcher's last line and exit code.

Under ``NPROC_PER_NODE`` packtune is torchrun's agent itself (``run_under_torchrun``): a
configuration, data or setup error ends the launcher with that one line last and exit code 2,
without torchrun's ``ChildFailedError`` traceback; any other failure exits 1 with the first
failing rank's error last (``test_elastic_resume.py`` runs that case, a rank raising at a step).
Under slurm there is no launcher of packtune's: every task ends with the same line and code,
because a data error on the main rank is raised on every rank. A built-in DeepSpeed name wins
over a path of the same name, and a path must be a JSON file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from helpers import has_deepspeed

from packtune.distributed import failure_summary, free_port, record_failure

CONFIG = "tiny_mistral_full_demo"
TIMEOUT = 240
_LAUNCH_VARS = ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "ADDR", "PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PACKTUNE_DEBUG_RAISE", "TORCHELASTIC_ERROR_FILE")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu")
    env.update(extra)
    return env


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    """Three good rows and one without its output: with on_bad_row='error', a data error."""
    folder = tmp_path_factory.mktemp("bad")
    rows = [{"instruction": f"Say {w}", "input": "", "output": w} for w in ("one", "two", "three")]
    rows.append({"instruction": "no output field"})
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = ["max_steps=2", "batch_size=1", "max_length=128", "evaluation_inputs=[]", f"dataset={path}", "on_bad_row=error"]
    expected = f"packtune train: error: {path}, line 4: bad row (missing_field: no 'output'); " \
               "set on_bad_row = 'skip' to skip and count such rows"
    return SimpleNamespace(options=options, line=expected)


@pytest.mark.slow
def test_nproc_per_node_data_error_ends_with_one_line_and_exit_2(bad_data, tmp_path):
    cmd = [sys.executable, "-m", "packtune", "train", CONFIG, "--work-dir", str(tmp_path / "work"),
           "--cfg-options", *bad_data.options]
    proc = subprocess.run(cmd, env=_env(NPROC_PER_NODE="2", PACKTUNE_CACHE=str(tmp_path / "cache")),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)
    out = proc.stdout
    assert proc.returncode == 2, out[-3000:]
    assert _last_line(out) == bad_data.line, out[-3000:]
    assert "Traceback" not in out and "ChildFailedError" not in out, out[-3000:]
    # Both ranks failed with it (rank 1 got it from rank 0), not with a broken connection.
    assert "rank 1 of 2 failed: DataError" in out and "Connection closed" not in out, out[-3000:]


@pytest.mark.slow
def test_slurm_tasks_end_with_the_data_error_and_exit_2(bad_data, tmp_path):
    """Two tasks as ``srun`` starts them (``SLURM_*``, ``--launcher slurm``): rank 0 meets the bad
    row while rank 1 waits for its data; each task ends with that line last and exit code 2."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = _env(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_JOB_NODELIST="localhost",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, PACKTUNE_CACHE=str(tmp_path / "cache"))
        cmd = [sys.executable, "-m", "packtune", "train", CONFIG, "--work-dir", str(tmp_path / "work"), "--launcher", "slurm",
               "--cfg-options", *bad_data.options]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    for rank, (proc, out) in enumerate(zip(procs, outs)):
        assert proc.returncode == 2, f"task {rank}:\n{out[-3000:]}"
        assert _last_line(out) == bad_data.line, f"task {rank}:\n{out[-3000:]}"


# --- the pieces, without processes ---------------------------------------------------------------


def _failure(time: float | None, exitcode: int = 1, line: str = "", error: str = "", code: int = 1, signal: str = "<N/A>"):
    data = {"packtune": {"line": line, "error": error, "exit_code": code, "world_size": 4, "time": time}} if time else {}
    return SimpleNamespace(error_file_data=data, timestamp=int(time or 99), exitcode=exitcode, signal_name=lambda: signal)


def test_failure_summary_picks_the_first_error():
    prog = "packtune train"
    # Rank 2 raised first; rank 0 then lost its connection to it.
    failures = {0: _failure(10.5, error="RuntimeError: Connection closed by peer"), 2: _failure(10.2, error="InjectedFault: boom")}
    assert failure_summary(failures, prog) == (1, "packtune train: error: rank 2 of 4 failed: InjectedFault: boom")
    # A configuration/data/setup error (exit 2): that very line, exit 2.
    line = "packtune train: error: the dataset has no trainable samples"
    failures = {1: _failure(3.0, exitcode=2, line=line, error="the dataset has no trainable samples", code=2),
                0: _failure(3.1, exitcode=2, line=line, code=2)}
    assert failure_summary(failures, prog) == (2, line)
    # Killed by a signal (no error file): named, exit 1.
    assert failure_summary({3: _failure(None, exitcode=-9, signal="SIGKILL")}, prog) == \
        (1, "packtune train: error: rank 3 was killed by SIGKILL (out of memory?)")
    code, text = failure_summary({1: _failure(None, exitcode=7)}, prog)
    assert code == 1 and "rank 1 exited with code 7" in text


def test_error_file_is_torchelastics_format(tmp_path):
    """What a worker writes, torch's own ``ProcessFailure`` reads (its message is the line)."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    path = tmp_path / "error.json"
    env = {"TORCHELASTIC_ERROR_FILE": str(path), "RANK": "1", "WORLD_SIZE": "2"}
    record_failure("packtune train: error: bad row", "bad row", 2, environ=env)
    failure = ProcessFailure(local_rank=1, pid=123, exitcode=2, error_file=str(path))
    assert failure.message == "packtune train: error: bad row"
    assert failure_summary({1: failure}, "packtune train") == (2, "packtune train: error: bad row")
    record_failure("ignored", "ignored", 1, environ={})  # no torchrun parent: nothing written, no error


def test_cli_reports_its_error_to_torchrun(tmp_path, monkeypatch):
    """A worker's ``packtune train`` that fails writes its one line and exit code for the agent."""
    from packtune.cli.main import main

    path = tmp_path / "error.json"
    for var in _LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    assert main(["train", CONFIG, "--work-dir", str(tmp_path / "w"), "--cfg-options", "batch_size=0"]) == 2
    record = json.loads(path.read_text())["packtune"]
    assert record["exit_code"] == 2 and record["line"].startswith("packtune train: error: ") and "batch_size" in record["line"]


@pytest.mark.skipif(not has_deepspeed(), reason="DeepSpeed is not installed")
def test_builtin_deepspeed_name_wins_over_a_path(tmp_path, monkeypatch):
    from packtune.recipe.engines.deepspeed_config import resolve_deepspeed_config, zero_stage

    monkeypatch.chdir(tmp_path)
    (tmp_path / "deepspeed_zero2").mkdir()  # `--work-dir deepspeed_zero2 --deepspeed deepspeed_zero2`
    (tmp_path / "deepspeed_zero3").write_text('{"zero_optimization": {"stage": 1}}')
    assert zero_stage(resolve_deepspeed_config("deepspeed_zero2")) == 2
    assert zero_stage(resolve_deepspeed_config("deepspeed_zero3")) == 3
    # Anything else is a path, and must be a JSON file.
    (tmp_path / "mine.json").write_text('{"zero_optimization": {"stage": 1}}')
    assert zero_stage(resolve_deepspeed_config("mine.json")) == 1
    (tmp_path / "work").mkdir()
    with pytest.raises(FileNotFoundError, match="work: a directory, not a built-in config"):
        resolve_deepspeed_config("work")
    (tmp_path / "notes.txt").write_text("zero 2 please")
    with pytest.raises(ValueError, match="not valid JSON"):
        resolve_deepspeed_config("notes.txt")
