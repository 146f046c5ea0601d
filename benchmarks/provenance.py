"""Where a benchmark run came from: the git commit and whether the tree was clean.

``run.py --record`` (``make bench RECORD=1``) refuses to record from a tree with uncommitted
changes to tracked files (:func:`recording_problem`); every run writes :func:`git_state` into
its results, so a recorded table names the exact commit it measured. Standard library only.
"""

from __future__ import annotations

import subprocess
from typing import List, Optional


def _git(root: str, *args: str) -> Optional[str]:
    try:
        done = subprocess.run(
            ["git", "-C", root, *args], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    # Not strip(): a porcelain status line starts with a space (" M path").
    return done.stdout.rstrip("\n") if done.returncode == 0 else None


def changed_files(root: str) -> Optional[List[str]]:
    """Tracked files with uncommitted changes (staged or not), or None outside a git checkout."""
    out = _git(root, "status", "--porcelain", "--untracked-files=no")
    if out is None:
        return None
    return [line[3:] for line in out.splitlines() if line.strip()]


def git_state(root: str) -> dict:
    """``{"commit", "describe", "branch", "commit_date", "dirty", "changed"}`` of the checkout at
    ``root`` (``commit`` None outside a git checkout)."""
    commit = _git(root, "rev-parse", "HEAD")
    changed = changed_files(root) if commit else None
    return {
        "commit": commit,
        "describe": _git(root, "describe", "--always", "--dirty") if commit else None,
        "branch": _git(root, "rev-parse", "--abbrev-ref", "HEAD") if commit else None,
        "commit_date": _git(root, "show", "-s", "--format=%cI", "HEAD") if commit else None,
        "dirty": bool(changed) if changed is not None else None,
        "changed": changed,
    }


def recording_problem(root: str) -> Optional[str]:
    """Why the checkout at ``root`` cannot be recorded from, or None when it can."""
    if _git(root, "rev-parse", "HEAD") is None:
        return f"{root} is not a git checkout with a commit: a recorded run must name its commit"
    changed = changed_files(root)
    if changed:
        shown = ", ".join(changed[:10]) + (" ..." if len(changed) > 10 else "")
        return (
            f"uncommitted changes to tracked files ({shown}): commit or stash them first; "
            "a recorded run must measure exactly the commit it names"
        )
    return None
