"""Another revision of adscore, checked out beside this one, for A/B runs of code changes.

    python -m benchmarks.settings_ab --candidates 256 --connections 16 --rounds 3 \\
        --variant "before:code=HEAD~1" --variant "after:"

A variant's `code=REF` serves adscore from a detached git worktree of REF (removed afterwards)
instead of from this checkout; everything else (Redis, model, requests, load) stays the same.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


class CheckoutError(Exception):
    """The revision could not be checked out (not a git checkout, or an unknown revision)."""


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(PROJECT), *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise CheckoutError(f"git {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout.strip()


@contextmanager
def checked_out(ref: str) -> Iterator[Path]:
    """A temporary worktree of `ref` (any revision git knows: a commit, a tag, HEAD~1)."""
    commit = _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    with tempfile.TemporaryDirectory(prefix="adscore-ab-") as parent:
        folder = Path(parent) / commit[:12]
        _git("worktree", "add", "--detach", str(folder), commit)
        try:
            yield folder
        finally:
            _git("worktree", "remove", "--force", str(folder))
