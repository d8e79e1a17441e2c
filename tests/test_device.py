"""CPU thread advice (busy cores read from /proc/stat, and when torch's threads outnumber the idle cores), and the
precision ``trainer.amp=auto`` picks."""

import os
import subprocess
import sys
import time

import pytest
import torch

from detlib.device import busy_between, busy_cores, fast_bf16, resolve_amp, thread_advice


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads the CPU flags from /proc/cpuinfo")
def test_auto_precision_is_bf16_exactly_where_the_cpu_has_bf16_instructions():
    """Checked against the kernel's own list of CPU flags, not torch's probe that ``fast_bf16`` uses."""
    flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":")[1].split())
    has = bool(flags & {"avx512_bf16", "amx_bf16"})
    cpu = torch.device("cpu")
    assert (fast_bf16(cpu) is not None) == has
    assert resolve_amp("auto", cpu) == ("bf16" if has else "off")
    assert [resolve_amp(a, cpu) for a in ("off", "bf16", "fp16")] == ["off", "bf16", "fp16"]  # explicit: kept


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
