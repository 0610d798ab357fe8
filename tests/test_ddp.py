"""DDP: the engine under ``torchrun --nproc-per-node 2`` on CPU with gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paploss.data import make_dataset, search_split
from tests._servers import free_port

SCRIPT = """
import json, os, sys, torch
from paploss.engine import TrainConfig, train
cfg = TrainConfig(**json.loads(sys.argv[1]))
r = train(cfg, progress=False)
rank = int(os.environ["RANK"])
json.dump({"rank": rank, "world": int(os.environ["WORLD_SIZE"]), "losses": r.losses, "metrics": r.metrics,
           "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None},
          open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w"))
"""


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path):
    root = make_dataset("shapes", tmp_path / "shapes", n_train=24, n_val=6, image_size=64, progress=False)
    search_split(root)
    cfg = dict(data=str(root), train_ann="search_train", val_ann="search_val", detector="retinanet_mobilenet_v3_small",
               image_size=64, fpn_channels=16, anchor_size=8.0, batch_size=4, iterations=4, warmup_iters=1,
               num_threads=1, device="cpu", out_dir=str(tmp_path / "run"), checkpoint_every=2, max_val_images=6)
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
         str(script), json.dumps(cfg), str(tmp_path)],
        capture_output=True, text=True, timeout=900, env=env, cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == 2 and r1["world"] == 2
    # both ranks saw the all-reduced loss of every iteration and the metrics of rank 0
    assert r0["losses"] == r1["losses"] and len(r0["losses"]) == 4
    assert r0["metrics"] == r1["metrics"] and set(r0["metrics"]) >= {"AP", "AP50"}
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["iteration"] == 4 and state["done"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["iterations"] == 4
