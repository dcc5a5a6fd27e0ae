"""Running one script as several JAX processes on localhost (`jax.distributed`)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from helpers import REPO, xla_flags_with_devices


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(
    code: str,
    tmp_path: Path,
    *args: str,
    processes: int = 2,
    devices: int = 4,
    timeout: float = 240,
) -> list[dict]:
    """Run `code` as `processes` processes of `devices` CPU devices each; each gets
    `sys.argv[1:] == [coordinator address, process id, *args]` and prints a JSON
    report as its last line. Returns the reports; fails with each process's output
    when one fails (or when any outlives `timeout` seconds)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = xla_flags_with_devices(devices)
    address = f"127.0.0.1:{_free_port()}"
    procs, logs = [], []
    for i in range(processes):
        out, err = tmp_path / f"out{i}", tmp_path / f"err{i}"
        with out.open("w") as stdout, err.open("w") as stderr:
            cmd = [sys.executable, "-c", code, address, str(i), *args]
            procs.append(
                subprocess.Popen(
                    cmd, stdout=stdout, stderr=stderr, env=env, cwd=REPO, text=True
                )
            )
        logs.append((out, err))
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    reports = []
    for proc, (out, err) in zip(procs, logs, strict=True):
        stdout = out.read_text()
        stderr = [line for line in err.read_text().splitlines() if "[Gloo]" not in line]
        assert proc.returncode == 0, (
            f"process failed (rc {proc.returncode}):\n{stdout}\n" + "\n".join(stderr)
        )
        reports.append(json.loads(stdout.strip().splitlines()[-1]))
    return reports
