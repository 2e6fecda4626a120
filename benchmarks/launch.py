"""Run a run's commands one after another and report what they cost (used by run.py).

    python -I -S benchmarks/launch.py RESULT.json CMDS.json

Why a separate small process: Linux carries a process's peak RSS across fork and exec (the
child's ``ru_maxrss`` starts at its parent's high-water mark), so children of the harness --
which has imported matplotlib and friends -- would all report the harness's RSS as their peak.
This launcher is a fresh interpreter of a few MiB (``-I -S``: stdlib only), so the tools it
starts report their own peak, plus at most this small floor (run.py measures it with ``true``).

Each command is started with ``os.posix_spawnp`` and reaped with ``os.wait4``, whose rusage
covers the command and every descendant it waited for. Wall time is measured here, from just
before the first spawn to just after the last reap (no interpreter start-up of this launcher is
counted). Stops at the first command that fails. Writes ``{"wall", "user", "sys", "maxrss_kib",
"rcs"}`` to RESULT.json. stdin/stdout/stderr are inherited.
"""

import json
import os
import sys
import time


def main() -> int:
    result_path, cmds_path = sys.argv[1], sys.argv[2]
    with open(cmds_path) as f:
        cmds = json.load(f)
    user = sys_ = 0.0
    maxrss = 0
    rcs = []
    t0 = time.perf_counter()
    for argv in cmds:
        try:
            pid = os.posix_spawnp(argv[0], argv, os.environ)
        except OSError as exc:
            print(f"launch: {argv[0]}: {exc}", file=sys.stderr)
            rcs.append(127)
            break
        _, status, ru = os.wait4(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        rcs.append(rc)
        user += ru.ru_utime
        sys_ += ru.ru_stime
        maxrss = max(maxrss, ru.ru_maxrss)
        if rc != 0:
            break
    wall = time.perf_counter() - t0
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"wall": wall, "user": user, "sys": sys_, "maxrss_kib": maxrss, "rcs": rcs}, f)
    os.replace(tmp, result_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
