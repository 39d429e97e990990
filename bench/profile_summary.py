"""Summarise py-spy's collapsed stacks (bench/run --profile): the functions
with the most samples on the stack (inclusive) and on top (self), ignoring
idle threads waiting on a lock, a socket or a sleep.

    python -m bench.profile_summary bench/out/profile/ingest-single-0-*.txt
"""

from __future__ import annotations

import sys
from collections import Counter

IDLE = (
    "wait (threading.py",
    "select (selectors.py",
    "accept (socket.py",
    "_worker (concurrent",
    "run_for_one",
    "sleep (gunicorn",
    "get (queue.py",
)


def summarise(paths: list[str], top: int = 25) -> str:
    inclusive, own = Counter(), Counter()
    total = 0
    for path in paths:
        with open(path) as lines:
            for line in lines:
                stack, _, count = line.rstrip().rpartition(" ")
                frames = stack.split(";")
                if any(marker in frames[-1] for marker in IDLE):
                    continue
                samples = int(count)
                total += samples
                own[frames[-1]] += samples
                for frame in set(frames):
                    inclusive[frame] += samples
    out = [f"busy samples: {total}", "", "inclusive:"]
    out += [f"{n / total:6.1%}  {frame}" for frame, n in inclusive.most_common(top)]
    out += ["", "self:"]
    out += [f"{n / total:6.1%}  {frame}" for frame, n in own.most_common(top)]
    return "\n".join(out)


if __name__ == "__main__":
    print(summarise(sys.argv[1:]))
