#!/usr/bin/env python3
"""Check that README.md and docs/*.md say only what is true: every command is run or marked, and
every link resolves.

Commands live in fenced blocks. The block's info string says what the check does with them:

    ```bash                 run here (CPU, fresh temp dir per page, bounded time); exit 0 expected,
                            or the code a trailing `# exits N` comment states (`# exits 2: names
                            SETTING`: and the error names SETTING); a refused command must leave
                            no files behind
    ```bash server          a server command: started with its port= moved to a free port, passes
                            when GET /health answers 200, kept running until the page is done
    ```bash gpu             not run in CI: needs CUDA GPUs (torchrun over NCCL, device benchmarks)
    ```bash checkpoint      not run in CI: needs real model weights
    ```bash pending         not run in CI: uses settings another branch is building; parsed only
    ```bash long            not run in CI: a CPU benchmark of minutes (results in benchmarks/results/)
    ```bash setup           an install command: must be one that CI itself runs (SETUP below)
    ```python server        client code: run against the page's server (the last ```bash server
                            block, kept running until the page is done; its 127.0.0.1 port moved)
    ```python pending       (or gpu, checkpoint, long): compiled, not run

For blocks that are not run, every command is still parsed (`bash -n`), every `spava-*` command
(and `torchrun ... -m spava_plan.X`) composes its config with Hydra's `--cfg job` (so a misspelt
setting fails here; not for `pending`), and every repository script it names must exist.
Untagged fences and indented blocks that hold a command are errors: nothing is skipped silently.

Links: relative targets must exist inside the repository (no `../shared`), and `#anchors` must
name a heading of their page. README.md stays a front page of at most 200 lines.

Usage: python scripts/check_docs.py [--jobs 2] [--timeout 240] [--list] [FILE.md ...]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200

NOT_RUN = {  # tag -> why the block cannot run on a CI CPU
    "gpu": "needs CUDA GPUs",
    "checkpoint": "needs real model weights",
    "pending": "uses settings another branch is building",
    "long": "a CPU benchmark of minutes, run by hand (its results are dated in benchmarks/results/)",
}
RUN_TAGS = {"", "server"}
# Install commands are not re-run here (minutes each): each must be one CI runs itself, found in
# the named file, so the documented set-up is the tested one.
SETUP = {
    "bash scripts/test.sh": (".ci/run", "bash scripts/test.sh"),
    "python3 -m venv .venv && . .venv/bin/activate && pip install . && spava-plan":
        ("tests/test_install.py", '"-m", "pip", "install"'),
}
# Link targets that another branch adds; tolerated (and reported) only while they are missing.
PENDING_LINKS: dict[str, str] = {}
# A line that looks like a command, for catching commands outside a tagged block.
COMMAND_RE = re.compile(r"^\s*(\$ )?([A-Z_][A-Z0-9_]*=(\$\([^)]*\)|\S+) )*"  # prompt, VAR=value prefixes
                        r"(spava-plan|spava-run|spava-serve|torchrun|python3? -m spava_plan|"
                        r"python3? (benchmarks|scripts)/|bash scripts/|pip install|curl )")
EXITS_RE = re.compile(r"#\s*exits\s+(\d+)\b(?::\s*names\s+([\w.]+))?")
FENCE_RE = re.compile(r"^(\s*)(```+|~~~+)\s*([^`]*)$")
LINK_RE = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")
ENTRY_POINTS = {"spava-plan": "spava_plan.entry.cli", "spava-run": "spava_plan.entry.run", "spava-serve": "spava_plan.server.serve"}


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    tag: str
    text: str

    def where(self) -> str:
        return f"{rel(self.page)}:{self.line}"


@dataclass
class Result:
    ran: list[str] = field(default_factory=list)
    marked: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, other: "Result") -> None:
        for name in ("ran", "marked", "errors", "notes"):
            getattr(self, name).extend(getattr(other, name))


def rel(path: Path) -> str:
    """A page's name as the messages show it: relative to the repository when inside it."""
    try:
        return path.relative_to(REPO).as_posix()
    except ValueError:
        return str(path)


