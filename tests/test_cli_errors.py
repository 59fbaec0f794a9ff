"""`spava-plan`'s one-line errors for what a user typed wrong: an unknown group option names its
group and lists the choices, an override Hydra cannot lex says how to quote it (and echoes no
terminal controls), a user's --config-dir is checked before Hydra reads it (malformed YAML, alias
bombs, FIFOs: refused at once, naming the file)."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spava_plan.hydra_conf import MAX_YAML_NODES, expanded_nodes


def spava_plan(args, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spava_plan.entry.cli", *args, "hydra.run.dir=out"], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def one_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spava-plan: error: ") and "Traceback" not in res.stderr, res.stderr
    assert all(c.isprintable() for c in lines[0]), repr(lines[0])  # no escape sequences reach the terminal
    return lines[0][len("spava-plan: error: "):]


@pytest.mark.parametrize("args, group, choice", [
    (["model=llama"], "model", "qwen2vl_2b"),
    (["method=flash"], "method", "zigzag_ring"),
    (["topology=tpu"], "topology", "h200"),
    (["tune=fast"], "tune", "latency"),
    (["solver=magic"], "solver", "local_search"),
    (["hydra/launcher=joblib"], "hydra/launcher", "basic"),
])
def test_an_unknown_group_option_names_its_group_and_the_choices(tmp_path, args, group, choice):
    line = one_line(spava_plan(args, tmp_path))
    option = args[0].split("=")[1]
    assert line.startswith(f"{group}: unknown {group} {option!r}; choose one of ") and choice in line, line
    assert "output directory" not in line and not (tmp_path / "out").exists()


def test_an_unknown_primary_config_names_config_name(tmp_path):
    line = one_line(spava_plan(["--config-name", "nope"], tmp_path))
    assert line.startswith("--config-name: unknown primary config 'nope'") and "output directory" not in line


@pytest.mark.parametrize("override, setting, hint", [
    ("model.name=é", "model.name", "model.name='é'"),
    ("model.name=it's", "model.name", "model.name=\"it's\""),
    ('gpus="4', "gpus", "gpus='\"4'"),
])
def test_an_override_that_needs_quotes_says_how(tmp_path, override, setting, hint):
    line = one_line(spava_plan([override], tmp_path))
    assert line.startswith(f"{setting}: cannot parse override ") and f"quoted for Hydra: {hint} " in line, line
    assert "Lexer" not in line


@pytest.mark.parametrize("override", ["model.name=\x1b[31mred", "gpus=\u202e3", "model.name=a\u200db"])
def test_terminal_controls_in_an_override_are_escaped(tmp_path, override):
    line = one_line(spava_plan([override], tmp_path))
    assert "\x1b" not in line and "\u202e" not in line and "\u200d" not in line and "Lexer" not in line
    assert "control or formatting character" in line


def test_the_quoted_form_the_hint_gives_parses(tmp_path):
    res = spava_plan(["model=qwen2vl_2b", "frames=32", "gpus=2", "kernels=false", "model.name='é'"], tmp_path)
    assert res.returncode == 0, res.stderr  # the value reaches the config (model.name is a label)


def config_dir(tmp_path: Path, text: str) -> Path:
    (tmp_path / "cd" / "model").mkdir(parents=True)
    (tmp_path / "cd" / "model" / "mine.yaml").write_text(text)
    return tmp_path / "cd"


BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdef", "bcdefg"))


@pytest.mark.parametrize("text, expect", [
    ("name: [qwen\n gpus: : 3\n", "model/mine.yaml line 2, column 6: malformed YAML: "),
    (BOMB, f"model/mine.yaml: its aliases expand to more than {MAX_YAML_NODES:,} nodes"),
    ("a: &a [*a]\n", "model/mine.yaml: its aliases expand"),  # recursive: infinite once copied
])
def test_a_bad_config_dir_yaml_is_refused_at_once(tmp_path, text, expect):
    cd = config_dir(tmp_path, text)
    start = time.monotonic()
    for form in (["--config-dir", str(cd)], [f"--config-dir={cd}"], ["-cd", str(cd)]):
        line = one_line(spava_plan([*form, "model=mine"], tmp_path, timeout=60))
        assert line.startswith(f"{form[0].split('=')[0]}: {expect}"), line
    assert time.monotonic() - start < 60  # three interpreter start-ups, not an expansion


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_in_a_config_dir_does_not_block(tmp_path):
    cd = config_dir(tmp_path, "name: mine\n")
    os.mkfifo(cd / "model" / "pipe.yaml")
    line = one_line(spava_plan(["--config-dir", str(cd), "model=pipe"], tmp_path, timeout=60))
    assert line == "--config-dir: model/pipe.yaml is not a regular file"


def test_a_good_config_dir_still_plans(tmp_path):
    from importlib.resources import files

    cd = config_dir(tmp_path, files("spava_plan.conf").joinpath("model", "qwen2vl_2b.yaml").read_text())
    res = spava_plan(["--config-dir", str(cd), "model=mine", "frames=32", "gpus=2", "kernels=false"], tmp_path)
    assert res.returncode == 0, res.stderr


def test_expanded_nodes_counts_aliases_as_copies_without_copying():
    import yaml

    doc = yaml.compose("a: &a [1, 2]\nb: [*a, *a]\n")  # map(a: seq(2), b: seq(seq(2), seq(2)))
    assert expanded_nodes(doc, 10**6) == 1 + (1 + 3) + (1 + 1 + 3 + 3)
    assert expanded_nodes(yaml.compose(BOMB), MAX_YAML_NODES) == MAX_YAML_NODES + 1


def test_a_searchpath_folder_is_checked_too(tmp_path):
    cd = config_dir(tmp_path, BOMB)
    line = one_line(spava_plan([f"hydra.searchpath=[file://{cd}]", "model=mine"], tmp_path, timeout=60))
    assert line.startswith("hydra.searchpath: model/mine.yaml: its aliases expand"), line


@pytest.mark.parametrize("module", ["spava_plan.entry.run", "spava_plan.server.serve"])
def test_spava_run_and_serve_check_a_config_dir_too(tmp_path, module):
    cd = config_dir(tmp_path, BOMB)
    res = subprocess.run([sys.executable, "-m", module, "--config-dir", str(cd), "model=mine"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--config-dir: model/mine.yaml: its aliases expand" in lines[0], res.stderr
