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


# ----------------------------------------------------------------------------------
# A DDP step equals the single-process step on the global batch
# ----------------------------------------------------------------------------------

WORLD = 2


def _init_gloo(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)


def _toy_batch():
    """A global batch of 4 "images" (float64): inputs (4, 3, 5, 5), targets (4, 3, 5, 5)
    in {-1, 0, 1}, few positives; the same on every process (seeded)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    r = torch.rand(4, 3, 5, 5, generator=g)
    t = torch.where(r < 0.08, 1, torch.where(r < 0.2, -1, 0))
    return x, t


def _toy_model(global_bn: bool) -> torch.nn.Module:
    """conv -> batch norm -> conv, float64: 4 output channels, 3 class logits and a quality logit."""
    from paploss.distributed import convert_batchnorm

    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                              torch.nn.Conv2d(6, 4, 1)).double()
    return convert_batchnorm(net) if global_bn else net


def _toy_loss(net, x, t, spec, top_k, gather: bool):
    """The PAP loss of the toy model: scores = channels 0-2, u = sigmoid(channel 3) per class."""
    from paploss.distributed import gather_ranked_entries
    from paploss.loss import pap_loss

    out = net(x)
    s = out[:, :3]
    u = torch.sigmoid(out[:, 3:4]).expand_as(s)
    if gather:
        s, t, u = gather_ranked_entries(s, t, u, top_k)
    return pap_loss(s.reshape(-1), t.reshape(-1), u.reshape(-1), spec, top_k=top_k)


_TOY_CASES = (("theta", None), ("theta", 20), ("square", 7))


def _toy_spec(name: str):
    from paploss.spec import LossSpec

    if name == "square":
        return LossSpec.handcrafted("square")
    return LossSpec.from_theta(torch.rand(41, generator=torch.Generator().manual_seed(11)).tolist())


def _toy_step(net, x, t, spec, top_k, gather: bool) -> dict:
    """One SGD step; the loss, the gradients, the weights and BN buffers after it."""
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    loss = _toy_loss(net, x, t, spec, top_k, gather)
    opt.zero_grad()
    loss.backward()
    grads = [p.grad.reshape(-1).tolist() for p in net.parameters()]
    opt.step()
    inner = net.module if hasattr(net, "module") else net
    return {"loss": float(loss.detach()), "grads": grads, "state": [v.reshape(-1).double().tolist()
                                                          for v in inner.state_dict().values()]}


def _toy_worker(rank: int, port: int, out: str) -> None:
    _init_gloo(rank, port)
    x, t = _toy_batch()
    mine = slice(rank * 2, rank * 2 + 2)  # each process takes its half of the global batch
    results = {}
    for name, top_k in _TOY_CASES:
        for gather in (True, False):  # False: each process ranks its own half (per-process batch norm too)
            net = torch.nn.parallel.DistributedDataParallel(_toy_model(global_bn=gather))
            results[f"{name}-{top_k}-{gather}"] = _toy_step(net, x[mine], t[mine], _toy_spec(name), top_k, gather)
    Path(out, f"toy{rank}.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


def _max_diff(a, b) -> float:
    return max((abs(p - q) for u, v in zip(a, b) for p, q in zip(u, v)), default=0.0)


def test_ddp_step_of_the_gathered_loss_equals_one_process(tmp_path):
    """2 gloo processes, each with half of a float64 global batch: the gathered PAP loss
    (and global batch norm) give every process the loss of the global batch, and the DDP
    step's averaged gradients and weights equal those of pap_loss on the concatenated
    global batch in one process; ranking each half alone does not."""
    torch.multiprocessing.spawn(_toy_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD)
    ranks = [json.loads((tmp_path / f"toy{r}.json").read_text()) for r in range(WORLD)]
    x, t = _toy_batch()
    for name, top_k in _TOY_CASES:
        one = _toy_step(_toy_model(global_bn=False), x, t, _toy_spec(name), top_k, gather=False)
        for r in ranks:
            got = r[f"{name}-{top_k}-True"]
            print(f"{name} top_k={top_k} rank vs one process: |loss diff| {abs(got['loss'] - one['loss']):.3g}, "
                  f"max |grad diff| {_max_diff(got['grads'], one['grads']):.3g}, max |weight/buffer diff| "
                  f"{_max_diff(got['state'], one['state']):.3g}; ranked alone: max |grad diff| "
                  f"{_max_diff(r[f'{name}-{top_k}-False']['grads'], one['grads']):.3g}")
            assert abs(got["loss"] - one["loss"]) < 1e-12, (name, top_k, got["loss"], one["loss"])
            assert _max_diff(got["grads"], one["grads"]) < 1e-10, (name, top_k)
            assert _max_diff(got["state"], one["state"]) < 1e-10, (name, top_k)
            # the check can fail: ranking each half alone gives another loss and step
            alone = r[f"{name}-{top_k}-False"]
            assert _max_diff(alone["grads"], one["grads"]) > 1e-4, (name, top_k)
        assert ranks[0][f"{name}-{top_k}-True"] == ranks[1][f"{name}-{top_k}-True"]


def test_gather_is_the_identity_without_a_process_group():
    from paploss.distributed import gather_ranked_entries, gather_rows, world

    assert world() == 1
    x = torch.randn(5, 3)
    assert gather_rows(x) is x
    s, t, u = torch.randn(2, 4), torch.ones(2, 4), torch.rand(2, 4)
    gs, _gt, gu = gather_ranked_entries(s, t, u, top_k=1)
    assert gs.shape == (8,) and torch.equal(gs, s.reshape(-1)) and torch.equal(gu, u.reshape(-1))


def test_global_batchnorm_is_batchnorm_in_one_process():
    from paploss.distributed import GlobalBatchNorm2d, convert_batchnorm

    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3))
    net = convert_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3)))
    net.load_state_dict(ref.state_dict())
    assert isinstance(net[1], GlobalBatchNorm2d) and net.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(4, 2, 3, 3)
    assert torch.equal(net(x), ref(x))


def _engine_cfg(root: Path, out: Path) -> dict:
    from paploss.spec import LossSpec

    return dict(data=str(root), train_ann="search_train", val_ann="search_val",
                detector="retinanet_mobilenet_v3_small", loss="paploss", spec=LossSpec.handcrafted("square").to_dict(),
                image_size=64, fpn_channels=16, anchor_size=8.0, batch_size=4, iterations=2, warmup_iters=0,
                lr=0.02, num_threads=1, device="cpu", out_dir=str(out), max_val_images=4, eval_batch_size=4)


def _engine_worker(rank: int, port: int, cfg: dict, out: str) -> None:
    """``paploss.engine.train`` as rank ``rank`` of 2 (the engine starts the process group
    from the environment, as under torchrun); records every call of the evaluation."""
    import paploss.engine as engine

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    real = engine.evaluate_model

    def counted(*args, **kwargs):
        with open(Path(out, "evaluations.txt"), "a") as f:
            f.write(f"{rank}\n")
        return real(*args, **kwargs)

    engine.evaluate_model = counted
    r = engine.train(engine.TrainConfig(**cfg), progress=False)
    Path(out, f"engine{rank}.json").write_text(json.dumps({"losses": r.losses, "metrics": r.metrics}))


@pytest.mark.slow
def test_ddp_training_equals_one_process_and_evaluates_once_on_rank_0(tmp_path):
    """The engine under DDP (2 gloo processes, 2 images each) and in one process (4 images)
    on the same global batches: the same losses and weights after 2 steps of the PAP loss;
    AP is computed once, by rank 0."""
    import paploss.engine as engine

    root = make_dataset("shapes", tmp_path / "shapes", n_train=8, n_val=4, image_size=64, progress=False)
    search_split(root)
    ddp_cfg = _engine_cfg(root, tmp_path / "ddp")
    torch.multiprocessing.spawn(_engine_worker, args=(free_port(), ddp_cfg, str(tmp_path)), nprocs=WORLD)
    one = engine.train(engine.TrainConfig(**_engine_cfg(root, tmp_path / "one")), progress=False)

    r0, r1 = (json.loads((tmp_path / f"engine{r}.json").read_text()) for r in range(WORLD))
    assert (tmp_path / "evaluations.txt").read_text().split() == ["0"]  # rank 1 never evaluates
    assert r0["metrics"] == r1["metrics"] and set(r0["metrics"]) >= {"AP", "AP50"}
    assert r0["losses"] == r1["losses"]
    loss_diff = max(abs(a - b) for a, b in zip(r0["losses"], one.losses))
    assert len(r0["losses"]) == 2 and loss_diff < 1e-5, (r0["losses"], one.losses)
    ddp = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)["model"]
    state = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    ref = state["model"]
    assert ddp.keys() == ref.keys()
    weight_diff = max(float((ddp[k].double() - ref[k].double()).abs().max()) for k in ref if ref[k].numel())
    torch.manual_seed(0)  # the weights both runs started from
    start = engine.build_model(engine.TrainConfig(**ddp_cfg), len(state["categories"])).state_dict()
    moved = max(float((ref[k].double() - start[k].double()).abs().max()) for k in ref
                if ref[k].is_floating_point() and ref[k].numel() and "running" not in k)
    print(f"DDP vs one process: max |loss diff| {loss_diff:.3g}, max |weight diff| {weight_diff:.3g} "
          f"(weights moved up to {moved:.3g})")
    assert weight_diff < 1e-5 and moved > 1e-3
