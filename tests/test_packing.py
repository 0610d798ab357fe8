"""Proxy trials packed per GPU (paploss.packing): requests, the memory check, MPS."""

from __future__ import annotations

import os

import pytest
import torch

from paploss.config import TrainConfig
from paploss.errors import InputError
from paploss.packing import (CONTEXT_BYTES, GiB, MIN_TRIAL_MEMORY, check_fits, check_gpu, estimate_trial_bytes,
                             mps_pipe_directory, mps_running, packing_note, parse_cpu, parse_memory, trial_resources)


@pytest.mark.parametrize("q, milli", [("4", 4000), ("0.5", 500), ("250m", 250), (" 16 ", 16000)])
def test_parse_cpu(q, milli):
    assert parse_cpu(q) == milli


@pytest.mark.parametrize("q, n", [("16G", 16 * 10**9), ("16Gi", 16 * GiB), ("512Mi", 512 << 20), ("1000", 1000),
                                  ("1.5Gi", 3 * GiB // 2), ("2T", 2 * 10**12)])
def test_parse_memory(q, n):
    assert parse_memory(q) == n


@pytest.mark.parametrize("bad", ["", "four", "-1", "4 cores", "1e3"])
def test_bad_quantities_are_one_clear_error(bad):
    with pytest.raises(InputError, match="not a CPU quantity"):
        parse_cpu(bad)
    with pytest.raises(InputError, match="not a memory quantity"):
        parse_memory(bad)


def test_one_trial_per_gpu_keeps_the_requests():
    r = trial_resources(1, cpu="4", memory="16Gi")
    assert (r.accelerator, r.accelerator_limit, r.cpu, r.memory, r.gpu_fraction) == \
        ("nvidia.com/gpu", 1, "4000m", "16384Mi", 1.0)


@pytest.mark.parametrize("k", [1, 2, 3, 7, 8, 16])
def test_k_trials_split_one_gpu_share_and_fit_it(k):
    cpu, memory = "16", "128Gi"
    r = trial_resources(k, cpu=cpu, memory=memory, accelerator="nvidia.com/gpu.shared")
    assert r.trials_per_gpu == k and r.accelerator == "nvidia.com/gpu.shared" and r.accelerator_limit == 1
    assert r.gpu_fraction == pytest.approx(1 / k)
    # k trials together ask for no more than the GPU's share, and for all but rounding of it
    assert k * parse_cpu(r.cpu) <= parse_cpu(cpu) and parse_cpu(cpu) - k * parse_cpu(r.cpu) < k
    assert k * parse_memory(r.memory) <= parse_memory(memory)
    assert parse_memory(memory) - k * parse_memory(r.memory) < k * (1 << 20)


def test_too_many_trials_for_the_host_memory_is_refused():
    with pytest.raises(InputError, match=r"trials_per_gpu: 16 trials per GPU give each 1.00 GiB .* at most 8"):
        trial_resources(16, memory="16Gi")
    assert trial_resources(8, memory="16Gi").memory == f"{MIN_TRIAL_MEMORY >> 20}Mi"


@pytest.mark.parametrize("k", [0, -1, True, 2.0, "8"])
def test_trials_per_gpu_must_be_a_positive_integer(k):
    with pytest.raises(InputError, match="trials_per_gpu: must be an integer >= 1"):
        trial_resources(k)
    with pytest.raises(InputError, match="trials_per_gpu: must be an integer >= 1"):
        check_fits(k, GiB, 80 * GiB, 80 * GiB)


def test_memory_check_at_its_edges():
    total = 80 * GiB
    assert check_fits(16, 5 * GiB, total, total) == 16          # exactly fits
    assert check_fits(1, 5 * GiB, 5 * GiB, total) == 16         # the last one, into the last 5 GiB
    with pytest.raises(InputError, match=r"17 trials of about 5.00 GiB each need 85.0 GiB, .* 80.0 GiB: "
                                         r"at most 16 fit"):
        check_fits(17, 5 * GiB, total, total)
    with pytest.raises(InputError, match=r"does not fit the 4.00 GiB free on this GPU now"):
        check_fits(8, 5 * GiB, 4 * GiB, total)
    with pytest.raises(InputError, match="must be > 0 bytes"):
        check_fits(2, 0, total, total)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_gpu_check_without_cuda_is_one_clear_error():
    with pytest.raises(InputError, match="trials_per_gpu: 8 trials per GPU need a CUDA GPU"):
        check_gpu(8, GiB)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_check_on_the_gpu():
    _free, total = torch.cuda.mem_get_info()
    assert check_gpu(2, GiB) == total // GiB
    with pytest.raises(InputError, match="at most"):
        check_gpu(int(total // GiB) + 1, GiB)


def test_mps_daemon_is_seen_by_its_control_pipe(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    assert mps_pipe_directory() == tmp_path
    assert not mps_running()                                  # no pipe
    (tmp_path / "control").write_text("")
    assert not mps_running()                                  # a plain file is no daemon
    (tmp_path / "control").unlink()
    os.mkfifo(tmp_path / "control")
    assert mps_running() and mps_running(tmp_path)
    assert packing_note(8) is None and packing_note(1) is None
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "elsewhere"))
    assert not mps_running()
    assert "8 trials per GPU but no CUDA MPS daemon" in packing_note(8)
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY")
    assert str(mps_pipe_directory()) == "/tmp/nvidia-mps"


def test_trial_memory_estimate_grows_with_the_batch_and_the_image():
    base = dict(data="unused", loss="paploss", spec={"form": "square"}, image_size=64, fpn_channels=16,
                anchor_size=8.0, iterations=1)
    one, two, four = (estimate_trial_bytes(TrainConfig(**base, batch_size=b), 3) for b in (1, 2, 4))
    assert CONTEXT_BYTES < one < two < four
    assert four - two == pytest.approx(2 * (two - one), abs=2)   # linear in the batch
    big = estimate_trial_bytes(TrainConfig(**{**base, "image_size": 128}, batch_size=1), 3)
    assert big - one > 2 * (two - one)                        # 4x the pixels: 3-4x the activations
    with pytest.raises(InputError, match="num_classes: must be an integer >= 1"):
        estimate_trial_bytes(TrainConfig(**base, batch_size=1), 0)


def test_a_packed_trial_checks_nothing_on_the_cpu_or_unpacked(monkeypatch, tmp_path):
    """The trial's own check (``check_packed_trial``) runs only for k > 1 on CUDA; a bad
    value of the pipeline's variable is one line naming it."""
    from paploss.config import TrainConfig
    from paploss.errors import InputError
    from paploss.packing import TRIALS_PER_GPU_ENV, check_packed_trial

    cfg = TrainConfig(data=str(tmp_path), iterations=1, device="cpu")
    monkeypatch.delenv(TRIALS_PER_GPU_ENV, raising=False)
    assert check_packed_trial(cfg) is None
    monkeypatch.setenv(TRIALS_PER_GPU_ENV, "8")
    assert check_packed_trial(cfg) is None  # on the CPU nothing is packed
    monkeypatch.setenv(TRIALS_PER_GPU_ENV, "eight")
    with pytest.raises(InputError, match="PAPLOSS_TRIALS_PER_GPU: must be an integer, got 'eight'"):
        check_packed_trial(cfg)
