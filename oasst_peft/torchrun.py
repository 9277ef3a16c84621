"""torchrun as ``python -m oasst_peft.torchrun ARGS``: the same launcher, quiet when a signal ends the run.

On Ctrl-C or SIGTERM torchrun's agent passes the signal to its workers (which finish the step and save a
checkpoint, then say so) and leaves by raising ``SignalException``, whose traceback would follow the
workers' clean stop message on every Ctrl-C. Here that exception becomes the exit status a shell reports
for the signal (130 for Ctrl-C); every other error, and every argument, is torchrun's own.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except SignalException as e:  # the workers have said what they did with the signal
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
