"""A training process for ``test_drain_crash.py``: ``kill`` mode commits step 1 locally and then
stalls inside its drain (after at least one file reached the durable tier) until it is SIGKILLed;
``resume`` mode restores, saves step 2 and closes (which drains everything)."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ckptio import tiered
from ckptio.tiered import TieredCheckpointManager

from tests.tiered._states import check_state, make_state


def main() -> None:
    mode, root, local, report = sys.argv[1:5]
    if mode == "kill":
        real = tiered._upload_one
        lock = threading.Lock()

        def stall(*args: Any) -> int:
            n = real(*args)
            with lock:
                Path(report).write_text("one file uploaded\n")
            time.sleep(600)  # the SIGKILL lands here, in the middle of the drain
            return n

        tiered._upload_one = stall
        mgr = TieredCheckpointManager(root, local=local)
        mgr.save(1, make_state(1, 0, 1))
        mgr.wait(durable=True)  # never returns
        raise AssertionError("the drain was supposed to stall")
    with TieredCheckpointManager(root, local=local) as mgr:
        before = {str(k): sorted(v) for k, v in mgr.step_locations().items()}
        state = make_state(0, 0, 1, empty=True)
        result = mgr.load(state)
        problem = check_state(state, 1, 0)
        mgr.save(2, make_state(2, 0, 1))
    after = {str(k): sorted(v) for k, v in mgr.step_locations().items()}
    Path(report).write_text(
        json.dumps(
            {
                "before": before,
                "after": after,
                "source": result.source,
                "step": result.step,
                "problem": problem,
            }
        )
    )


if __name__ == "__main__":
    main()
