"""The `lesion` command with a crash injected at a chosen point: this very process is SIGKILLed right
after the n-th call of one function returns. Deterministic where polling a row count to time a kill
was a race.

    python -m tests.crash MODULE:ATTR N lesion-arguments...
e.g. `python -m tests.crash lesion_tasks.ingest.drop:_DropIngestion._record 5 ingest DROP`
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading


def inject(target: str, n: int) -> None:
    module_name, _, attr = target.partition(":")
    owner = importlib.import_module(module_name)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    lock, calls = threading.Lock(), [0]

    def crashing(*args, **kwargs):
        result = original(*args, **kwargs)
        with lock:
            calls[0] += 1
            if calls[0] >= n:
                os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, crashing)


def main() -> int:
    target, n, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    inject(target, n)
    from lesion_tasks.cli import main as lesion

    return lesion(args)


if __name__ == "__main__":
    sys.exit(main())
