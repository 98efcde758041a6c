"""Thread choice: the spec, then OMP_NUM_THREADS, then the cores other processes leave free (followed while a run
trains); OpenMP's spin."""

import multiprocessing
import os
import subprocess
import sys
import time

from blueberry import threads


def test_spec_then_environment_then_free_cores(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    monkeypatch.setattr(threads, "cpu_set", lambda: set(range(8)))
    monkeypatch.setattr(threads, "busy_cores_elsewhere", lambda sample_s=0: 5.4)
    assert threads.choose_threads(3, {"OMP_NUM_THREADS": "2"}) == (3, "train.threads")
    assert threads.choose_threads(None, {"OMP_NUM_THREADS": "2"}) == (2, "OMP_NUM_THREADS")
    assert threads.choose_threads(None, {"OMP_NUM_THREADS": "lots"})[0] == 3  # 8 cores, 5.4 busy: 3 free
    monkeypatch.setattr(threads, "busy_cores_elsewhere", lambda sample_s=0: 12.0)  # oversubscribed
    assert threads.choose_threads(None, {}) == (1, "8 usable cores, 12.0 busy with other processes")
    monkeypatch.setattr(threads, "busy_cores_elsewhere", lambda sample_s=0: None)  # no /proc/stat
    assert threads.choose_threads(None, {}) == (8, "8 usable cores")
    # A cgroup limit of 2 cores on 8 CPUs of which 5.4 are busy: the limit, not the free CPUs, binds (a study's
    # parallel trials too, from the same free_cores).
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_cores_elsewhere", lambda sample_s=0: 5.4)
    assert threads.choose_threads(None, {})[0] == 2
    monkeypatch.setattr(threads, "cpu_set", lambda: set(range(64)))  # --cpus=2 on a host with 30 cores busy
    assert threads.free_cores(30.0) == 2 and threads.free_cores(63.5) == 0.5


def test_busy_time_counts_only_this_process_cpus(tmp_path):
    # A job pinned to CPUs 2-3 of a host whose CPUs 0-1 are busy: its own CPUs are idle.
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  400 0 0 200 0 0 0 0 0 0\n"
        "cpu0 100 0 0 0 0 0 0 0 0 0\ncpu1 100 0 0 0 0 0 0 0 0 0\n"
        "cpu2 0 0 0 90 10 0 0 0 0 0\ncpu3 5 0 0 95 0 0 0 0 0 0\nintr 1 2 3\n"
    )
    assert threads.busy_jiffies({2, 3}, str(stat)) == (5, 200)
    assert threads.busy_jiffies({0, 1, 2, 3}, str(stat)) == (205, 400)


