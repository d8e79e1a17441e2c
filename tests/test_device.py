"""CPU thread advice: busy cores read from /proc/stat, and when torch's threads outnumber the idle cores."""

import os
import subprocess
import sys
import time

import pytest

from detlib.device import busy_between, busy_cores, thread_advice


def test_busy_cores_from_two_proc_stat_lines():
    cores = os.cpu_count() or 1
    # 100 ticks pass: 30 user + 10 system + 60 idle -> 40 % busy
    before = "cpu  1000 0 500 8000 0 0 0 0 0 0"
    after = "cpu  1030 0 510 8060 0 0 0 0 0 0"
    assert busy_between(before, after) == pytest.approx(0.4 * cores)
    # iowait counts as idle; no time passing is 0, not a division by zero
    assert busy_between(before, "cpu  1000 0 500 8050 50 0 0 0 0 0") == 0.0
    assert busy_between(before, before) == 0.0


def test_advice_only_when_threads_outnumber_idle_cores():
    assert thread_advice(None, 2, 2) is None  # not Linux
    assert thread_advice(0.1, 2, 2) is None  # quiet
    assert thread_advice(1.0, 1, 2) is None  # already one thread
    msg = thread_advice(1.0, 2, 2)
    assert msg is not None and "trainer.num_threads=1" in msg
    assert "trainer.num_threads=5" in thread_advice(3.0, 8, 8)


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux only")
def test_a_busy_core_is_seen():
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert busy_cores(0.5) >= 0.6
    finally:
        burner.kill()
        burner.wait()
