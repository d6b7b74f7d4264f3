"""Peak RSS of every Python process the rehearsal starts (this directory is put first on PYTHONPATH).

At exit each process appends one JSON line to ``$REGIONROUTE_RSS_LOG``: its argv, its peak resident
set size (the kernel's high-water mark ``VmHWM`` of this program, exact, not sampled; ``getrusage``'s
``ru_maxrss`` would carry over the parent's size at fork across ``exec``) and its wall time. A
process killed with SIGKILL writes nothing.
"""

import atexit
import json
import os
import sys
import time

_LOG = os.environ.get("REGIONROUTE_RSS_LOG")
_START = time.time()


def _record() -> None:
    with open("/proc/self/status") as fh:
        peak = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))  # kB
    line = {"argv": sys.argv, "pid": os.getpid(), "peak_rss": peak, "seconds": round(time.time() - _START, 1)}
    with open(_LOG, "a") as fh:
        fh.write(json.dumps(line) + "\n")


if _LOG:
    atexit.register(_record)
