"""CPU serving: threads from the available cores, native bf16 detection, and glibc keeping freed memory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

from pipeline import cpu

# A fresh interpreter allocates and frees a 64 MB tensor (over glibc's 32 MB mmap ceiling) 40
# times. It prints the page faults of the last 10 (each one a fresh mmap unless freed memory is
# kept; the first few reuses still grow the heap, as glibc splits aligned blocks), how much the
# resident memory grew inside, and how much of that is still held after the block.
FAULTS_PER_ALLOCATION = textwrap.dedent(
    """
    import contextlib, resource, sys
    from pipeline.cpu import keep_freed_memory
    import torch
    def resident_mb():
        return int([line.split()[1] for line in open("/proc/self/status") if line.startswith("VmRSS:")][0]) / 1024
    start = resident_mb()
    with keep_freed_memory() if sys.argv[1] == "keep" else contextlib.nullcontext(False) as applied:
        for index in range(40):
            if index == 30:
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            torch.empty(16 << 20).fill_(1.0)
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
        inside = resident_mb() - start
    print(applied, faults, inside, resident_mb() - start)
    """
)


def faults_per_allocation(mode: str, **env) -> tuple[bool, float, float, float]:
    """(in effect, page faults per allocation, MB grown inside the block, MB still held after it)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    result = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_ALLOCATION, mode], env={**environment, **env},
        capture_output=True, text=True, encoding="utf-8", timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    applied, faults, inside, after = result.stdout.split()
    return applied == "True", float(faults), float(inside), float(after)


def test_freed_memory_is_reused_inside_the_block_and_handed_back_after_it():
    plain_applied, plain, _, _ = faults_per_allocation("plain")
    applied, kept, inside_mb, after_mb = faults_per_allocation("keep")
    assert not plain_applied and applied
    # 64 MB is 16,384 pages of 4 KB: without the block each allocation faults all of them in.
    assert plain > 8000, plain
    assert kept < 200, kept
    # Reused, not hoarded: 40 blocks of 64 MB, never more than one alive; and given back on leaving.
    assert 64 <= inside_mb < 800, inside_mb
    assert after_mb < 64, after_mb


# After one (empty) block, blocks of 1 MB and 16 MB are allocated and freed 30 times each; the
# page faults of the last 10 of each size are printed. Without the block glibc serves them from
# its heap; a block that left its thresholds at their start values would mmap every one.
AFTER_THE_BLOCK = textwrap.dedent(
    """
    import resource
    from pipeline.cpu import keep_freed_memory
    import torch
    with keep_freed_memory() as applied:
        assert applied  # glibc, no malloc variables in the environment
    for elements in (1 << 18, 4 << 20):
        for index in range(30):
            if index == 20:
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            torch.empty(elements).fill_(1.0)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
    """
)


def test_leaving_the_block_restores_glibcs_usual_reuse():
    result = subprocess.run([sys.executable, "-c", AFTER_THE_BLOCK], capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    faults_1mb, faults_16mb = (float(line) for line in result.stdout.split())
    # 256 and 4,096 pages: each would fault in afresh if every block were its own mmap.
    assert faults_1mb < 50 and faults_16mb < 50, (faults_1mb, faults_16mb)


def test_an_explicit_glibc_setting_in_the_environment_wins():
    applied, faults, _, _ = faults_per_allocation("keep", MALLOC_MMAP_MAX_="65536")
    assert not applied
    assert faults > 8000, faults


def test_thread_count_follows_the_cores_available_to_the_process(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert 1 <= cpu.available_cores() <= 3
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    previous = torch.get_num_threads()
    try:
        threads = cpu.apply_thread_count()
        assert threads == cpu.available_cores() == torch.get_num_threads()
        assert cpu.apply_thread_count(processes=8) == 1
    finally:
        torch.set_num_threads(previous)


def test_native_bf16_reads_the_cpu_flags(monkeypatch, tmp_path):
    flags = tmp_path / "cpuinfo"
    flags.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    real_path = cpu.Path
    monkeypatch.setattr(cpu, "Path", lambda name: flags if name == "/proc/cpuinfo" else real_path(name))
    assert cpu.native_bf16("cpu")
    flags.write_text("flags\t\t: fpu sse2 avx2 avx512f\n")
    assert not cpu.native_bf16("cpu")


# A process forked inside the block (as segment's reader is) allocates and frees a 64 MB tensor 20
# times and prints the page faults of the last 10 and whether it believes itself inside a block.
FORKED_INSIDE = textwrap.dedent(
    """
    import multiprocessing, resource
    from pipeline import cpu
    import torch

    def child(queue):
        for index in range(20):
            if index == 10:
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            torch.empty(16 << 20).fill_(1.0)
        queue.put(((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10, cpu._keeping["depth"]))

    with cpu.keep_freed_memory() as applied:
        assert applied
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        process = context.Process(target=child, args=(queue,))
        process.start()
        print(*queue.get(timeout=60))
        process.join()
    """
)


def test_a_process_forked_inside_the_block_starts_outside_it():
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    result = subprocess.run([sys.executable, "-c", FORKED_INSIDE], env=environment, capture_output=True, text=True,
                            encoding="utf-8", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    faults, depth = result.stdout.split()
    # glibc's usual behaviour: each 64 MB block is its own mmap (16,384 pages faulted in), handed back when freed
    assert float(faults) > 8000 and int(depth) == 0, result.stdout
