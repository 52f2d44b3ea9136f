"""GPU monitoring: nvidia-smi's CSV, a host without it, foreign processes, one query per interval."""

from __future__ import annotations

import subprocess

import pytest

from mqi.gpu import (
    GpuCache,
    GpuProcess,
    GpuReport,
    foreign_processes,
    in_devices,
    our_pids,
    parse_gpus,
    parse_processes,
    query_gpus,
)
from mqi.transport.local import LocalTransport
from tests.support.nvidia_smi import (
    DRIVER_NOT_LOADED,
    gpu,
    gpu_uuid,
    install_fake_nvidia_smi,
    process,
    start_compute_process,
    stop_processes,
)

# As nvidia-smi 535 prints them, including what it cannot read on some boards.
REAL_GPU_LINES = """\
0, GPU-5f3c3a52-8c2b-1c1d-9a0e-77a4c1d2e3f4, NVIDIA A100-SXM4-40GB, 87, 31245, 40960
1, GPU-0a1b2c3d-4e5f-6789-abcd-ef0123456789, NVIDIA GeForce RTX 3090, [N/A], [Not Supported], 24576
"""
REAL_PROCESS_LINES = """\
GPU-5f3c3a52-8c2b-1c1d-9a0e-77a4c1d2e3f4, 41231, /opt/moqui/bin/moqui, 30210
GPU-5f3c3a52-8c2b-1c1d-9a0e-77a4c1d2e3f4, 5120, [N/A], [N/A]
"""


def test_gpu_lines_with_unreadable_values():
    a100, rtx = parse_gpus(REAL_GPU_LINES)
    assert (
        a100.index,
        a100.name,
        a100.utilization_percent,
        a100.memory_used_mib,
        a100.memory_total_mib,
    ) == (0, "NVIDIA A100-SXM4-40GB", 87, 31245, 40960)
    assert a100.uuid == "GPU-5f3c3a52-8c2b-1c1d-9a0e-77a4c1d2e3f4"
    assert (rtx.index, rtx.utilization_percent, rtx.memory_used_mib, rtx.memory_total_mib) == (
        1,
        None,
        None,
        24576,
    )


def test_process_lines_with_unreadable_values():
    moqui, unknown = parse_processes(REAL_PROCESS_LINES)
    assert moqui == GpuProcess(
        "GPU-5f3c3a52-8c2b-1c1d-9a0e-77a4c1d2e3f4", 41231, "/opt/moqui/bin/moqui", 30210
    )
    assert (unknown.pid, unknown.name, unknown.used_memory_mib) == (5120, "[N/A]", None)


def test_commas_inside_names_stay_in_the_name():
    [card] = parse_gpus("3, GPU-x, Tesla V100, SXM2, 32GB, 5, 100, 32768\n")
    assert (card.index, card.name, card.utilization_percent, card.memory_total_mib) == (
        3,
        "Tesla V100, SXM2, 32GB",
        5,
        32768,
    )
    [job] = parse_processes("GPU-x, 77, /home/a,b/run, --fast, 900\n")
    assert (job.pid, job.name, job.used_memory_mib) == (77, "/home/a,b/run, --fast", 900)


def test_empty_output_and_the_no_processes_line_mean_none():
    assert parse_gpus("") == ()
    assert parse_processes("No running processes found\n") == ()


def test_report_from_the_stand_in_through_a_transport(tmp_path):
    smi = install_fake_nvidia_smi(
        tmp_path,
        [gpu(0, utilization=35, used=1000), gpu(1, "Tesla, V100", utilization="[N/A]")],
        [process(0, 4242)],
    )
    report = query_gpus(LocalTransport("gpu-a"), 10, str(smi.bin))
    assert report.problem is None and report.host == "gpu-a"
    assert [(g.index, g.name, g.utilization_percent, g.memory_used_mib) for g in report.gpus] == [
        (0, "NVIDIA A100-SXM4-40GB", 35, 1000),
        (1, "Tesla, V100", None, 0),
    ]
    assert [(p.gpu_uuid, p.pid) for p in report.processes] == [(gpu_uuid(0), 4242)]
    assert report.checked_at.tzinfo is not None


def test_a_host_without_nvidia_smi_gets_a_report_not_an_error(tmp_path):
    report = query_gpus(LocalTransport("cpu-box"), 10, str(tmp_path / "no" / "nvidia-smi"))
    assert report.gpus == () and report.problem.startswith("nvidia-smi not available")


def test_a_failing_nvidia_smi_is_reported_with_its_message(tmp_path):
    smi = install_fake_nvidia_smi(tmp_path, [gpu(0)])
    smi.fail(*DRIVER_NOT_LOADED)
    report = query_gpus(LocalTransport("gpu-a"), 10, str(smi.bin))
    assert report.gpus == ()
    assert (
        "exit code 9" in report.problem
        and "couldn't communicate with the NVIDIA driver" in report.problem
    )


