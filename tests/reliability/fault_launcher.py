"""Runs the `tpaserve` CLI, unchanged, with test-only hooks on the model runner. The package
never imports this file; the reliability tests start their servers through it.

    python tests/reliability/fault_launcher.py <tpaserve flags>

The model runner lives in the engine core process, which multiprocessing spawns: the child
imports this script as its `__mp_main__` module (that is how spawn finds the parent's main
module), and that import installs the hooks there. The API process needs none.

Hooks, read from the environment once at start-up (none set: plain tpaserve):
  TPASERVE_FAULT_FILE  a path. Before each step that runs requests, if the file holds a
                       positive integer k, k - 1 is written back and the step raises
                       RuntimeError. "1" fails the next step only; "99" fails steps until the
                       engine gives up (EngineDeadError after 3 in a row). The test decides
                       the moment by writing the file.
  TPASERVE_STEP_DELAY  seconds every step with requests sleeps first, so that a test can act
                       while work is in flight (disconnect, SIGTERM, inject a fault).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

FAULT_MESSAGE = "injected fault (tests/reliability/fault_launcher.py)"


def _take_fault(path: Path) -> bool:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return False
    left = int(text or 0)
    if left <= 0:
        return False
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(left - 1))
    os.replace(tmp, path)            # atomic: the test may read it at any time
    return True


def install() -> None:
    fault_file = os.environ.get("TPASERVE_FAULT_FILE")
    delay = float(os.environ.get("TPASERVE_STEP_DELAY") or 0)
    if not fault_file and not delay:
        return
    from tpaserve.runner.model_runner import ModelRunner
    real = ModelRunner.execute

    def execute(self, sched, **kw):
        if sched.requests:           # a step with no requests only drops finished state
            if delay:
                time.sleep(delay)
            if fault_file and _take_fault(Path(fault_file)):
                raise RuntimeError(FAULT_MESSAGE)
        return real(self, sched, **kw)

    ModelRunner.execute = execute


if __name__ == "__mp_main__":          # the engine core process (spawned)
    install()

if __name__ == "__main__":
    from tpaserve.api.cli import main
    main(sys.argv[1:])
