"""The CPU thread choice reads what other processes use now (faked busy/idle machines, no timing)."""
from __future__ import annotations

from bora_lab.engine.threads import CpuSample, choose_threads, sample_cpu


def machine(cores: int, others: float, own: float = 0.0, ticks_per_core: float = 25.0):
    """A sample in which other processes kept ``others`` cores busy and we used ``own`` cores."""
    total = cores * ticks_per_core
    return lambda: CpuSample(total=total, busy=(others + own) * ticks_per_core, own=own * ticks_per_core, cores=cores)


def test_idle_machine_uses_every_core():
    n, why = choose_threads(2, machine(2, others=0.0))
    assert n == 2 and "idle" in why


def test_our_own_work_does_not_count():
    """The app's own threads (a previous comparison, the server) are not 'other processes'."""
    n, why = choose_threads(2, machine(2, others=0.0, own=1.9))
    assert n == 2 and "idle" in why


def test_another_heavy_process_takes_a_core():
    n, why = choose_threads(2, machine(2, others=1.0))
    assert n == 1 and "busy with other processes (1.0 core)" in why


def test_a_lightly_busy_core_still_counts_as_free():
    assert choose_threads(2, machine(2, others=0.3))[0] == 2
    assert choose_threads(2, machine(2, others=0.8))[0] == 1
    assert choose_threads(8, machine(8, others=3.0))[0] == 5


def test_fully_busy_machine_keeps_one_thread():
    assert choose_threads(2, machine(2, others=2.0))[0] == 1


def test_never_more_than_torch_default():
    assert choose_threads(1, machine(4, others=0.0))[0] == 1


def test_no_proc_keeps_the_default():
    n, why = choose_threads(4, lambda: None)
    assert n == 4 and "torch's default" in why


def test_real_sample_is_sane():
    s = sample_cpu(0.05)
    if s is not None:  # Linux
        assert s.cores >= 1 and s.total > 0 and 0 <= s.busy <= s.total
