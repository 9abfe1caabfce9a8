"""bench/bench_e2e.py's /proc CPU reading: it must count every process of a
session (router workers are children of the supervisor), including ones that
were not the session leader, and nothing outside it."""

import subprocess
import sys
import time

from bench.bench_e2e import session_cpu_s

BUSY = "import subprocess, sys, time\n" \
       "c = subprocess.Popen([sys.executable, '-c', 'import time\\nt=time.process_time()\\nwhile time.process_time()-t<0.4: pass\\ntime.sleep(30)'])\n" \
       "time.sleep(30)\n"


def test_session_cpu_counts_children_of_the_session():
    p = subprocess.Popen([sys.executable, "-c", BUSY], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and session_cpu_s(p.pid) < 0.4:
            time.sleep(0.1)
        # the child burnt 0.4 s CPU; both interpreters' start-up adds a little
        assert 0.4 <= session_cpu_s(p.pid) < 5.0
        assert session_cpu_s(p.pid + 10_000_000) == 0.0  # no such session
    finally:
        import os
        import signal
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
