"""scripts/install_torch.sh picks where torch comes from: the CPU index without a GPU, the default index with
one or when the CPU index cannot be reached (DRY_RUN prints the pip command instead of running it)."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on return: connecting there is refused


def _pip_command(tmp_path: Path, gpu: bool, index: str) -> str:
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    smi = fake / "nvidia-smi"  # stands in for the driver's tool: lists a GPU, or fails as without a driver
    smi.write_text("#!/bin/sh\n" + ("echo 'GPU 0: Fake (UUID: GPU-0)'\n" if gpu else "exit 9\n"))
    smi.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "DRY_RUN": "1", "ADAMS_DIST_TORCH_INDEX": index}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "install_torch.sh")], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("gpu, reachable, expected_index", [
    (False, True, "cpu index"), (False, False, None), (True, True, None)])
def test_where_torch_comes_from(tmp_path: Path, gpu: bool, reachable: bool, expected_index: str | None) -> None:
    (tmp_path / "whl" / "cpu").mkdir(parents=True)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:  # a local stand-in for the CPU wheel index
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1] if reachable else _closed_port()
        index = f"http://127.0.0.1:{port}/whl/cpu/"
        command = _pip_command(tmp_path, gpu, index)
        server.shutdown()
    assert command.endswith("-m pip install " + ("--index-url " + index + " " if expected_index else "")
                            + "torch==2.13.0"), command
