"""The operator's view of a plan family: ``python -m spava_plan.entry.plan_store COMMAND plan_dir=DIR [HASH]``.

    python -m spava_plan.entry.plan_store list  plan_dir=plans           # every plan, most recently used first
    python -m spava_plan.entry.plan_store pin   plan_dir=plans 3fa2c1     # never evicted to make room
    python -m spava_plan.entry.plan_store unpin plan_dir=plans 3fa2c1
    python -m spava_plan.entry.plan_store evict plan_dir=plans 3fa2c1     # out of the index (cache/ folder removed)

HASH is a plan hash or a prefix of at least 4 hex digits naming one plan. A user error (an
unknown command, a missing or unreadable plan_dir, a hash naming no plan or several) prints one
line on stderr and exits 2. The index is read and rewritten under the same lock the server uses
(spava_plan/entry/plan_index.py), so this is safe while servers run on the same family.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError, SpavaError
from . import plan_index
from .plan_index import INDEX_NAME, PlanEntry, read_index

PROG = "python -m spava_plan.entry.plan_store"
COMMANDS = ("list", "pin", "unpin", "evict")
USAGE = f"usage: {PROG} {{{'|'.join(COMMANDS)}}} plan_dir=DIR [HASH]"


def main(argv: Sequence[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        print(__doc__.split("\n\n", 1)[1].rstrip())
        return 0
    try:
        command, root, target = _parse(list(argv))
        if command == "list":
            print(table(read_index(root)))
            return 0
        assert target is not None
        entries = (plan_index.evict(root, target) if command == "evict"
                   else plan_index.set_pinned(root, target, command == "pin"))
        verb = {"pin": "pinned", "unpin": "unpinned", "evict": "evicted"}[command]
        print(f"{verb} {entries[0].hash[:16]} ({len(entries)} index entr{'y' if len(entries) == 1 else 'ies'})")
        return 0
    except SpavaError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


def _parse(argv: list[str]) -> tuple[str, Path, str | None]:
    if not argv or argv[0] not in COMMANDS:
        raise ConfigError(f"the first argument must be one of {', '.join(COMMANDS)}, got "
                          f"{argv[0] if argv else 'nothing'!r} ({USAGE})", setting="command")
    command, rest = argv[0], argv[1:]
    dirs = [a.partition("=")[2] for a in rest if a.startswith("plan_dir=")]
    others = [a for a in rest if not a.startswith("plan_dir=")]
    if len(dirs) != 1 or not dirs[0]:
        raise ConfigError(f"give the family's folder once as plan_dir=DIR ({USAGE})", setting="plan_dir")
    root = Path(dirs[0])
    if not (root / INDEX_NAME).is_file():
        raise ConfigError(f"{dirs[0]!r} holds no plan index ({INDEX_NAME}); give a spava-plan -m sweep root or a "
                          f"server's plan_dir", setting="plan_dir")
    want = 0 if command == "list" else 1
    if len(others) != want:
        raise ConfigError(f"{command} takes {'no' if not want else 'one'} plan hash, got {len(others)} ({USAGE})",
                          setting="hash")
    return command, root, (others[0] if others else None)


def table(entries: Sequence[PlanEntry]) -> str:
    """One line per index entry, most recently used first."""
    head = f"{'hash':<16}  {'method':<11} {'ranks':>5} {'frames':>6} {'frame':>9} {'tokens':>9} {'predicted':>11}  " \
           f"{'pin':<3} {'kind':<5} last used"
    lines = [head]
    for e in sorted(entries, key=lambda e: (-e.last_used, e.hash)):
        used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.last_used)) if e.last_used else "never"
        lines.append(f"{e.hash[:16]:<16}  {e.method:<11} {e.world_size:>5} {e.frames:>6} "
                     f"{e.frame_size[0]:>4}x{e.frame_size[1]:<4} {e.total_tokens:>9,} "
                     f"{e.predicted_us / 1e3:>8,.2f} ms  "
                     f"{'yes' if e.pinned else '-':<3} {'cache' if e.cached else 'sweep':<5} {used}")
    return "\n".join(lines) + f"\n{len(entries)} plans"