# -- parsing --------------------------------------------------------------------------------------
def parse_blocks(page: Path, text: str) -> tuple[list[Block], list[str], list[tuple[int, str]]]:
    """Fenced blocks, errors for commands outside tagged blocks, and the prose lines (for links)."""
    blocks, errors, prose = [], [], []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE_RE.match(lines[i])
        if not m:
            if lines[i].startswith("    ") and COMMAND_RE.match(lines[i][4:]) and (i == 0 or not lines[i - 1].strip()
                                                                              or lines[i - 1].startswith("    ")):
                errors.append(f"{rel(page)}:{i + 1}: a command in an indented block; put it in a "
                              f"```bash block (tagged if it cannot run in CI)")
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        fence, info = m.group(2), m.group(3).strip().split()
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence[0] * len(fence)):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        lang = info[0] if info else ""
        tag = " ".join(info[1:])
        blocks.append(Block(page, start, lang, tag, "\n".join(body) + "\n"))
    return blocks, errors, prose


HEREDOC_RE = re.compile(r"<<-?\s*(['\"]?)(\w+)\1")


def commands(text: str) -> list[str]:
    """Shell commands of a block: backslash continuations joined, a here-document kept with its
    command, comments and blank lines dropped."""
    out, current = [], ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        i += 1
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1].rstrip() + " "
            continue
        command = current + line.lstrip() if current else line.strip()
        current = ""
        doc = HEREDOC_RE.search(command)
        if doc:  # the body up to the terminator line belongs to this command
            body = []
            while i < len(lines) and lines[i].strip() != doc.group(2):
                body.append(lines[i])
                i += 1
            i += 1
            command = "\n".join([command, *body, doc.group(2)])
        out.append(command)
    if current:
        out.append(current.strip())
    return out


def short(command: str) -> str:
    """A command as one line of a message."""
    line = command.replace("\n", " | ")
    return line if len(line) <= 90 else line[:87] + "..."


def expected_exit(command: str) -> tuple[int, str | None]:
    """The exit code a trailing `# exits N` states (0 without one), and the setting that a
    `# exits N: names SETTING` comment says the error line names."""
    m = EXITS_RE.search(command)
    return (int(m.group(1)), m.group(2)) if m else (0, None)


