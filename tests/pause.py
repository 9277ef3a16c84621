"""Test-only, for the fault drivers of tests/test_faults.py and tests/ranks.py (child processes).

``pause_at(step, marker)`` makes every trainer ``train`` builds stop at the start of step ``step + 1``:
it writes this process's pid to ``marker`` and waits (at most 120 s) for ``<marker>.go``, so a signal sent
to this one process lands inside that step.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def pause_at(step: int, marker: Path) -> None:
    from transformers import TrainerCallback

    import oasst_peft.train as train_mod

    class Pause(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == step:  # inside step `step + 1`, before its forward pass
                marker.write_text(str(os.getpid()))
                go = Path(str(marker) + ".go")
                deadline = time.time() + 120
                while not go.exists() and time.time() < deadline:
                    time.sleep(0.02)

    make = train_mod.make_trainer

    def make_trainer(**kwargs):
        trainer = make(**kwargs)
        trainer.add_callback(Pause())
        return trainer

    train_mod.make_trainer = make_trainer
