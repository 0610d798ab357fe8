"""paploss.serving: the detector as an MLflow pyfunc model, loaded the way a platform
loads it, compared with the checkpoint run directly; nothing in the model folder is
unpickled."""

from __future__ import annotations

import pickle
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pytest
import torch
import yaml

from paploss import serving
from paploss.data import make_dataset
from paploss.engine import TrainConfig, load_checkpoint, train

TINY = dict(detector="retinanet_mobilenet_v3_small", image_size=64, fpn_channels=16, anchor_size=8.0, batch_size=4,
            warmup_iters=2, num_threads=1, eval_batch_size=8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("serving")
    root = make_dataset("shapes", tmp / "shapes", n_train=8, n_val=4, image_size=64, progress=False)
    res = train(TrainConfig(data=str(root), iterations=3, out_dir=str(tmp / "out"), **TINY), progress=False)
    return Path(res.checkpoint)


@pytest.fixture(scope="module")
def model_dir(checkpoint, tmp_path_factory) -> Path:
    return serving.save_detector(tmp_path_factory.mktemp("model") / "model", checkpoint, {"paploss.loss_spec": "x"})


def _images(n=3, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def _direct(checkpoint: Path, images: np.ndarray, threshold: float) -> list[dict]:
    """The slow, obvious twin: the checkpoint's model run image by image, labels mapped to category ids."""
    model, _, state = load_checkpoint(str(checkpoint))
    model.eval()
    model.score_thresh = threshold
    ids = [c["id"] for c in state["categories"]]
    out = []
    for img in images:
        x = torch.tensor(img, dtype=torch.float32).permute(2, 0, 1) / 255.0
        with torch.no_grad():
            o = model([x])[0]
        out.append({"boxes": o["boxes"].numpy(), "scores": o["scores"].numpy(),
                    "labels": np.array([ids[i] for i in o["labels"].tolist()], dtype=np.int64)})
    return out


def test_pyfunc_predicts_what_the_checkpoint_predicts(model_dir, checkpoint):
    model = mlflow.pyfunc.load_model(str(model_dir))
    images = _images()
    got = model.predict(images, params={"score_threshold": 0.0})
    want = _direct(checkpoint, images, 0.0)
    assert len(got) == len(images)
    assert sum(len(o["scores"]) for o in got) > 0  # a threshold of 0 keeps the top detections
    for g, w in zip(got, want):
        assert set(g) == {"boxes", "scores", "labels"}
        assert g["boxes"].dtype == np.float32 and g["boxes"].shape == (len(g["scores"]), 4)
        np.testing.assert_allclose(g["boxes"], w["boxes"], atol=1e-4)
        np.testing.assert_allclose(g["scores"], w["scores"], atol=1e-5)
        np.testing.assert_array_equal(g["labels"], w["labels"])
    _, _, state = load_checkpoint(str(checkpoint))
    assert set(np.concatenate([o["labels"] for o in got]).tolist()) <= {c["id"] for c in state["categories"]}
    # the default threshold (0.05) keeps a subset of those boxes
    default = model.predict(images)
    assert all(len(d["scores"]) <= len(g["scores"]) and (d["scores"] > 0.05).all() for d, g in zip(default, got))


def test_signature_and_bad_input(model_dir):
    model = mlflow.pyfunc.load_model(str(model_dir))
    spec = model.metadata.get_input_schema().inputs[0]
    assert spec.type == np.dtype(np.uint8) and spec.shape == (-1, -1, -1, 3)
    assert model.metadata.get_params_schema().params[0].name == "score_threshold"
    with pytest.raises(Exception, match="uint8|dtype|type"):
        model.predict(_images().astype(np.float32))
    with pytest.raises(Exception, match="shape"):
        model.predict(np.zeros((2, 64, 64), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"score_threshold=1.5"):
        model.predict(_images(1), params={"score_threshold": 1.5})
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        serving._batch(np.zeros((2, 64, 64, 4), dtype=np.uint8))


def test_model_folder_holds_no_pickle_and_refuses_a_crafted_checkpoint(model_dir, tmp_path):
    """The folder's code is a three-line import of the installed package (models from
    code), not a pickled object; a checkpoint replaced by a crafted pickle is refused
    by weights_only loading before its payload runs."""
    flavor = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert not list(model_dir.rglob("*.pkl"))
    code = (model_dir / Path(flavor["model_code_path"]).name).read_text()
    assert code == serving._MODEL_CODE and "from paploss.serving import Detector" in code

    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (bad / flavor["artifacts"]["checkpoint"]["path"]).write_bytes(pickle.dumps({"model": Payload()}))
    with pytest.raises(Exception):
        mlflow.pyfunc.load_model(str(bad))
    assert not marker.exists()
