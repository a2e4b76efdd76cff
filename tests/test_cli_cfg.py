"""The CLI skeleton (packtune.cli.main) with list-cfg and copy-cfg, run in-process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from packtune.cli import main as cli
from packtune.cli.main import main
from packtune.config import config_source, list_configs

FAKE = '''\
"""A command for the tests: each --mode exercises one error path of main()."""
from packtune.cli import add_config_arguments
from packtune.cli.errors import CliError
from packtune.config import ConfigError, Problem, load_settings

HELP = "A fake command."
EXAMPLES = ["packtune fake tiny_mistral_full_demo", "packtune fake x --mode boom"]

def add_arguments(parser):
    add_config_arguments(parser)
    parser.add_argument("--mode", choices=["ok", "cli", "config", "one", "boom", "multiline"], default="ok")

def run(args):
    if args.mode == "cli":
        raise CliError("something the user can fix")
    if args.mode == "config":
        load_settings(args.config, args.cfg_options)
    if args.mode == "one":
        raise ConfigError([Problem("x", "one problem", "do this")])
    if args.mode == "boom":
        raise RuntimeError("kaput")
    if args.mode == "multiline":
        raise ValueError("first\\nsecond")
    print("ran", args.config, args.cfg_options)
    return 0
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Register a `fake` command (and a `broken` one whose module raises on import)."""
    (tmp_path / "fake_cmd.py").write_text(FAKE)
    (tmp_path / "broken_cmd.py").write_text("raise ImportError('needs a package that is missing')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "fake", "fake_cmd")
    monkeypatch.setitem(cli.COMMANDS, "broken", "broken_cmd")
    monkeypatch.setitem(cli.COMMANDS, "absent", "packtune.cli.no_such_module")


def run(capsys, *argv: str) -> tuple[int, str, list[str]]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


# --- list-cfg ------------------------------------------------------------------------------

def test_list_cfg_prints_every_name_sorted(capsys):
    code, out, err = run(capsys, "list-cfg")
    assert code == 0 and err == []
    assert out.splitlines() == list_configs() and out.splitlines() == sorted(out.splitlines())


def test_list_cfg_pattern_is_case_insensitive(capsys):
    code, out, _ = run(capsys, "list-cfg", "-p", "TINY")
    assert code == 0 and out.splitlines() == list_configs("tiny") and "tiny_mistral_full_demo" in out
    code, out, _ = run(capsys, "list-cfg", "--pattern", "internlm2_7b_full")
    assert out.splitlines() == ["internlm2_7b_full_alpaca_e3", "internlm2_7b_full_oasst1_e3"]


def test_list_cfg_no_match_is_one_line_exit_1(capsys):
    code, out, err = run(capsys, "list-cfg", "-p", "gpt5")
    assert code == 1 and out == "" and len(err) == 1
    assert err[0].startswith("packtune list-cfg: error: no built-in config name contains 'gpt5'")


# --- copy-cfg ------------------------------------------------------------------------------

def test_copy_cfg_writes_name_copy_py_and_creates_dir(capsys, tmp_path):
    dest_dir = tmp_path / "new" / "dir"
    code, out, err = run(capsys, "copy-cfg", "tiny_mistral_full_demo", str(dest_dir))
    dest = dest_dir / "tiny_mistral_full_demo_copy.py"
    assert code == 0 and err == [] and dest.read_text() == config_source("tiny_mistral_full_demo")
    assert str(dest) in out and f"packtune train {dest}" in out


def test_the_worked_example_list_then_copy_an_internlm_config(capsys, tmp_path, monkeypatch):
    # The seed's worked example: list-cfg -p internlm, then copy-cfg NAME . (into the cwd).
    code, out, _ = run(capsys, "list-cfg", "-p", "internlm")
    assert code == 0 and "internlm_7b_full_oasst1_e3" in out.splitlines()
    assert all("internlm" in line for line in out.splitlines())
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "copy-cfg", "internlm_7b_full_oasst1_e3", ".")
    dest = tmp_path / "internlm_7b_full_oasst1_e3_copy.py"
    assert code == 0 and err == [] and dest.is_file()
    text = dest.read_text()
    assert "use_varlen_attn = True  # exact per-sample attention inside packed rows" in text.splitlines()
    assert "pretrained_model_name_or_path = 'internlm/internlm-7b'" in text and text == config_source("internlm_7b_full_oasst1_e3")