def _entry_argv(command: str) -> tuple[str, list[str]] | None:
    """(module, overrides) of a spava-* command, directly or under torchrun; None for anything else."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        return None
    words = [w for w in words if "=" not in w or not re.match(r"^[A-Z_][A-Z0-9_]*=", w)]  # env prefix
    if not words:
        return None
    if words[0] in ENTRY_POINTS:
        return ENTRY_POINTS[words[0]], words[1:]
    if words[0] == "torchrun" and "-m" in words:
        k = words.index("-m")
        if k + 1 < len(words) and words[k + 1].startswith("spava_plan."):
            return words[k + 1], words[k + 2:]
    if words[0] in ("python", "python3") and words[1:2] == ["-m"] and words[2:3] and words[2].startswith("spava_plan."):
        return words[2], words[3:]
    return None


# -- checks of blocks that are not run --------------------------------------------------------------
def check_marked(block: Block, env: dict, cwd: Path, timeout: float) -> Result:
    res = Result()
    for cmd in commands(block.text):
        label = f"{block.where()}: {short(cmd)}"
        before = len(res.errors)
        syntax = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        if syntax.returncode:
            res.errors.append(f"{label}: does not parse: {syntax.stderr.strip()}")
            continue
        for word in shlex.split(cmd, comments=True):
            if re.match(r"^(benchmarks|scripts|tests)/\S+\.(py|sh)$", word) and not (REPO / word).is_file():
                res.errors.append(f"{label}: names {word}, which is not in the repository")
        entry = _entry_argv(cmd)
        if entry and block.tag != "pending":
            module, args = entry
            multirun = "-m" in args or "--multirun" in args
            args = [a for a in args if not a.startswith("-") and "=" in a]  # overrides only
            if multirun:  # --cfg cannot be combined with -m: compose the sweep's first job
                args = [re.sub(r"^([^=]+=)([^,\[\]{}]*),.*$", r"\1\2", a) for a in args]
            probe = subprocess.run([sys.executable, "-m", module, *args, "--cfg", "job"], cwd=cwd, env=env,
                                   capture_output=True, text=True, timeout=timeout)
            if probe.returncode:
                res.errors.append(f"{label}: its config does not compose: "
                                  f"{(probe.stderr or probe.stdout).strip()[-400:]}")
        if len(res.errors) == before:
            res.marked.append(f"{label}  [not run: {NOT_RUN.get(block.tag, block.tag)}]")
    return res


def check_setup(block: Block) -> Result:
    res = Result()
    for cmd in commands(block.text):
        label = f"{block.where()}: {cmd}"
        if cmd not in SETUP:
            res.errors.append(f"{label}: a setup command CI does not run (known: {', '.join(SETUP)})")
            continue
        path, needle = SETUP[cmd]
        if needle not in (REPO / path).read_text(encoding="utf-8"):
            res.errors.append(f"{label}: {path} no longer runs it")
        res.marked.append(f"{label}  [run by CI: {path}]")
    return res


# -- running --------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server command of a page, on a free port, running until the page is done."""

    def __init__(self, cmd: str, env: dict, cwd: Path):
        self.port = _free_port()
        moved = re.sub(r"\bport=\d+", f"port={self.port}", cmd)
        if moved == cmd:
            moved = f"{cmd} port={self.port}"
        self.log = cwd / f"server-{self.port}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(["bash", "-c", f"exec {moved}"], cwd=cwd, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout: float) -> str | None:
        """None once GET /health answers 200, else what went wrong."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"exited with {self.proc.returncode} before serving: {self.log.read_text()[-600:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return None
            except OSError:
                pass
            time.sleep(0.5)
        return f"no /health answer within {timeout:.0f} s: {self.log.read_text()[-600:]}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the session this check started, nothing else
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def run_block(block: Block, env: dict, cwd: Path, timeout: float, servers: list[Server]) -> Result:
    res = Result()
    for cmd in commands(block.text):
        label = f"{block.where()}: {short(cmd)}"
        t0 = time.monotonic()
        if block.tag == "server":
            server = Server(cmd, env, cwd)
            servers.append(server)  # stopped when the page is done: later client blocks talk to it
            err = server.wait_healthy(timeout)
            if err:
                res.errors.append(f"{label}: {err}")
            else:
                res.ran.append(f"{label}  [served /health in {time.monotonic() - t0:.1f} s]")
            continue
        want, names = expected_exit(cmd)
        before = set(cwd.rglob("*"))
        try:
            proc = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            res.errors.append(f"{label}: still running after {timeout:.0f} s")
            continue
        tail = (proc.stderr.strip() or proc.stdout.strip())[-800:]
        if proc.returncode != want:
            res.errors.append(f"{label}: exit {proc.returncode}, expected {want}: {tail}")
        elif names and names not in proc.stderr + proc.stdout:
            res.errors.append(f"{label}: the error does not name {names}: {tail}")
        elif want and (left := sorted(str(p.relative_to(cwd)) for p in set(cwd.rglob("*")) - before)):
            res.errors.append(f"{label}: a refused command left files behind: {', '.join(left[:5])}")
        else:
            res.ran.append(f"{label}  [exit {want}, {time.monotonic() - t0:.1f} s]")
    return res


def run_client(block: Block, env: dict, cwd: Path, timeout: float, servers: list[Server]) -> Result:
    """A `python server` block: run against the page's live server (its documented 127.0.0.1 port
    moved to the server's)."""
    live = [s for s in servers if s.proc.poll() is None]
    label = f"{block.where()}: python"
    if not live:
        return Result(errors=[f"{label}: needs a running server from an earlier ```bash server block of the page"])
    code = re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{live[-1].port}", block.text)
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-"], input=code, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return Result(errors=[f"{label}: still running after {timeout:.0f} s"])
    if proc.returncode:
        return Result(errors=[f"{label}: exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-800:]}"])
    return Result(ran=[f"{label}  [against the server, {time.monotonic() - t0:.1f} s]"])


def make_fixtures(cwd: Path) -> None:
    """clip.mp4, the clip the pages' commands name: a 12 s, 336x224 clip (PyAV)."""
    sys.path.insert(0, str(REPO / "tests"))
    from model_fixtures import write_video  # the tests' own clip writer

    write_video(cwd / "clip.mp4", frames=48, height=224, width=336, fps=4)


