"""The documentation says only what is true: scripts/check_docs.py runs or checks every command of
README.md and docs/*.md and resolves every link. The small pages below show that each rule can fail;
the last test runs the whole check on the real pages, in bounded time."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_docs", REPO / "scripts" / "check_docs.py")
check_docs = importlib.util.module_from_spec(_spec)
sys.modules["check_docs"] = check_docs  # dataclasses look their module up there
_spec.loader.exec_module(check_docs)

FENCE = "```"


def _check(tmp_path, monkeypatch, text: str):
    """Check one page in a scratch repository (tmp_path stands for the repository root)."""
    monkeypatch.setattr(check_docs, "REPO", tmp_path.resolve())
    (tmp_path / "docs").mkdir(exist_ok=True)
    page = tmp_path / "docs" / "page.md"
    page.write_text(text)
    return check_docs.check_page(page.resolve(), timeout=60, list_only=False)


def test_a_failing_command_is_an_error_and_a_stated_exit_code_is_checked(tmp_path, monkeypatch):
    res = _check(tmp_path, monkeypatch, f"{FENCE}bash\nfalse\nbash -c 'exit 2'   # exits 2\n"
                                        f"bash -c 'exit 3'   # exits 2\n"
                                        f"bash -c 'echo bad gpus >&2; exit 2'   # exits 2: names gpus\n"
                                        f"bash -c 'echo bad >&2; exit 2'   # exits 2: names video.fps\n{FENCE}\n")
    assert len(res.ran) == 2, res
    assert len(res.errors) == 3 and "exit 1, expected 0" in res.errors[0] and "exit 3, expected 2" in res.errors[1]
    assert "does not name video.fps" in res.errors[2]


def test_a_refused_command_must_leave_no_files(tmp_path, monkeypatch):
    res = _check(tmp_path, monkeypatch, f"{FENCE}bash\nbash -c 'mkdir -p outputs/x; exit 2'   # exits 2\n{FENCE}\n")
    assert len(res.errors) == 1 and "left files behind: outputs" in res.errors[0], res


def test_commands_run_in_order_in_one_scratch_dir_per_page(tmp_path, monkeypatch):
    res = _check(tmp_path, monkeypatch, f"{FENCE}bash\necho hi > made.txt\n{FENCE}\n\n"
                                        f"{FENCE}bash\ntest -f made.txt && \\\n  grep -q hi made.txt\n{FENCE}\n")
    assert not res.errors and len(res.ran) == 2, res
    assert not (tmp_path / "made.txt").exists(), "commands run in a scratch dir, not the repository"


def test_a_here_document_stays_with_its_command():
    assert check_docs.commands("a \\\n  b\n# note\npython - <<'EOF'\nprint(1)\n# kept\nEOF\nnext\n") == [
        "a b", "python - <<'EOF'\nprint(1)\n# kept\nEOF", "next"]


def test_a_command_outside_a_tagged_block_is_an_error(tmp_path, monkeypatch):
    res = _check(tmp_path, monkeypatch, f"Plan:\n\n    spava-plan gpus=8\n\nServe:\n\n    SPAVA_API_KEY=k spava-serve\n\n"
                                        f"{FENCE}\nspava-plan gpus=4\n{FENCE}\n")
    assert len(res.errors) == 3 and not res.ran, res
    assert "indented block" in res.errors[0] and "indented block" in res.errors[1] and "untagged block" in res.errors[2]


def test_an_unknown_tag_and_an_untagged_python_block_are_errors(tmp_path, monkeypatch):
    res = _check(tmp_path, monkeypatch, f"{FENCE}bash later\ntrue\n{FENCE}\n{FENCE}python\nprint(1)\n{FENCE}\n")
    assert any("unknown tag 'later'" in e for e in res.errors), res
    assert any("must be tagged `python server`" in e for e in res.errors), res


SERVER = """import functools, http.server, sys
port = int(next(a for a in sys.argv if a.startswith("port="))[5:])
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])
http.server.ThreadingHTTPServer(("127.0.0.1", port), handler).serve_forever()
"""


def test_a_server_block_serves_and_client_blocks_talk_to_it(tmp_path, monkeypatch):
    # A real HTTP server (the standard library's), whose folder holds a file named "health".
    site = tmp_path / "site"
    site.mkdir()
    (site / "health").write_text("ok")
    (site / "answer").write_text("42")
    (tmp_path / "serve.py").write_text(SERVER)
    client = "import urllib.request\nassert urllib.request.urlopen('http://127.0.0.1:8123/answer').read() == b'{}'\n"
    text = (f"{FENCE}python server\n{client.format(42)}{FENCE}\n"  # no server yet
            f"{FENCE}bash server\n{sys.executable} {tmp_path / 'serve.py'} {site} port=8123\n{FENCE}\n"
            f"{FENCE}python server\n{client.format(42)}{FENCE}\n{FENCE}python server\n{client.format(7)}{FENCE}\n"
            f"{FENCE}python pending\nprint(1\n{FENCE}\n")
    res = _check(tmp_path, monkeypatch, text)
    assert len(res.ran) == 2, res  # the server, the first client against it
    assert len(res.errors) == 3, res
    assert "needs a running server" in res.errors[0] and "AssertionError" in res.errors[1]
    assert "does not compile" in res.errors[2]


def test_a_marked_command_is_parsed_and_its_config_composed(tmp_path, monkeypatch):
    text = (f"{FENCE}bash gpu\ntorchrun --nproc-per-node 8 -m spava_plan.entry.run plan=p.json gpus=8\n"
            f"torchrun --nproc-per-node 8 -m spava_plan.entry.run plan=p.json gpuz=8\n"
            f"python benchmarks/no_such_script.py --x\nif then fi\n{FENCE}\n"
            f"{FENCE}bash pending\nspava-serve not_built_yet=1\n{FENCE}\n")
    res = _check(tmp_path, monkeypatch, text)
    assert len(res.errors) == 3, res
    assert "gpuz" in res.errors[0] and "does not compose" in res.errors[0]
    assert "benchmarks/no_such_script.py" in res.errors[1] and "does not parse" in res.errors[2]
    assert len(res.marked) == 2  # the good torchrun line and the pending one (parsed only)


def test_a_marked_sweep_composes_its_first_job(tmp_path, monkeypatch):
    res = _check(tmp_path, monkeypatch, f"{FENCE}bash gpu\nspava-plan -m gpus=4,8 frames=256,512 method=spava,star\n"
                                        f"spava-plan -m gpus=4,8 framez=256,512\n{FENCE}\n")
    assert len(res.marked) == 1 and len(res.errors) == 1 and "framez" in res.errors[0], res


def test_a_setup_command_must_be_one_ci_runs(tmp_path, monkeypatch):
    res = _check(tmp_path, monkeypatch, f"{FENCE}bash setup\npip install spava-plan-extras\n{FENCE}\n")
    assert len(res.errors) == 1 and "CI does not run" in res.errors[0], res


def test_links_resolve_inside_the_repository_with_their_anchors(tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## The part\n")
    text = ("# Page\n\n[ok](other.md#the-part) [self](#page) [web](https://example.com/x)\n"
            "[gone](missing.md) [out](../../shared/SPEC.md) [bad anchor](other.md#nope) `[code](x.md)`\n")
    res = _check(tmp_path, monkeypatch, text)
    assert len(res.errors) == 3, res
    assert "no such file docs/missing.md" in res.errors[0]
    assert "leaves the repository" in res.errors[1] and "has no heading #nope" in res.errors[2]


def test_the_slug_follows_githubs_rule():
    assert check_docs.slug("Deploy: plan once, `spava-serve`") == "deploy-plan-once-spava-serve"
    assert check_docs.slug("Known limits (InternVL3)") == "known-limits-internvl3"


@pytest.mark.slow
def test_the_real_pages_pass_within_the_time_budget():
    # Bounded: the check runs every CPU command of the pages, about 90 s of CPU time (so about a
    # minute on 2 idle cores); the limit leaves room for a machine shared with other jobs (5.5 min
    # at load average 15).
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "check_docs.py")], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "0 errors" in proc.stdout, proc.stdout[-2000:]
    assert time.monotonic() - t0 < 900
