"""Where a process's time went, from py-spy's collapsed stacks (`py-spy record -f raw`): the
functions most often on top of the stack (self) and on it at all (total), as shares of samples.

    python bench/pyspy_summary.py FILE [FILE ...] [--top 15]

Idle samples (a thread waiting in epoll, a lock or a queue) are counted apart, so the shares
are of the samples where a thread was working.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

IDLE = ("epoll_wait", "select", "poll (", "wait (threading", "_worker (concurrent",
        "acquire", "sleep", "get (queue", "_wait_for_tstate_lock")


def summarize(path: Path, top: int) -> str:
    self_counts, total_counts, idle, busy = Counter(), Counter(), 0, 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames, n = stack.split(";"), int(count)
        if any(word in frames[-1] for word in IDLE):
            idle += n
            continue
        busy += n
        self_counts[frames[-1]] += n
        for frame in set(frames[1:]):  # the first frame is the thread's name
            total_counts[frame] += n
    lines = [f"## {path.name}: {busy} busy samples, {idle} idle"]
    for title, counts in (("self", self_counts), ("total", total_counts)):
        lines.append(f"  {title}:")
        lines += [f"    {n / max(busy, 1):6.1%}  {frame}" for frame, n in counts.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args()
    for path in a.files:
        print(summarize(path, a.top))


if __name__ == "__main__":
    main()
