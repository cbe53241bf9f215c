"""numpy is not a dependency: a W=2 optimizer, its steps and a checkpoint round trip work without it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

WORKER = '''
import torch
import adams_dist


def train_and_checkpoint(rank, world, path):
    try:
        import numpy  # noqa: F401
        hidden = False
    except ImportError:
        hidden = True
    torch.manual_seed(0)
    model = torch.nn.Linear(7, 5)
    opt = adams_dist.Adams_ZeRO(model.parameters(), lr=1e-2)
    for step in range(3):
        torch.manual_seed(100 * step + rank)
        model(torch.randn(4, 7)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    adams_dist.save_checkpoint(path, model, opt, step=3)
    with torch.no_grad():
        model.weight.zero_()
    extra = adams_dist.load_checkpoint(path, model, opt)
    return hidden, extra["step"], model.weight.sum().item()
'''


def test_zero_optimizer_and_checkpoint_without_numpy(tmp_path: Path) -> None:
    shadow = tmp_path / "numpy"
    shadow.mkdir()
    (shadow / "__init__.py").write_text('raise ModuleNotFoundError("numpy is hidden for this test")\n')
    (tmp_path / "no_numpy_worker.py").write_text(WORKER)
    script = textwrap.dedent(f"""
        from adams_dist.testing import run
        import no_numpy_worker
        print(run(no_numpy_worker.train_and_checkpoint, 2, {str(tmp_path / "ckpt.pt")!r}, timeout=120))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=200)
    assert out.returncode == 0, out.stderr[-3000:]
    results = eval(out.stdout.strip().splitlines()[-1])  # [(hidden, step, weight sum) per rank]
    assert [r[0] for r in results] == [True, True], "numpy was importable: the test proves nothing"
    assert [r[1] for r in results] == [3, 3]
    assert results[0][2] == results[1][2] != 0.0  # the weights came back from the checkpoint on both ranks
