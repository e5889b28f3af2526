"""Stopping a child process: SIGTERM first, SIGKILL when it does not listen."""

from __future__ import annotations

import signal
import subprocess
import sys

from libs.common.process import terminate


def test_a_process_that_stops_on_sigterm_ends_with_it():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    terminate(child, timeout_s=10)
    assert child.returncode == -signal.SIGTERM


def test_a_process_that_ignores_sigterm_is_killed_after_the_timeout():
    child = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                               "print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    assert child.stdout.readline() == b"ready\n"  # the handler is in place
    terminate(child, timeout_s=0.5)
    assert child.returncode == -signal.SIGKILL
    child.stdout.close()


def test_nothing_to_do_for_no_process_or_one_that_ended():
    terminate(None, timeout_s=1)
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    terminate(done, timeout_s=1)
    assert done.returncode == 0