def check_page(page: Path, timeout: float, list_only: bool) -> Result:
    res = Result()
    text = page.read_text(encoding="utf-8")
    blocks, errors, prose = parse_blocks(page, text)
    res.errors.extend(errors)
    res.errors.extend(check_links(page, text, prose))
    if page == REPO / "README.md" and len(text.splitlines()) > README_MAX_LINES:
        res.errors.append(f"README.md: {len(text.splitlines())} lines, more than the front page's {README_MAX_LINES}")
    work = Path(tempfile.mkdtemp(prefix="check_docs-"))
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    # The entry points of this interpreter's environment come first, activated or not.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("HYDRA_FULL_ERROR", None)
    servers: list[Server] = []
    try:
        if any("clip.mp4" in b.text for b in blocks if b.lang in ("bash", "sh", "python")) and not list_only:
            make_fixtures(work)
        for block in blocks:
            if block.lang in ("bash", "sh"):
                if block.tag == "setup":
                    res.add(check_setup(block))
                elif block.tag in NOT_RUN:
                    res.add(Result(marked=[f"{block.where()}: {short(c)}  [not run: {NOT_RUN[block.tag]}]"
                                           for c in commands(block.text)]) if list_only
                            else check_marked(block, env, work, timeout))
                elif block.tag in RUN_TAGS:
                    res.add(Result(ran=[f"{block.where()}: {short(c)}" for c in commands(block.text)]) if list_only
                            else run_block(block, env, work, timeout, servers))
                else:
                    res.errors.append(f"{block.where()}: unknown tag {block.tag!r} (known: server, setup, "
                                      f"{', '.join(NOT_RUN)})")
            elif block.lang == "python":
                try:
                    compile(block.text, block.where(), "exec")
                except SyntaxError as e:
                    res.errors.append(f"{block.where()}: python does not compile: {e}")
                    continue
                if block.tag == "server":
                    res.add(Result(ran=[f"{block.where()}: python"]) if list_only
                            else run_client(block, env, work, timeout, servers))
                elif block.tag in NOT_RUN:
                    res.marked.append(f"{block.where()}: python  [compiled, not run: {NOT_RUN[block.tag]}]")
                else:
                    res.errors.append(f"{block.where()}: a python block must be tagged `python server` (run "
                                      f"against the page's server) or with a reason it is not run "
                                      f"({', '.join(NOT_RUN)})")
            elif block.lang in ("", "text", "console"):
                for k, line in enumerate(block.text.splitlines()):
                    if line.startswith("$ ") or (block.lang == "" and COMMAND_RE.match(line)):
                        res.errors.append(f"{rel(block.page)}:{block.line + k + 1}: a command in "
                                          f"an untagged block; put it in a ```bash block")
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return res


# -- links ----------------------------------------------------------------------------------------
def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    _, _, prose = parse_blocks(page, page.read_text(encoding="utf-8"))
    return {slug(line.lstrip("#")) for _, line in prose if re.match(r"^#{1,6} ", line)}


def check_links(page: Path, text: str, prose: list[tuple[int, str]]) -> list[str]:
    errors = []
    for lineno, line in prose:
        line = re.sub(r"`[^`]*`", "", line)  # links inside inline code are examples, not links
        for m in LINK_RE.finditer(line):
            target = m.group(2) or m.group(3)
            where = f"{rel(page)}:{lineno}"
            if re.match(r"^[a-z]+:", target):  # http(s), mailto: not fetched (CI has no network)
                continue
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            if not dest.is_relative_to(REPO):
                errors.append(f"{where}: link {target!r} leaves the repository")
                continue
            name = dest.relative_to(REPO).as_posix()
            if not dest.exists():
                if name in PENDING_LINKS:
                    continue  # reported once by main()
                errors.append(f"{where}: link {target!r}: no such file {name}")
                continue
            if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                errors.append(f"{where}: link {target!r}: {name} has no heading #{anchor}")
    return errors


def pages(args: list[str]) -> list[Path]:
    if args:
        return [Path(a).resolve() for a in args]
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", help="pages to check (default: README.md and docs/*.md)")
    ap.add_argument("--jobs", type=int, default=2, help="pages checked at once (default 2: the CI machine's cores)")
    ap.add_argument("--timeout", type=float, default=240, help="seconds one command may take")
    ap.add_argument("--list", action="store_true", help="list what would be run or marked; run nothing")
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    total = Result()
    todo = pages(a.files)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        for res in pool.map(lambda p: check_page(p, a.timeout, a.list), todo):
            total.add(res)
    if not a.files:
        readme = (REPO / "README.md").read_text(encoding="utf-8")
        for page in sorted((REPO / "docs").glob("*.md")):
            if f"docs/{page.name}" not in readme:
                total.errors.append(f"README.md: does not link docs/{page.name}")
        for rel, why in PENDING_LINKS.items():
            if not (REPO / rel).exists():
                total.notes.append(f"link target {rel} is not here yet: {why}")
    for line in total.ran:
        print(f"ran     {line}")
    for line in total.marked:
        print(f"marked  {line}")
    for line in total.notes:
        print(f"note: {line}")
    for line in total.errors:
        print(f"ERROR   {line}", file=sys.stderr)
    print(f"check_docs: {len(todo)} pages, {len(total.ran)} commands run, {len(total.marked)} marked, "
          f"{len(total.errors)} errors in {time.monotonic() - t0:.1f} s")
    return 1 if total.errors else 0


if __name__ == "__main__":
    sys.exit(main())
