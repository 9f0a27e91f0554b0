"""Where a process's threads spent their samples, from a py-spy profile in raw (collapsed) form.

    py-spy record --pid PID --rate 200 --duration 20 --format raw --output profile.txt
    python -m benchmarks.pyspy_summary profile.txt

Each line of the profile is a stack (frames joined by ';', the outermost first) and a sample
count. The summary splits the samples between the main thread (the event loop) and the threads
started by `threading` (inference, drift), and gives each one's share by the file of the frame
that was running (its leaf), then the busiest lines. Under uvloop py-spy cannot unwind through
the loop's C code, so a coroutine's stack starts at the coroutine: the leaf is what is reliable.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

FRAME_FILE = re.compile(r"\((?P<file>[^()]*?):\d+\)$")
# The main thread's time in the event loop's own C code: py-spy shows it as the frame that
# entered the loop.
LOOP_NATIVE = "asyncio/runners.py"


@dataclass(frozen=True, slots=True)
class Samples:
    """One thread group's samples: by the leaf frame's file and by the leaf frame itself."""

    total: int
    by_file: Counter[str]
    by_frame: Counter[str]


def leaf_file(frame: str) -> str:
    """'f (service/app.py:12)' -> 'service/app.py'; the whole frame when it names no file."""
    match = FRAME_FILE.search(frame)
    if match is None:
        return frame
    name = match.group("file")
    return "event loop (native)" if name.endswith(LOOP_NATIVE) else name


def summarise(lines: Iterable[str]) -> dict[str, Samples]:
    """The samples of 'main' and of 'threads', from the profile's lines."""
    groups = {group: (Counter[str](), Counter[str]()) for group in ("main", "threads")}
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            raise ValueError(f"line {number}: expected 'frame;frame;... COUNT', got {line[:80]!r}")
        frames = stack.split(";")
        group = "threads" if any("(threading.py:" in f for f in frames) else "main"
        by_file, by_frame = groups[group]
        leaf = frames[-1] or "(unnamed)"
        by_file[leaf_file(leaf)] += int(count)
        by_frame[leaf] += int(count)
    return {
        group: Samples(sum(by_file.values()), by_file, by_frame)
        for group, (by_file, by_frame) in groups.items()
    }


def render(summary: dict[str, Samples], top: int) -> str:
    out = []
    for group, samples in summary.items():
        title = "main thread (event loop)" if group == "main" else "threads (inference, drift)"
        out.append(f"{title}: {samples.total} samples")
        if not samples.total:
            continue
        out.append("  by file:")
        for name, count in samples.by_file.most_common(top):
            out.append(f"  {100 * count / samples.total:5.1f} %  {name}")
        out.append("  by line:")
        for name, count in samples.by_frame.most_common(top):
            out.append(f"  {100 * count / samples.total:5.1f} %  {name}")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.pyspy_summary", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("profile", type=Path, help="py-spy record --format raw output")
    parser.add_argument("--top", type=int, default=25, help="rows per table (default 25)")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error(f"--top must be at least 1, got {args.top}")
    try:
        with args.profile.open(encoding="utf-8") as lines:
            summary = summarise(lines)
    except (OSError, ValueError) as exc:
        parser.error(f"{args.profile}: {exc}")
    print(render(summary, args.top), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