def test_copy_cfg_refuses_to_overwrite_without_force(capsys, tmp_path):
    assert run(capsys, "copy-cfg", "tiny_llama_lora_demo", str(tmp_path))[0] == 0
    dest = tmp_path / "tiny_llama_lora_demo_copy.py"
    dest.write_text("# my edits\n")
    code, _, err = run(capsys, "copy-cfg", "tiny_llama_lora_demo", str(tmp_path))
    assert code == 2 and len(err) == 1 and "already exists; pass --force to overwrite it" in err[0]
    assert dest.read_text() == "# my edits\n"
    assert run(capsys, "copy-cfg", "tiny_llama_lora_demo", str(tmp_path), "--force")[0] == 0
    assert dest.read_text() != "# my edits\n"


def test_copy_cfg_unknown_name_suggests_closest(capsys, tmp_path):
    code, out, err = run(capsys, "copy-cfg", "llama2_7b_lora_alpaka_e3", str(tmp_path))
    assert code == 2 and out == "" and len(err) == 1
    assert err[0].startswith("packtune copy-cfg: error: no built-in config named 'llama2_7b_lora_alpaka_e3'")
    assert "did you mean llama2_7b_lora_alpaca_e3" in err[0] and "packtune list-cfg" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_copy_cfg_dir_that_is_a_file(capsys, tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    code, _, err = run(capsys, "copy-cfg", "tiny_llama_full_demo", str(target))
    assert code == 2 and len(err) == 1 and "is a file, not a folder" in err[0]


# --- help -----------------------------------------------------------------------------------

def test_main_help_lists_commands_with_examples(capsys):
    code, out, err = run(capsys, "--help")
    assert code == 0 and err == []
    assert "list-cfg" in out and "copy-cfg" in out and "workflow:" in out
    assert "packtune list-cfg -p tiny" in out and "packtune copy-cfg tiny_mistral_full_demo ." in out


@pytest.mark.parametrize("command, example", [
    ("list-cfg", "packtune list-cfg -p qwen2_5"),
    ("copy-cfg", "packtune copy-cfg llama2_7b_lora_alpaca_e3 ./my_configs"),
])
def test_command_help_shows_examples(capsys, command, example):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and "examples:" in out and example in out and f"usage: packtune {command}" in out


def test_help_survives_missing_and_broken_command_modules(capsys, fake):
    code, out, err = run(capsys, "--help")
    assert code == 0 and err == []
    assert "A fake command." in out and "packtune fake tiny_mistral_full_demo" in out
    assert "broken       (cannot be loaded: ImportError: needs a package that is missing)" in out
    assert "absent" not in out


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("packtune ")


# --- usage errors: one line, exit 2 ------------------------------------------------------------

@pytest.mark.parametrize("argv, line", [
    ([], "packtune: error: missing command; one of: list-cfg, copy-cfg"),
    (["lst-cfg"], "packtune: error: unknown command 'lst-cfg'; did you mean 'list-cfg'?"),
    (["list-cfg", "--bogus"], "packtune list-cfg: error: unrecognized arguments: --bogus (see packtune list-cfg --help)"),
    (["list-cfg", "-p"], "packtune list-cfg: error: argument -p/--pattern: expected one argument (see packtune list-cfg --help)"),
    (["copy-cfg", "x"], "packtune copy-cfg: error: the following arguments are required: DIR (see packtune copy-cfg --help)"),
    (["--nope", "list-cfg"], "packtune: error: unrecognized arguments: --nope (see packtune --help)"),
])
def test_argparse_errors_are_one_line_exit_2(capsys, argv, line):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and len(err) == 1, err
    assert err[0].startswith(line), err[0]


def test_missing_config_argument_names_the_command(capsys, fake):
    code, _, err = run(capsys, "fake")
    assert code == 2 and err == [
        "packtune fake: error: the following arguments are required: CONFIG (see packtune fake --help)"]


def test_bad_choice_is_one_line(capsys, fake):
    code, _, err = run(capsys, "fake", "x", "--mode", "nope")
    assert code == 2 and len(err) == 1
    assert err[0].startswith("packtune fake: error: argument --mode: invalid choice: 'nope'")


def test_command_whose_module_is_absent(capsys, fake):
    code, _, err = run(capsys, "absent")
    assert code == 2 and err == [
        "packtune: error: command 'absent' is not available: its module packtune.cli.no_such_module is not installed"]


def test_command_whose_module_is_broken(capsys, fake):
    code, _, err = run(capsys, "broken", "x")
    assert code == 1 and err == [
        "packtune broken: error: the command cannot be loaded: ImportError: needs a package that is missing"]


# --- errors raised by commands ------------------------------------------------------------------

def test_command_runs_with_cfg_options(capsys, fake):
    code, out, _ = run(capsys, "fake", "tiny_mistral_full_demo", "--cfg-options", "lr=1e-4", "lora.r=4")
    assert code == 0 and out.strip() == "ran tiny_mistral_full_demo ['lr=1e-4', 'lora.r=4']"


def test_cli_error_is_one_line_exit_2(capsys, fake):
    code, out, err = run(capsys, "fake", "x", "--mode", "cli")
    assert code == 2 and out == "" and err == ["packtune fake: error: something the user can fix"]


def test_unknown_config_name_is_one_line_exit_2(capsys, fake):
    code, _, err = run(capsys, "fake", "tiny_mistral_ful_demo", "--mode", "config")
    assert code == 2 and len(err) == 1
    assert err[0].startswith("packtune fake: error: no built-in config named 'tiny_mistral_ful_demo'")
    assert "did you mean tiny_mistral_full_demo" in err[0]


def test_config_problems_are_listed_one_per_line_exit_2(capsys, fake):
    code, _, err = run(capsys, "fake", "tiny_mistral_full_demo", "--mode", "config", "--cfg-options",
                       "batch_size=4.0", "use_varlen_atn=False", "pack_to_max_length=False")
    assert code == 2
    assert err[0] == "packtune fake: error: config 'tiny_mistral_full_demo' has 3 problems:"
    assert len(err) == 4 and all(line.startswith("  - ") and "fix: " in line for line in err[1:])
    assert any("did you mean `use_varlen_attn`?" in line for line in err)


def test_single_config_problem_is_one_line(capsys, fake):
    code, _, err = run(capsys, "fake", "x", "--mode", "one")
    assert code == 2 and err == ["packtune fake: error: one problem; fix: do this"]


def test_unexpected_exception_is_one_line_exit_1(capsys, fake):
    code, _, err = run(capsys, "fake", "x", "--mode", "boom")
    assert code == 1 and len(err) == 1
    assert err[0] == "packtune fake: error: RuntimeError: kaput (run 'packtune --debug fake ...' for the traceback)"
    code, _, err = run(capsys, "fake", "x", "--mode", "multiline")
    assert code == 1 and len(err) == 1 and "ValueError: first second" in err[0]


@pytest.mark.parametrize("argv", [["--debug", "fake", "x", "--mode", "boom"], ["fake", "x", "--mode", "boom", "--debug"]])
def test_debug_prints_the_traceback(capsys, fake, argv):
    code, _, err = run(capsys, *argv)
    assert code == 1 and "Traceback (most recent call last):" in "\n".join(err)
    assert err[-1] == "packtune fake: error: RuntimeError: kaput"


@pytest.mark.slow  # a fresh interpreter imports torch and transformers
def test_python_dash_m_packtune(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "packtune", "copy-cfg", "tiny_mistral_ful_demo", str(tmp_path)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("packtune copy-cfg: error: no built-in config named 'tiny_mistral_ful_demo'")
    assert "did you mean tiny_mistral_full_demo" in proc.stderr


def test_missing_config_file_is_one_line(capsys, fake, tmp_path):
    code, _, err = run(capsys, "fake", str(tmp_path / "mine.py"), "--mode", "config")
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"packtune fake: error: config file {str(tmp_path / 'mine.py')!r} does not exist; fix: ")


def test_top_level_help_before_a_command_lists_every_command(capsys):
    code, out, _ = run(capsys, "--help", "copy-cfg")
    assert code == 0 and "list-cfg" in out and "copy-cfg" in out and "workflow:" in out