def test_the_cgroup_cpu_limit_is_the_tightest_on_the_path_to_the_root(tmp_path, monkeypatch):
    membership = tmp_path / "cgroup"
    membership.write_text("0::/kubepods/pod1/ctr\n")
    root = tmp_path / "fs"
    (root / "kubepods/pod1/ctr").mkdir(parents=True)
    (root / "kubepods/pod1/ctr/cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(str(membership), str(root)) is None
    (root / "kubepods/pod1/cpu.max").write_text("150000 100000\n")  # --cpus=1.5 on the pod
    (root / "kubepods/cpu.max").write_text("400000 100000\n")
    assert threads.cgroup_cpu_limit(str(membership), str(root)) == 1.5
    with monkeypatch.context() as patch:
        patch.setattr(threads, "cgroup_cpu_limit", lambda: 1.5)
        patch.setattr(threads, "cpu_set", lambda: set(range(8)))
        assert threads.usable_cores() == 2  # threads for the limit, rounded up
    membership.write_text("1:cpu:/\n")  # cgroup v1 only
    assert threads.cgroup_cpu_limit(str(membership), str(root)) is None


def _spin(seconds):
    stop = time.time() + seconds
    while time.time() < stop:
        pass


def test_a_busy_neighbour_is_seen_and_our_own_work_is_not():
    started = time.process_time()
    while time.process_time() - started < 0.05:  # our own CPU time before sampling must not count
        pass
    spinner = multiprocessing.get_context("spawn").Process(target=_spin, args=(5.0,))
    spinner.start()
    try:
        time.sleep(0.5)
        busy = threads.busy_cores_elsewhere(0.5)
    finally:
        spinner.terminate()
        spinner.join()
    assert busy is not None and busy >= 0.5  # one process spinning on one core


def test_openmp_spins_briefly_unless_the_user_chose_its_waiting():
    environ = {}
    assert threads.limit_openmp_spinning(environ) and environ == {"GOMP_SPINCOUNT": threads.OPENMP_SPIN_COUNT}
    for mine in ({"GOMP_SPINCOUNT": "infinite"}, {"OMP_WAIT_POLICY": "active"}):
        environ = dict(mine)
        assert not threads.limit_openmp_spinning(environ) and environ == mine


def test_the_cli_sets_the_spin_count_before_torch_is_loaded():
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = "import os, sys, blueberry.cli; print(os.environ['GOMP_SPINCOUNT'], 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.stdout.split() == [threads.OPENMP_SPIN_COUNT, "False"], done.stderr


def test_a_run_follows_the_free_cores_after_two_looks_in_a_row(monkeypatch):
    # 8 CPUs; a look is a (wall s, own CPU s, busy ticks, total ticks) sample, 100 ticks per CPU-second
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    monkeypatch.setattr(threads, "cpu_set", lambda: set(range(8)))
    wall, own, busy = [0.0], [0.0], [0]

    def advance(seconds, own_cores, other_cores):  # the next second(s): we and the others use so many cores
        wall[0] += seconds
        own[0] += own_cores * seconds
        busy[0] += round((own_cores + other_cores) * seconds * 100)

    monkeypatch.setattr(threads, "cpu_sample", lambda cpus: (wall[0], own[0], busy[0], round(wall[0] * 800)))
    monkeypatch.setattr(threads.time, "monotonic", lambda: wall[0])
    set_to, said = [], []
    watch = threads.FreeCoresWatch(8, set_to.append, said.append, recheck_s=1.0)
    advance(0.5, 7.5, 0.0)
    watch()  # half a second after the start: no look yet
    advance(0.5, 7.5, 0.0)
    watch()  # a look: nobody else busy
    advance(1.0, 5.0, 3.0)  # a neighbour takes 3 cores: 5 free
    watch()
    assert set_to == []  # one look alone (a burst) moves nothing
    advance(1.0, 5.0, 3.0)
    watch()
    assert set_to == [5] and watch.threads == 5
    assert said == ["torch threads: 8 -> 5 (3.0 cores busy with other processes)"]
    advance(1.0, 5.0, 0.0)  # the neighbour is gone: all 8 free
    watch()
    advance(1.0, 1.0, 7.0)  # ... and others take 7 of the 8 cores: one look for 1, then one for 1 again
    watch()
    advance(1.0, 1.0, 7.0)
    watch()
    assert set_to == [5, 1]  # 8 was wanted once only
    advance(1.0, 1.0, 0.0)
    watch()
    advance(1.0, 1.0, 0.0)
    watch()
    assert set_to == [5, 1, 8]
    for _ in range(3):  # 7.4 free cores: closer to 8 than THREADS_MARGIN, so 8 it stays
        advance(1.0, 7.4, 0.6)
        watch()
    assert set_to == [5, 1, 8]
    for _ in range(2):  # 7.2 free: 7
        advance(1.0, 7.2, 0.8)
        watch()
    assert set_to == [5, 1, 8, 7]


def test_without_proc_stat_the_watch_does_nothing(monkeypatch):
    def missing(cpus):
        raise OSError("no /proc/stat")

    monkeypatch.setattr(threads, "cpu_sample", missing)
    set_to = []
    watch = threads.FreeCoresWatch(2, set_to.append, recheck_s=0.0)
    for _ in range(3):
        watch()
    assert set_to == [] and watch.threads == 2