def test_stand_in_refuses_bad_flags_like_nvidia_smi(tmp_path):
    smi = install_fake_nvidia_smi(tmp_path, [gpu(0)])
    bad_field = subprocess.run(
        [smi.bin, "--query-gpu=index,bogus", "--format=csv"], capture_output=True, text=True
    )
    assert (bad_field.returncode, bad_field.stdout) == (
        2,
        'Field "bogus" is not a valid field to query.\n\n',
    )
    no_format = subprocess.run([smi.bin, "--query-gpu=index"], capture_output=True, text=True)
    assert (
        no_format.returncode == 2 and "Invalid combination of input arguments" in no_format.stdout
    )
    with_units = subprocess.run(
        [smi.bin, "--query-gpu=index,memory.used", "--format=csv"], capture_output=True, text=True
    )
    assert with_units.stdout == "index, memory.used [MiB]\n0, 0 MiB\n"


# -- which processes are foreign ------------------------------------------------------------

REPORT = GpuReport(
    "gpu-a",
    gpus=tuple(
        parse_gpus(
            "0, GPU-aaa, A100, 0, 0, 40960\n1, GPU-bbb, A100, 0, 0, 40960\n2, GPU-ccc, A100, 0, 0, 40960\n"
        )
    ),
    processes=(
        GpuProcess("GPU-aaa", 100, "moqui", 1),
        GpuProcess("GPU-bbb", 200, "someone-elses-training", 1),
        GpuProcess("GPU-ccc", 300, "moqui", 1, ours=True),  # marked ours by the query
    ),
)


@pytest.mark.parametrize(
    ("devices", "ours", "foreign_pids"),
    [
        ("0", (), [100]),
        ("0", (100,), []),  # our own task is not foreign
        ("2", (), []),
        ("0,1", (100,), [200]),
        ("1, 2", (), [200]),
        ("GPU-bb", (), [200]),  # CUDA also takes a GPU by (the start of) its UUID
        (None, (100,), [200]),  # no devices: the group may use every GPU
    ],
)
def test_foreign_processes_of_a_group(devices, ours, foreign_pids):
    assert [p.pid for p in foreign_processes(REPORT, devices, our_pids=ours)] == foreign_pids


def test_device_index_does_not_match_by_digit_prefix():
    ten = parse_gpus("10, GPU-zzz, A100, 0, 0, 1\n")[0]
    assert not in_devices(ten, "1") and in_devices(ten, "10")


def test_our_pids_are_those_of_processes_started_for_a_case():
    transport = LocalTransport("gpu-a")
    ours, theirs = start_compute_process(ours=True), start_compute_process(ours=False)
    try:
        assert our_pids(transport, [ours.pid, theirs.pid, 999_999_999], timeout=10) == {ours.pid}
        assert our_pids(transport, [], timeout=10) == set()
    finally:
        stop_processes(ours, theirs)


# -- once per poll interval ----------------------------------------------------------------


def test_cache_queries_a_host_once_per_interval(tmp_path):
    smi = install_fake_nvidia_smi(tmp_path, [gpu(0)])
    now = [1000.0]
    cache = GpuCache(interval=10, clock=lambda: now[0])
    transport = LocalTransport("gpu-a")

    def query():
        return query_gpus(transport, 10, str(smi.bin))

    first = cache.get("gpu-a", query)
    now[0] += 9
    assert cache.get("gpu-a", query) is first
    assert len(smi.calls()) == 2  # one report = the GPU query and the process query
    now[0] += 2
    assert cache.get("gpu-a", query) is not first
    assert len(smi.calls()) == 4


def test_cache_does_not_keep_failures():
    cache = GpuCache(interval=60, clock=lambda: 0.0)
    calls = []

    def failing():
        calls.append(1)
        raise TimeoutError("host gone")

    for _ in range(2):
        with pytest.raises(TimeoutError):
            cache.get("gpu-a", failing)
    assert len(calls) == 2


def test_query_over_ssh_uses_the_open_connection_and_tells_our_processes(sshd, tmp_path):
    from mqi.transport.ssh import SshTransport

    ours, theirs = start_compute_process(ours=True), start_compute_process(ours=False)
    smi = install_fake_nvidia_smi(
        tmp_path,
        [gpu(0, utilization=50)],
        [process(0, ours.pid, "/usr/bin/moqui"), process(0, theirs.pid)],
    )
    transport = SshTransport(**sshd.transport_params("gpu-ssh"))
    try:
        transport.run(["true"], timeout=10)
        report = query_gpus(transport, 10, str(smi.bin))
        missing = query_gpus(transport, 10, "/opt/nowhere/nvidia-smi")
        assert transport.connections_opened == 1
    finally:
        transport.close()
        stop_processes(ours, theirs)
    assert [(g.index, g.utilization_percent) for g in report.gpus] == [(0, 50)]
    assert [(p.pid, p.name, p.ours) for p in report.processes] == [
        (ours.pid, "/usr/bin/moqui", True),
        (theirs.pid, "/usr/bin/python3", False),
    ]
    assert [p.pid for p in foreign_processes(report, "0")] == [theirs.pid]
    assert missing.problem.startswith("nvidia-smi not available")
