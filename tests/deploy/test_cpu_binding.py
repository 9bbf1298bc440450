"""The local mesh's CPU plan (deploy/cpu_binding.py): the CPU-list format Linux uses, and which
CPUs each process gets."""

import os
import subprocess
import sys

import pytest

from deploy.cpu_binding import (ENV, format_cpu_list, parse_cpu_list, plan_cpus,
                                threads_per_worker, workers_on_cpu)


def test_cpu_lists_read_and_write_as_linux_writes_them():
    assert parse_cpu_list("0-3,8") == {0, 1, 2, 3, 8}
    assert parse_cpu_list("5") == {5}
    assert format_cpu_list({0, 1, 2, 3, 8, 10, 11}) == "0-3,8,10-11"
    assert format_cpu_list(parse_cpu_list("2,0-1")) == "0-2"
    for bad in ("", "a", "3-1", "1,,2", "-2"):
        with pytest.raises(ValueError, match="not a CPU list"):
            parse_cpu_list(bad)


def test_each_worker_gets_cpus_of_its_own_from_the_top_and_the_rest_the_others():
    plan = plan_cpus(2, 2, set(range(8)))
    assert plan.workers == (frozenset({7, 6}), frozenset({5, 4}))
    assert plan.rest == frozenset({0, 1, 2, 3})
    assert plan.describe() == ("workers on CPUs 6-7, 4-5; gateways and schedulers on 0-3")
    assert plan_cpus(1, 1, {0, 1}).workers == (frozenset({1}),)


def test_no_binding_when_the_workers_leave_no_cpu_over():
    assert plan_cpus(2, 1, {0, 1}) is None  # two replicas on two cores: the kernel places them
    assert plan_cpus(1, 4, {0, 1, 2, 3}) is None
    assert plan_cpus(1, 1, {3}) is None


def test_the_workers_flags_say_where_they_compute_and_how_many_threads():
    assert workers_on_cpu(("--device", "cpu"))
    assert not workers_on_cpu(("--num-kv-blocks", "8", "--device", "cuda:1"))
    assert threads_per_worker(("--num-threads", "3")) == 3
    assert threads_per_worker(()) == 1


def test_a_service_process_runs_on_the_cpus_its_environment_names():
    """deploy/cli.py binds itself before anything else (as the mesh's processes start)."""
    cpu = min(os.sched_getaffinity(0))
    code = ("import os, sys; from deploy.cpu_binding import bind_from_env; bind_from_env(); "
            "import threading; t = threading.Thread(target=lambda: print(sorted("
            "os.sched_getaffinity(0)))); t.start(); t.join()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, ENV: str(cpu)}, timeout=60)
    assert done.stdout.strip() == f"[{cpu}]", done.stderr  # a thread started later inherits it
