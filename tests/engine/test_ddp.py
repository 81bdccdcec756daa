"""DDP: two CPU processes (gloo) launched by torchrun train in lock-step and end identical."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent

SCRIPT = """
import sys
from pathlib import Path

import torch

sys.path.insert(0, {tests!r})
from test_train import Rectangles, make_cfg  # noqa: E402

from medsa.engine.distributed import cleanup_distributed, init_distributed  # noqa: E402
from medsa.engine.train import Trainer, build_model  # noqa: E402

torch.set_num_threads(1)
out = Path({out!r})
info = init_distributed(torch.device("cpu"))
cfg = make_cfg(out, train={{"max_steps": 3}}, logging={{"tensorboard": True}})
torch.manual_seed(0)
model = build_model(cfg)
init = {{n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}}
tr = Trainer(cfg, Rectangles(8), Rectangles(3, seed=4), model=model, dist=info)
assert tr.dist.world_size == 2 and tr.steps_per_epoch == 2  # 8 images / 2 ranks / batch 2
summary = tr.fit()
final = {{n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}}
torch.save({{"init": init, "final": final, "val": summary["best_val_dice"]}},
           out / f"rank{{info.rank}}.pt")
cleanup_distributed()
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes_agree(tmp_path: Path) -> None:
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(SCRIPT.format(tests=str(HERE), out=str(tmp_path / "run"))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc_per_node", "2", str(script)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "run" / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "run" / "rank1.pt", weights_only=True)
    for name, p0 in r0["final"].items():
        assert torch.equal(p0, r1["final"][name]), name  # gradients were all-reduced
    assert any(not torch.equal(p, r0["init"][n]) for n, p in r0["final"].items())  # it trained
    assert r0["val"] == r1["val"]  # validation Dice is reduced over ranks
    # only rank 0 writes: one CSV header, one tensorboard event file, one set of checkpoints
    run = tmp_path / "run"
    rows = (run / "log.csv").read_text().splitlines()
    assert rows.count(rows[0]) == 1 and sum(r.startswith("train") for r in rows) == 3
    assert len(list((run / "tensorboard").iterdir())) == 1
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 3
    for n, p in r0["final"].items():
        assert torch.equal(state["model"][n], p)
