"""The search pipeline's steps as plain functions on URIs and small JSON.

Each function here is one pipeline task (``components/`` wraps each in a KFP
component; ``paploss search`` calls them directly in one process). They share three
rules:

- **Inputs and outputs are small**: strings (URIs, JSON), numbers, lists and dicts.
  Large things (datasets, checkpoints, controller states) live at URIs under the
  work folder ``work`` (a local path or ``s3://``), written atomically through
  :mod:`paploss.storage`.
- **Pure and idempotent**: the outputs depend only on the inputs, and a step
  called again with the same inputs finds its finished output and returns it
  without doing the work twice. With KFP's cache this makes a re-run of a stopped
  search replay its finished rounds and go on (DESIGN: "a trial is a pure function
  of (data, θ, seed, config)"). All randomness of sampling is the controller's.
- **Failures are results**: a proxy trial catches its own exceptions (after
  ``attempts`` tries) and reports ``failed`` so that its round goes on; the
  controller update counts failed and diverged trials as ``min_reward`` (SPEC §3)
  and stops the search, saying so, beyond ``max_failed_trials``.

Work-folder layout::

    {work}/data/<key>/                         prepared dataset (images/, annotations/)
    {work}/pretrain/<key>/backbone.pt          warm start, shared by searches on that data
    {work}/searches/<search_name>/state/round-NNN.json   controller state after NNN rounds
    {work}/searches/<search_name>/trials/rNNN-sMM.json   one trial's result
    {work}/searches/<search_name>/final/<loss>.json      a final training's result
    {work}/searches/<search_name>/final/<loss>/          its checkpoint
    {work}/searches/<search_name>/report.json            the AP table
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from paploss import storage

__all__ = [
    "StepError",
    "SearchFailed",
    "BASELINES",
    "SEARCHED",
    "tracking_config",
    "search_dir",
    "state_uri",
    "load_controller",
    "prepare_data",
    "pretrain",
    "init_search",
    "proxy_trial",
    "proxy_config",
    "round_trainings",
    "selection_split",
    "controller_update",
    "final_train",
    "report",
    "selection_trials",
    "select_loss",
    "searched_spec",
    "stored_trial",
    "check_selection",
    "SELECTED_STATE",
    "validate_search_params",
    "train_options",
    "pretrain_options",
    "check_dataset",
    "check_work",
    "check_train_options",
    "check_detectors",
    "Preset",
    "PRESETS",
    "get_preset",
    "content_key",
]

#: The baselines trained beside the searched loss (SPEC §4, RetinaNet).
BASELINES = ("focal+l1", "focal+giou")
#: The name of the searched loss in results and MLflow.
SEARCHED = "searched"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ANN_SPLITS = ("train", "val", "search_train", "search_val")


class StepError(ValueError):
    """A step got input it cannot use; the message names the argument and value."""


class SearchExists(StepError):
    """A search of that name already exists in the work folder with other settings (it is
    not overwritten); the message names what differs."""


class SearchFailed(RuntimeError):
    """The search cannot go on (for instance: too many failed trials)."""


def _log(msg: str) -> None:
    """A progress line; ``paploss run`` shows lines that start with ``paploss>``."""
    print(f"paploss> {msg}", flush=True)


def content_key(*parts: Any) -> str:
    """A short stable hash of JSON-able parts: names outputs by their inputs."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class At(str):
    """A URI (data, warm start, state) among :func:`cache_keys`' parts (``At(None)`` is None:
    a missing one stays as it was in the key)."""

    def __new__(cls, uri: str | None):
        return None if uri is None else super().__new__(cls, uri)


def cache_keys(work: str, *parts: Any) -> tuple[str, str]:
    """(key, legacy key) naming an output in ``work`` by its inputs ``parts``
    (:func:`content_key`'s). The parts wrapped in :class:`At` are URIs: in the key they are
    :func:`storage.location_id`, relative to ``work``, so the key is the same however
    ``work`` is spelled (``runs/b`` or ``/home/me/runs/b``) and wherever the folder lies.
    The legacy key has them as spelled, as every key did before (BENCHMARKS.md, issue 8,
    finding 33): look an output up under both, write a new one under the first."""
    key = content_key(*(storage.location_id(p, work) if isinstance(p, At) else p for p in parts))
    return key, content_key(*parts)


def first_existing(uris: Sequence[str]) -> str | None:
    """The first of ``uris`` that exists, or None."""
    return next((u for u in uris if storage.exists(u)), None)


def plain(value: Any) -> Any:
    """JSON-like options with integral floats made ints, recursively.

    KFP carries dict parameters as protobuf ``Struct``s, whose numbers are all
    doubles: ``{"n_train": 48}`` arrives as ``{"n_train": 48.0}``. Normalising
    makes a step's outputs (and the names derived from its inputs) the same
    whichever way it is called."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def search_dir(work: str, search_name: str) -> str:
    return storage.join(work, "searches", search_name)


def tracking_config(uri: str = "", experiment: str = "paploss") -> dict:
    """The small dict every step gets to reach MLflow (``uri`` "" = the environment's)."""
    return {"uri": uri, "experiment": experiment}


def _client(tracking: Mapping[str, str]):
    from paploss.tracking import make_client

    return make_client(tracking.get("uri") or None)


# ----------------------------------------------------------------------------------
# Input validation (runs before any training)
# ----------------------------------------------------------------------------------


def _check_name(search_name: str) -> None:
    if not isinstance(search_name, str) or not _NAME_RE.match(search_name):
        raise StepError(
            f"search_name={search_name!r} must be 1-128 characters of letters, digits, '.', '_' or '-'"
        )


def validate_search_params(
    *, rounds: int, samples: int, parallelism: int, max_failed_trials: int, search_name: str,
    model_name: str = "paploss-retinanet", attempts: int = 1,
) -> None:
    """Range checks of the search parameters; raises ``StepError`` naming the first bad one."""
    checks = (
        ("rounds", rounds, 1, "a search needs at least one round"),
        ("samples", samples, 2, "PPO's advantage is reward minus the round's mean: at least 2 samples per round"),
        ("parallelism", parallelism, 1, "at least one trial must run at a time"),
        ("max_failed_trials", max_failed_trials, 0, "a count of trials"),
        ("attempts", attempts, 1, "a trial is tried at least once"),
    )
    for name, value, low, why in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise StepError(f"{name}={value!r} is out of range: must be an integer >= {low} ({why})")
    _check_name(search_name)
    if not isinstance(model_name, str) or not _NAME_RE.match(model_name):
        raise StepError(f"model_name={model_name!r} must be letters, digits, '.', '_' or '-'")


def _bundled_name(dataset: str) -> str | None:
    if dataset.startswith("bundled:"):
        from paploss.data.bundled import BUNDLED

        name = dataset.split(":", 1)[1]
        if name not in BUNDLED:
            raise StepError(f"dataset={dataset!r}: unknown bundled dataset {name!r}; known: {sorted(BUNDLED)}")
        return name
    return None


def check_dataset(dataset: str) -> None:
    """Fail fast when ``dataset`` cannot be read: a bundled name (``bundled:shapes``)
    or a folder/prefix with ``annotations/train.json`` and ``annotations/val.json``.
    Raises ``StepError`` naming the URI (and the S3 endpoint when it is unreachable)."""
    if not isinstance(dataset, str) or not dataset:
        raise StepError(f"dataset={dataset!r}: give a folder, an s3:// URI or bundled:<name>")
    if _bundled_name(dataset):
        return
    for split in ("train", "val"):
        uri = storage.join(dataset, "annotations", f"{split}.json")
        try:
            ok = storage.exists(uri)
        except storage.StorageError as exc:
            raise StepError(f"dataset={dataset!r}: {exc}") from None
        if not ok:
            raise StepError(f"dataset={dataset!r} has no annotations/{split}.json (looked for {uri})")


def check_work(work: str) -> None:
    """Fail fast when the work folder cannot be used: a local folder that can be
    created, or an ``s3://`` prefix whose endpoint answers and bucket exists."""
    if not isinstance(work, str) or not work:
        raise StepError(f"work={work!r}: give a folder or an s3:// prefix")
    if storage.is_s3(work):
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            bucket, _ = storage.split_s3(work)
        except ValueError as exc:
            raise StepError(f"work={work!r}: {exc}") from None
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS"
        try:
            boto3.client("s3").head_bucket(Bucket=bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            what = "does not exist" if code in ("404", "NoSuchBucket", "NotFound") else f"is not usable ({code})"
            raise StepError(f"work={work!r}: bucket {bucket!r} {what} at {endpoint}") from None
        except BotoCoreError as exc:
            raise StepError(f"work={work!r}: cannot reach the S3 endpoint {endpoint}: {exc}") from None
        return
    path = Path(work)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK):
        raise StepError(f"work={work!r}: {existing} is not a writable folder")


def check_detectors(proxy: Mapping[str, Any], final: Mapping[str, Any], pretrain: Mapping[str, Any],
                    detector: str = "") -> None:
    """The warm start must fit the detector of the trials and of the final
    trainings: one detector (and width) for all three, else ``StepError``."""
    import inspect

    engine = _engine()
    defaults = {k: v.default for k, v in inspect.signature(engine.pretrain).parameters.items()}
    tc = {f.name: f.default for f in dataclasses.fields(engine.TrainConfig)}
    seen = {}
    for where, opts, base in (("proxy", train_options(proxy, detector), tc),
                              ("final", train_options(final, detector), tc),
                              ("pretrain", pretrain_options(pretrain, proxy, detector), defaults)):
        seen[where] = (opts.get("detector", base.get("detector")),
                       float(opts.get("width_mult", base.get("width_mult", 1.0))))
    if len(set(seen.values())) > 1:
        raise StepError(f"the proxy, final and pretrain detectors must agree (the warm start must fit), got {seen}")


def check_train_options(options: Mapping[str, Any], where: str, loss: str = "focal+l1") -> None:
    """Unknown training option names raise ``StepError`` listing the known ones; the
    engine's range checks run as for a training with ``loss`` (``"paploss"`` for the
    proxies, which train only the PAP loss and so may take its options, such as
    ``box_collapse``; a baseline for the finals, which train the baselines too)."""
    try:
        engine = _engine()
    except ImportError as exc:
        raise StepError(f"the training engine cannot be imported: {exc}") from None
    known = {f.name for f in dataclasses.fields(engine.TrainConfig)} | {"reward_metric"}
    options = train_options(options)
    unknown = sorted(set(options) - known)
    if unknown:
        raise StepError(f"{where} has unknown training option(s) {unknown}; known: {sorted(known)}")
    probe = {k: v for k, v in options.items() if k != "reward_metric"}
    try:  # the engine's own range checks, with a stand-in data path (nothing is read)
        from paploss.spec import LossSpec

        spec = LossSpec.handcrafted("square") if loss == "paploss" else None
        engine.TrainConfig(**{"data": ".", **probe, "loss": loss, "spec": spec})
    except (ValueError, TypeError) as exc:
        raise StepError(f"{where}: {exc}") from None


# ----------------------------------------------------------------------------------
# Data and warm start
# ----------------------------------------------------------------------------------


def prepare_data(
    dataset: str,
    work: str,
    split_seed: int = 0,
    search_val_fraction: float = 0.2,
    bundled: Mapping[str, Any] | None = None,
    *,
    only_cached: bool = False,
    search_splits: int = 1,
) -> str:
    """Make the dataset a search needs; returns its URI (``{work}/data/<key>``).
    With ``only_cached``, build nothing: return the URI if it is already made, else "".

    ``dataset`` is ``bundled:<name>`` (generated, deterministic; ``bundled`` may set
    ``n_train``, ``n_val``, ``image_size``, ``seed``) or a COCO folder/``s3://``
    prefix with ``images/`` and ``annotations/{train,val}.json``. The result holds
    ``annotations/{train,val,search_train,search_val}.json`` (SPEC §4: search-train
    and search-val cut out of train, disjoint, every class in both; never the real
    val). A dataset that already has both search files is used as it is.

    ``search_splits`` = n > 1 adds n − 1 more such splits, drawn with split seeds
    ``split_seed + k``, as ``search_train-<k>.json`` / ``search_val-<k>.json`` (k = 1 …
    n − 1) beside the first, each pair written whole before the next
    (:func:`search_split_files`): search round r trains and scores on split r mod n.
    They are added to a dataset made before (its URI, and so the warm starts and
    finals keyed by it, stay the same).
    """
    check_dataset(dataset)
    check_search_val_fraction(search_val_fraction)
    check_search_splits(search_splits)
    bundled = plain(dict(bundled or {}))
    name = _bundled_name(dataset)
    if name is None and all(
        storage.exists(storage.join(dataset, "annotations", f"{s}.json")) for s in ("search_train", "search_val")
    ):
        missing = _missing_splits(dataset, search_splits)
        if missing:
            raise StepError(
                f"dataset {dataset} brings its own search split (annotations/search_train.json, search_val.json) "
                f"but not {', '.join(search_split_files(k)[1] + '.json' for k in missing)}, which "
                f"search_splits={search_splits} needs: give those too, or a dataset without search files "
                "(paploss then draws every split), or search_splits=1")
        return dataset
    key = content_key("data", dataset, bundled if name else None, int(split_seed), float(search_val_fraction))
    out = storage.join(work, "data", f"{name or 'dataset'}-{key}")
    marker = storage.join(out, "annotations", "search_val.json")
    if storage.exists(marker):
        return _add_splits(out, search_splits, float(search_val_fraction), int(split_seed), only_cached)
    if only_cached:
        return ""
    from paploss.data import search_split

    def build(local: Path) -> None:
        if name is not None:
            from paploss.data import make_dataset

            unknown = sorted(set(bundled) - {"n_train", "n_val", "image_size", "seed"})
            if unknown:
                raise StepError(f"bundled options {unknown} are unknown; known: n_train, n_val, image_size, seed")
            _log(f"generating bundled dataset {name} {bundled or '(default size)'}")
            make_dataset(name, local, progress=False, **bundled)
        else:
            _log(f"copying {dataset} for the search split")
            storage.download_dir(dataset, local)
        from paploss.data import load_coco

        for split in ("train", "val"):
            load_coco(local / "annotations" / f"{split}.json", images_dir=local / "images")
        search_split(local, val_fraction=float(search_val_fraction), seed=int(split_seed))

    if storage.is_s3(out):
        with tempfile.TemporaryDirectory(prefix="paploss-data-") as tmp:
            local = Path(tmp, "data")
            build(local)
            # the marker (search_val.json) goes last: a reader never sees half a dataset
            storage.upload_dir(local / "images", storage.join(out, "images"))
            for split in _ANN_SPLITS:
                storage.copy(local / "annotations" / f"{split}.json", storage.join(out, "annotations", f"{split}.json"))
    else:
        # built beside its final name and renamed into place (replacing what an
        # earlier crash left without its marker): one filesystem, atomic
        with storage.atomic_dir(out, replace=True) as local:
            build(local)
    return _add_splits(out, search_splits, float(search_val_fraction), int(split_seed))


#: How many search splits (:func:`prepare_data`'s ``search_splits``) a search may cycle through.
MAX_SEARCH_SPLITS = 16


def check_search_val_fraction(fraction: Any) -> float:
    """``fraction`` as a float in (0, 1): the share of train that each search split
    holds out as search-val; else ``StepError`` naming the value."""
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(fraction, bool) or not 0.0 < value < 1.0:
        raise StepError(f"search_val_fraction={fraction!r} must be in (0, 1): the share of train held out as "
                        "search-val, the images a proxy's reward is measured on")
    return value


def check_search_splits(search_splits: Any) -> int:
    return _check_count("search_splits", search_splits, MAX_SEARCH_SPLITS,
                        "how many search-train/search-val splits the search's rounds cycle through")


def search_split_files(split: int) -> tuple[str, str]:
    """The annotation names (``annotations/<name>.json``) of search split ``split``:
    the proxy's train and val sets."""
    suffix = _split_suffix(split)
    return f"search_train{suffix}", f"search_val{suffix}"


def _split_suffix(split: int) -> str:
    return f"-{int(split)}" if int(split) else ""


def _missing_splits(data: str, search_splits: int) -> list[int]:
    return [k for k in range(1, search_splits)
            if not storage.exists(storage.join(data, "annotations", search_split_files(k)[1] + ".json"))]


def _add_splits(out: str, search_splits: int, fraction: float, split_seed: int, only_cached: bool = False) -> str:
    """Draw the splits 1 … search_splits − 1 that ``out`` lacks (split k with split seed
    ``split_seed + k``); returns ``out``, or "" with ``only_cached`` when any is lacking."""
    missing = _missing_splits(out, search_splits)
    if missing and only_cached:
        return ""
    if missing:
        from paploss.data import search_split

        _log(f"drawing search splits {missing} of {search_splits}")
        for k in missing:
            search_split(out if storage.is_s3(out) else Path(out), val_fraction=fraction, seed=split_seed + k,
                         suffix=_split_suffix(k))
    return out


def _local(uri: str) -> Path:
    return storage.localize(uri)


def _engine():
    from paploss import engine

    return engine


def _train_config(base: Mapping[str, Any], where: str, **fields: Any):
    """``TrainConfig(**base, **fields)`` with unknown keys named, not a TypeError."""
    engine = _engine()
    base = train_options(base)
    known = {f.name for f in dataclasses.fields(engine.TrainConfig)}
    unknown = sorted(set(base) - known)
    if unknown:
        raise StepError(f"{where} has unknown training option(s) {unknown}; known: {sorted(known)}")
    merged = {**dict(base), **{k: v for k, v in fields.items() if k in known}}
    return engine.TrainConfig(**merged)


def train_options(options: Mapping[str, Any] | None, detector: str = "", epochs: float = 0.0) -> dict:
    """Training options with the engine's named preset expanded and the pipeline's
    ``detector`` ("" = keep) and ``epochs`` (0 = keep the schedule) folded in.

    ``options`` may hold ``"preset": NAME`` (a key of ``paploss.engine.PROXY_PRESETS``);
    its fields come first, the other options override them. Giving ``epochs``
    drops the preset's ``iterations`` and the other way round (the engine takes
    exactly one)."""
    own = plain(dict(options or {}))
    preset = own.pop("preset", None)
    out = dict(own)
    if preset is not None:
        from paploss.engine import PROXY_PRESETS

        if preset not in PROXY_PRESETS:
            raise StepError(f"training preset {preset!r} is unknown; known: {sorted(PROXY_PRESETS)}")
        out = {**PROXY_PRESETS[preset], **own}
        if "epochs" in own and "iterations" not in own:
            out["iterations"] = None
        if "iterations" in own and "epochs" not in own:
            out["epochs"] = None
    if detector:
        out["detector"] = detector
    if epochs and float(epochs) > 0:
        out["epochs"] = float(epochs)
        out["iterations"] = None
    elif epochs and float(epochs) < 0:
        raise StepError(f"epochs={epochs!r} must be >= 0 (0 keeps the preset's schedule)")
    return out


def pretrain_options(config: Mapping[str, Any] | None, proxy: Mapping[str, Any] | None = None,
                     detector: str = "") -> dict:
    """``engine.pretrain`` options: ``config`` completed from the proxy training
    options (detector, width, image size) so that the warm start fits the trials."""
    config = plain(dict(config or {}))
    base = train_options(proxy, detector) if proxy else {}
    for key in ("detector", "width_mult", "image_size"):
        if key not in config and base.get(key) is not None:
            config[key] = base[key]
    if detector:
        config["detector"] = detector
    return config


def pretrain(data: str, work: str, config: Mapping[str, Any] | None = None, seed: int = 0,
             detector: str = "", proxy: Mapping[str, Any] | None = None, *, only_cached: bool = False) -> str:
    """The warm start every trial and final training begins from (a backbone
    pre-trained on a classification task, as the paper's ImageNet one; see
    ``paploss.engine.pretrain``, whose options ``config`` holds); returns its URI,
    shared by every search on the same data and config.

    The backbone must fit the trials' detector: ``detector``, ``width_mult`` and
    ``image_size`` not in ``config`` come from the ``proxy`` training options;
    ``detector`` (the pipeline parameter, "" = keep) overrides both.

    An MMDetection detector (``"mmdet:<config>"``) gets no warm start here: it
    starts as its config says (``init_cfg`` / ``load_from``), and this returns "".
    With ``only_cached``, train nothing: return the URI if it exists, else ""."""
    config = pretrain_options(config, proxy, detector)
    if str(config.get("detector", "")).startswith(_engine().MMDET_PREFIX):
        _log(f"no warm start for {config['detector']}: the MMDetection config's own init_cfg/load_from applies")
        return ""
    outs = [storage.join(work, "pretrain", key, "backbone.pt")
            for key in cache_keys(work, "pretrain", At(data), config, int(seed))]
    found = first_existing(outs)
    if found:
        return found
    out = outs[0]
    if only_cached:
        return ""
    engine = _engine()
    import inspect

    known = set(inspect.signature(engine.pretrain).parameters) - {"data", "out_file", "seed", "progress"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise StepError(f"pretrain options {unknown} are unknown; known: {sorted(known)}")
    with tempfile.TemporaryDirectory(prefix="paploss-pretrain-") as tmp:
        _log(f"pre-training the warm start ({config.get('detector', 'default detector')})")
        path = engine.pretrain(str(_local(data)), str(Path(tmp, "backbone.pt")), seed=int(seed), progress=False,
                               **config)
        storage.write_bytes(out, Path(path).read_bytes())
    return out


# ----------------------------------------------------------------------------------
# The search: init, trials, update
# ----------------------------------------------------------------------------------


def state_uri(work: str, search_name: str, round: int) -> str:
    """Where a search keeps its controller state after ``round`` rounds (0: before the first)."""
    return storage.join(search_dir(work, search_name), "state", f"round-{round:03d}.json")


def load_controller(state: str):
    """The :class:`paploss.search.Controller` a search state file (:func:`state_uri`) holds."""
    return _read_state(state)[1]


def _read_state(state: str) -> tuple[dict, Any]:
    """A search state file's content and the controller it holds (one read)."""
    from paploss.search import Controller

    doc = storage.read_json(state)
    return doc, Controller.from_state_dict(doc["controller"])


TRIAL_SEEDS = ("fixed", "per-round")


def _check_trial_seeds(trial_seeds: str) -> str:
    if trial_seeds not in TRIAL_SEEDS:
        raise StepError(f"trial_seeds must be one of {TRIAL_SEEDS}, got {trial_seeds!r}")
    return trial_seeds


#: With ``reward_seeds`` = n > 1 each sampled θ is trained n times, the j-th time with
#: the round's seed + j × REWARD_SEED_STRIDE; its reward is the mean of the n rewards.
REWARD_SEED_STRIDE = 1000
MAX_REWARD_SEEDS = 8


def _check_count(name: str, value: Any, maximum: int, meaning: str) -> int:
    """``value`` if it is an integer (not a bool) in [1, maximum]; else a StepError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise StepError(f"{name}={value!r} is out of range: an integer in [1, {maximum}] ({meaning})")
    return value


def check_reward_seeds(reward_seeds: Any) -> int:
    return _check_count("reward_seeds", reward_seeds, MAX_REWARD_SEEDS,
                        "the proxy trainings, each with its own seed, whose mean reward is a sampled loss's")


def reward_seeds_of(base: int, reward_seeds: int) -> list[int]:
    """The training seeds of one sampled θ's trials when the round's seed is ``base``."""
    return [int(base) + j * REWARD_SEED_STRIDE for j in range(int(reward_seeds))]


@dataclass(frozen=True)
class _SearchOptions:
    """How a search's trials are made, kept in its state files: the training seed
    (``trial_seeds``), the trainings per sampled θ (``reward_seeds``), the search
    splits the rounds cycle through (``search_splits``)."""

    trial_seeds: str = "fixed"
    reward_seeds: int = 1
    search_splits: int = 1

    def __post_init__(self) -> None:
        _check_trial_seeds(self.trial_seeds)
        check_reward_seeds(self.reward_seeds)
        check_search_splits(self.search_splits)

    @classmethod
    def of(cls, doc: Mapping[str, Any]) -> "_SearchOptions":
        """The options of a state file; one written before an option existed has its default."""
        return cls(**{f.name: doc[f.name] for f in fields(cls) if f.name in doc})

    def doc_fields(self) -> dict:
        """The options as a state file keeps them: ``trial_seeds`` always, the others
        only when not 1 (state files of one reward seed and one split stay as they were)."""
        return {k: v for k, v in asdict(self).items() if k == "trial_seeds" or v != 1}


def _split_field(round: int, search_splits: int) -> dict:
    """The ``split`` a trial of round ``round`` trains and scores on (``round`` mod
    ``search_splits``), as the trial's field; {} with one split (the trials' JSON as
    before search_splits existed: kfp's cache keys)."""
    return {"split": int(round) % search_splits} if search_splits > 1 else {}


def _round_runs(controller, rnd: int, opts: _SearchOptions) -> tuple[list[int], dict]:
    """The training seeds each sampled θ of round ``rnd`` gets (one per reward seed) and
    the round's ``split`` field (:func:`_split_field`). Every trial of a round shares the
    round's seed (its rewards compare losses, not seeds): the search's seed, or with
    ``per-round`` seed + round, so that the search does not tune its losses to one
    training trajectory (on the benchmark it measured no better than ``fixed``:
    BENCHMARKS.md, issue 8, finding 10)."""
    base = controller.config.seed + (int(rnd) if opts.trial_seeds == "per-round" else 0)
    return reward_seeds_of(base, opts.reward_seeds), _split_field(rnd, opts.search_splits)


def round_trainings(state: str) -> list[list[dict]]:
    """Per finished round of the search in ``state``: the proxy trainings that each of
    its sampled θ had, as ``{"seed", "split", "repeat"}`` (the j-th reward seed has
    ``repeat`` j; the benchmark trains it from warm start j mod its warm starts). A
    handcrafted loss trained with these is measured as the round's samples were
    (``paploss bench --reward-baseline``)."""
    doc, c = _read_state(state)
    opts = _SearchOptions.of(doc)
    out = []
    for rec in c.history:
        seeds, split = _round_runs(c, rec.round, opts)
        out.append([{"seed": seed, "split": split.get("split", 0), "repeat": j} for j, seed in enumerate(seeds)])
    return out


def selection_split(state: str) -> int:
    """The search split a selection after the search in ``state`` trains and scores on
    (:func:`selection_trials`: the number of rounds mod the search's splits)."""
    doc, c = _read_state(state)
    return _split_field(c.round, _SearchOptions.of(doc).search_splits).get("split", 0)


def _trials_of(controller, samples: int, opts: _SearchOptions) -> list[str]:
    """The next round's trials as JSON strings: round, sample index, θ, training seed.
    With ``reward_seeds`` = n, θ number i is trained n times: samples i·n … i·n + n − 1,
    the j-th with ``repeat`` j and seed + j × REWARD_SEED_STRIDE. With ``search_splits``
    > 1, each carries the round's ``split``."""
    if controller.done:
        return []
    thetas = controller.sample(samples).tolist()
    seeds, split = _round_runs(controller, controller.round, opts)
    n = len(seeds)  # n = 1: no "repeat", the trials' JSON as before reward_seeds existed (kfp's cache keys)
    return [
        json.dumps({"round": controller.round, "sample": i * n + j, "theta": theta, "seed": seed,
                    **({"repeat": j} if n > 1 else {}), **split})
        for i, theta in enumerate(thetas) for j, seed in enumerate(seeds)
    ]


def _state_doc(c, failed: int, search_name: str, opts: _SearchOptions) -> dict:
    """A search state file's content (:func:`state_uri`); the search's seed is the controller's."""
    return {"controller": c.state_dict(), "failed_trials": int(failed), "search_name": search_name,
            **opts.doc_fields()}


def init_search(
    work: str,
    search_name: str,
    rounds: int,
    samples: int,
    seed: int = 0,
    controller: Mapping[str, Any] | None = None,
    tracking: Mapping[str, str] | None = None,
    params: Mapping[str, Any] | None = None,
    trial_seeds: str = "fixed",
    reward_seeds: int = 1,
    search_splits: int = 1,
) -> dict:
    """Controller state before round 0 and round 0's trials.

    ``controller``: options of :class:`paploss.search.Controller` (``sigma``,
    ``lr``, ``steps``, ``clip_eps``, ``functions``, ``grad_scale``, ``shared``,
    ``fixed``, ``min_reward``, ``mu``). Opens (or, on resume, reopens) the
    search's parent run in MLflow with ``params``. ``trial_seeds``: the proxy
    trials' training seed, ``fixed`` (``seed`` for every trial) or ``per-round``
    (``seed + round``). ``reward_seeds``: how many proxy trainings, with seeds
    REWARD_SEED_STRIDE apart, each sampled θ gets; its reward is their mean (less
    of one training's luck in the reward, at that many times the cost).
    ``search_splits``: how many search splits (:func:`prepare_data`'s, the same
    number) the rounds cycle through: round r's trials train on split r mod n and
    are scored on its search-val, so that the search does not fit one set of
    search-val images. Returns ``{"state": uri, "trials": [json, …]}``.
    """
    from paploss.search import Controller

    _check_name(search_name)
    options = plain(dict(controller or {}))
    for bad in ("rounds", "seed", "samples"):
        if bad in options:
            raise StepError(f"controller option {bad!r} is a search parameter: pass it as {bad}=")
    opts = _SearchOptions(trial_seeds, reward_seeds, search_splits)
    try:
        c = Controller(rounds=int(rounds), seed=int(seed), samples=int(samples), **options)
    except TypeError as exc:
        raise StepError(f"controller options {sorted(options)}: {exc}") from None
    uri = state_uri(work, search_name, 0)
    if storage.exists(uri):
        doc = storage.read_json(uri)
        existing, fresh = doc["controller"], c.state_dict()
        had_options, options_now = existing.get("options", {}), fresh["options"]
        diff = [f"{k}={had_options.get(k)!r} there, {options_now.get(k)!r} now"
                for k in sorted(set(had_options) | set(options_now)) if had_options.get(k) != options_now.get(k)]
        diff += [f"its starting {what} differs" for what, key in (("mean", "logits"), ("sigma", "sigma"))
                 if existing.get(key) != fresh[key]]
        if diff:
            raise SearchExists(
                f"search {search_name!r} already exists in {work} with other controller options "
                f"({'; '.join(diff)}); choose another search_name"
            )
        had_opts = _SearchOptions.of(doc)
        for option in (f.name for f in fields(_SearchOptions)):
            had, now = getattr(had_opts, option), getattr(opts, option)
            if had != now:
                raise SearchExists(f"search {search_name!r} already exists in {work} with {option}={had!r}, "
                                   f"not {now!r}; choose another search_name")
    else:
        storage.write_json(uri, _state_doc(c, 0, search_name, opts))
    if tracking is not None:
        from paploss import tracking as tr

        client = _client(tracking)
        tr.start_search(client, tracking["experiment"], search_name,
                        {**dict(params or {}), "rounds": rounds, "samples": samples, "seed": seed,
                         "trial_seeds": trial_seeds, "reward_seeds": reward_seeds, "search_splits": search_splits,
                         "controller": options})
    each = f", {reward_seeds} trainings each" if reward_seeds > 1 else ""
    cycle = f", {search_splits} search splits" if search_splits > 1 else ""
    _log(f"search {search_name}: {rounds} rounds x {samples} samples{each}{cycle}, D={c.dim}")
    return {"state": uri, "trials": _trials_of(c, samples, opts)}


def _parse_trial(trial: str | Mapping[str, Any]) -> dict:
    t = json.loads(trial) if isinstance(trial, str) else dict(trial)
    for field in ("round", "sample", "theta", "seed"):
        if field not in t:
            raise StepError(f"trial {str(trial)[:200]} lacks the field {field!r}")
    return t


# a trial's result file; a result kept aside by _keep_aside adds -<key> and does not match
_TRIAL_FILE = re.compile(r"r\d{3}-s\d{2,}\.json")


def trial_results(folder: str | os.PathLike) -> list[dict]:
    """Every trial result stored in a search folder (``trials/rNNN-sMM.json``, by
    name; the copies :func:`_keep_aside` keeps are not trials of their own); [] when
    it has none."""
    trials = storage.join(str(folder), "trials")
    if not storage.exists(trials):
        return []
    return [storage.read_json(storage.join(trials, name))
            for name in storage.list_files(trials) if _TRIAL_FILE.fullmatch(name)]


def _trial_uri(work: str, search_name: str, r: int, s: int) -> str:
    return storage.join(search_dir(work, search_name), "trials", f"r{r:03d}-s{s:02d}.json")


def stored_trial(work: str, search_name: str, trial: str | Mapping[str, Any], init: str | None = None) -> dict | None:
    """The stored result of ``trial`` when it was trained with the same θ, the same
    seed and (where the result records it) the same warm start ``init``, else None.

    It is looked for under the trial's own name (``trials/rNNN-sMM.json``), then among
    the round's other results (a selection run again with more seeds numbers its
    trials anew, and a result another trial's name held is kept aside, see
    :func:`_keep_aside`); one found elsewhere comes back under the trial's round and
    sample. Results stored before ``init`` was recorded match any ``init``."""
    t = _parse_trial(trial)
    r, s = int(t["round"]), int(t["sample"])
    out = _trial_uri(work, search_name, r, s)
    if storage.exists(out):
        done = storage.read_json(out)
        if _same_trial(done, t, init, work):
            return done
    folder = storage.join(search_dir(work, search_name), "trials")
    if not storage.exists(folder):
        return None
    prefix = f"r{r:03d}-"
    for name in storage.list_files(folder):
        if name.startswith(prefix) and name.endswith(".json") and "/" not in name:
            uri = storage.join(folder, name)
            if uri == out:
                continue
            done = storage.read_json(uri)
            if _same_trial(done, t, init, work):
                return {**done, "round": r, "sample": s}
    return None


def _same_trial(done: Mapping[str, Any], t: Mapping[str, Any], init: str | None, work: str) -> bool:
    """Whether a stored result ``done`` is trial ``t``'s: the same θ and seed, and the
    same warm start where both name one (compared as :func:`storage.location_id` in ``work``)."""
    if done.get("theta") != [float(v) for v in t["theta"]] or int(done.get("seed", t["seed"])) != int(t["seed"]) \
            or int(done.get("split", 0)) != int(t.get("split", 0)):
        return False
    if "init" not in done or init is None:
        return True
    return storage.location_id(done["init"], work) == storage.location_id(init, work)


def _keep_aside(out: str) -> None:
    """Before a trial's result is written to ``out``: a result of another trial there
    (another θ, seed or warm start under the same name) is renamed
    ``rNNN-sMM-<key>.json`` rather than overwritten, so :func:`stored_trial` still finds it."""
    if not storage.exists(out):
        return
    old = storage.read_json(out)
    key = content_key(old.get("theta"), old.get("seed"), old.get("init"), *([old["split"]] if old.get("split") else []))
    storage.copy(out, out[: -len(".json")] + f"-{key}.json")


def _run_training(cfg, on_step=None):
    return _engine().train(cfg, on_step=on_step, progress=False)


def proxy_config(proxy: Mapping[str, Any] | None, data: str, split: int, spec, init: str | None, seed: int,
                 out_dir: str | None = None):
    """``(TrainConfig, reward metric)`` of one proxy training (SPEC §3): ``proxy``'s
    options (``reward_metric``, default ``AP``, names the metric that is the reward),
    trained on search split ``split``'s search-train and evaluated on its search-val
    (:func:`search_split_files`), with the PAP loss of ``spec`` from warm start ``init``."""
    options = plain(dict(proxy or {}))
    metric = options.pop("reward_metric", "AP")
    train_ann, val_ann = search_split_files(split)
    return _train_config(options, "proxy config", data=str(_local(data)), train_ann=train_ann, val_ann=val_ann,
                         loss="paploss", spec=spec, init=str(_local(init)) if init else None, seed=int(seed),
                         out_dir=out_dir), metric


def proxy_trial(
    data: str,
    init: str,
    trial: str | Mapping[str, Any],
    proxy: Mapping[str, Any],
    work: str,
    search_name: str,
    state: str = "",
    tracking: Mapping[str, str] | None = None,
    attempts: int = 1,
) -> str:
    """Train one proxy model with the loss of one sampled θ; its reward is the AP on
    search-val (SPEC §3, §4), of the trial's ``split`` where it names one
    (:func:`search_split_files`). Returns the result as JSON text::

        {"round", "sample", "theta", "seed", "init" (the warm start trained from, as a place in ``work``:
         ``storage.location_id``, so the result is found again after the work folder moved),
         "split" (when the trial has one),
         "reward" (null if failed), "failed", "diverged", "error", "metrics", "seconds", "spec",
         "box_collapsed" (stopped early by the proxy's ``box_collapse`` option; its reward is
         the AP of the model as it was then)}

    ``trial``: one item of ``init_search``/``controller_update``'s ``trials``.
    ``proxy``: ``TrainConfig`` fields of the proxy training (``reward_metric``,
    default ``AP``, picks the reward; ``AP50`` for VOC-style data). ``state``: the
    controller state the θ was drawn from (for θ → LossSpec). Exceptions are caught
    and retried ``attempts`` times, then reported as ``failed``; a diverged run
    (SPEC §3) is ``failed`` too. The stored result (``trials/rNNN-sMM.json``) also
    holds the training loss and the positives' mean box quality u per iteration
    (``losses``, ``box_quality``); the returned JSON leaves them out (KFP parameters
    stay small).
    """
    t = _parse_trial(trial)
    r, s = int(t["round"]), int(t["sample"])
    theta = [float(v) for v in t["theta"]]
    out = _trial_uri(work, search_name, r, s)
    done = stored_trial(work, search_name, t, init)
    if done is not None:
        _ensure_trial_logged(done, search_name, state, tracking)
        return _trial_output(done)
    k = int(t.get("split", 0))
    split = {"split": k} if "split" in t else {}  # the result records the trial's split where it names one
    train_ann, val_ann = search_split_files(k)
    lacking = [a for a in (train_ann, val_ann) if not storage.exists(storage.join(data, "annotations", f"{a}.json"))]
    if lacking:
        raise StepError(f"{_trial_label(t)} trains on search split {k}, but {data} has no "
                        f"{', '.join(f'annotations/{a}.json' for a in lacking)}: prepare the data with "
                        "search_splits as large as the search's")
    functions: Sequence[str] = ()
    losses: list[float] = []
    quality: list[float] = []
    result: dict[str, Any] = {"round": r, "sample": s, "theta": theta, "seed": int(t["seed"]), **split,
                              "init": storage.location_id(init, work) or None, "reward": None, "failed": True,
                              "diverged": False, "error": "", "metrics": {}, "seconds": 0.0, "spec": None}
    start = time.monotonic()
    for attempt in range(1, int(attempts) + 1):
        losses = []
        try:
            spec = _spec_of(state, theta)
            result["spec"] = spec.to_json() if spec is not None else None
            with tempfile.TemporaryDirectory(prefix="paploss-trial-") as tmp:
                cfg, metric = proxy_config(proxy, data, k, spec, init, int(t["seed"]), out_dir=tmp)
                res = _run_training(cfg, on_step=lambda it, loss: losses.append(float(loss)))
            metrics = {k: float(v) for k, v in dict(res.metrics).items()}
            if metric not in metrics:
                raise StepError(f"reward_metric={metric!r} is not among the metrics {sorted(metrics)}")
            quality = list(res.box_quality)
            result.update(metrics=metrics, diverged=bool(res.diverged), error="",
                          box_collapsed=bool(res.box_collapsed))
            if res.diverged:
                result.update(failed=True, error="diverged (SPEC §3: training loss NaN or 1.0 for > 50 iterations)")
            else:
                result.update(failed=False, reward=metrics[metric])
            break
        except Exception as exc:  # noqa: BLE001 - a failed trial is a result, not a crash
            result["error"] = f"attempt {attempt}/{attempts}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"
            _log(f"{_trial_label(t)}: attempt {attempt}/{attempts} failed: {type(exc).__name__}: {exc}")
    result["seconds"] = round(time.monotonic() - start, 3)
    result["losses"] = losses
    result["box_quality"] = quality
    _keep_aside(out)
    storage.write_json(out, result, indent=None)
    what = "FAILED" if result["failed"] else f"reward {result['reward']:.4f}"
    stop = "; stopped early: its boxes collapsed" if result.get("box_collapsed") else ""
    _log(f"{_trial_label(t)}: {what} ({result['seconds']:.0f}s{stop})")
    _ensure_trial_logged(result, search_name, state, tracking)
    return _trial_output(result)


def _trial_label(t: Mapping[str, Any]) -> str:
    """How progress lines name a trial: a round's sample, or a selection candidate's seed."""
    if "candidate" in t:
        return f"selection candidate {t['candidate']} seed {t['seed']}"
    return f"round {t['round']} sample {t['sample']}"


def _trial_output(result: Mapping[str, Any]) -> str:
    return json.dumps({k: v for k, v in result.items() if k not in ("losses", "box_quality")})


def _spec_of(state: str, theta: list[float]):
    if not state:
        return None
    return load_controller(state).spec_of(theta)


def _ensure_trial_logged(result: Mapping[str, Any], search_name: str, state: str,
                         tracking: Mapping[str, str] | None) -> None:
    """Log the trial's nested MLflow run unless it is there already (a retried step)."""
    if tracking is None:
        return
    from paploss import tracking as tr

    client = _client(tracking)
    parent = tr.find_search_run(client, tracking["experiment"], search_name)
    if parent is None:
        raise SearchFailed(f"no MLflow parent run for search {search_name!r} in experiment {tracking['experiment']!r}")
    existing = client.search_runs(
        [parent.info.experiment_id],
        filter_string=(f"tags.`paploss.kind` = 'trial' and tags.`paploss.search_name` = '{search_name}' "
                       f"and tags.`paploss.round` = '{result['round']}' and tags.`paploss.sample` = '{result['sample']}'"),
        max_results=1,
    )
    if existing:
        return
    names: Sequence[str] = ()
    if state:
        names = load_controller(state).parameter_names
    tr.log_trial(
        client, parent.info.run_id, search_name=search_name, round=int(result["round"]),
        sample=int(result["sample"]), theta=result["theta"], names=names, spec_json=result.get("spec"),
        losses=result.get("losses", ()), box_quality=result.get("box_quality", ()), reward=result["reward"],
        failed=bool(result["failed"]),
        diverged=bool(result["diverged"]), error=result.get("error", ""), metrics=result.get("metrics"),
        seconds=result.get("seconds"), box_collapsed=bool(result.get("box_collapsed")),
    )


def reward_noise(groups: Sequence[Sequence[float]]) -> tuple[float, float] | None:
    """How well one round's rewards can rank its samples, from the n trainings behind
    each (``reward_seeds`` n >= 2): ``(spread, noise)``.

    ``spread`` is the standard deviation of the samples' rewards (each the mean of its
    n trainings). ``noise`` is the standard deviation of the trainings' luck in one
    such reward: the residual variance of the table samples × repeats, once each
    sample's mean and each repeat's mean (its seed and warm start, shared by every
    sample) are taken out, over (S − 1)(n − 1) degrees of freedom, divided by n. Where
    ``noise`` comes near ``spread``, the round's ranking of its samples is mostly luck.
    Samples with a non-finite reward are left out; None when fewer than two remain or
    they have fewer than two trainings each."""
    rows = [[float(x) for x in g] for g in groups]
    rows = [g for g in rows if len(g) >= 2 and all(math.isfinite(x) for x in g)]
    if len(rows) < 2 or len({len(g) for g in rows}) != 1:
        return None
    s, n = len(rows), len(rows[0])
    means = [math.fsum(g) / n for g in rows]
    repeat = [math.fsum(g[j] for g in rows) / s for j in range(n)]
    grand = math.fsum(means) / s
    resid = math.fsum((g[j] - means[i] - repeat[j] + grand) ** 2 for i, g in enumerate(rows) for j in range(n))
    spread = math.sqrt(math.fsum((m - grand) ** 2 for m in means) / (s - 1))
    return spread, math.sqrt(resid / ((s - 1) * (n - 1)) / n)


def round_noise(state: str) -> list[tuple[float, float] | None]:
    """:func:`reward_noise` of each finished round of the search whose state (or
    selected state) is ``state``, from its stored trial results; all None for a search
    with ``reward_seeds`` 1 or one whose results are gone."""
    doc, c = _read_state(state)
    origin = doc.get("selected", {}).get("from_state", state)
    return _trials_noise(os.path.dirname(os.path.dirname(origin)), _SearchOptions.of(doc).reward_seeds, c.round)


def _trials_noise(folder: str, reward_seeds: int, rounds: int) -> list[tuple[float, float] | None]:
    """:func:`reward_noise` of rounds 0 … ``rounds`` − 1 from the trial results stored
    in the search folder ``folder`` (trial sample k is θ k // n's repeat k mod n; the
    selection's trials, numbered from round ``rounds`` on, are left out). Reads
    nothing with one reward seed."""
    n = int(reward_seeds)
    table: dict[int, dict[int, dict[int, float]]] = {}
    for t in trial_results(folder) if n > 1 else []:
        r, k = int(t["round"]), int(t["sample"])
        if r < rounds:
            reward = float("nan") if t.get("failed") or t.get("reward") is None else float(t["reward"])
            table.setdefault(r, {}).setdefault(k // n, {})[k % n] = reward
    return [reward_noise([[g[j] for j in range(n)] for g in table.get(r, {}).values() if len(g) == n])
            for r in range(rounds)]


def controller_update(
    state: str,
    results: Sequence[str | Mapping[str, Any]],
    work: str,
    search_name: str,
    max_failed_trials: int = 0,
    tracking: Mapping[str, str] | None = None,
) -> dict:
    """One PPO round (SPEC §3) on the round's trial results; returns the next state
    and the next round's trials, ``{"state": uri, "trials": [...], "round": r,
    "mean_reward", "max_reward", "failed_trials"}``.

    With the search's ``reward_seeds`` = n, a sampled θ's reward is the mean of its n
    trials' rewards. Failed and diverged trials get the controller's ``min_reward``
    (a θ with any failed trial among its n). When the
    search's failed trials exceed ``max_failed_trials`` it stops with
    ``SearchFailed`` (and no new state is written). Logs the round's metrics and
    figures on the parent MLflow run.
    """
    from paploss.search import Controller

    doc = storage.read_json(state)
    c = Controller.from_state_dict(doc["controller"])
    parsed = sorted((json.loads(x) if isinstance(x, str) else dict(x) for x in results), key=lambda d: d["sample"])
    rounds_seen = {int(p["round"]) for p in parsed}
    if rounds_seen != {c.round}:
        raise StepError(f"results are for round(s) {sorted(rounds_seen)} but the state {state} is at round {c.round}")
    r = c.round
    # state files written before trial_seeds (reward_seeds) existed: one trial of the search's seed per θ
    opts = _SearchOptions.of(doc)
    trial_seeds, reward_seeds, search_splits = opts.trial_seeds, opts.reward_seeds, opts.search_splits
    if len(parsed) % reward_seeds:
        raise StepError(f"round {r} has {len(parsed)} results, not a multiple of the search's reward_seeds={reward_seeds}")
    samples = len(parsed) // reward_seeds
    expected = c.sample(samples).tolist()
    seeds, split_field = _round_runs(c, r, opts)
    for k, p in enumerate(parsed):
        if int(p["sample"]) != k:
            raise StepError(f"round {r} has no result of sample {k} (samples {[int(q['sample']) for q in parsed]})")
        if any(abs(a - b) > 1e-12 for a, b in zip(p["theta"], expected[k // reward_seeds])):
            raise StepError(f"result of round {r} sample {p['sample']} is for another θ than the controller drew")
    if [int(p["seed"]) for p in parsed] != seeds * samples:
        want = f"{seeds} (trial_seeds={trial_seeds!r}, reward_seeds={reward_seeds})" if reward_seeds > 1 \
            else f"{seeds[0]} (trial_seeds={trial_seeds!r})"
        raise StepError(f"results of round {r} were trained with seeds {sorted({int(p['seed']) for p in parsed})}, "
                        f"not the search's {want}")
    split = split_field.get("split", 0)
    if any(int(p.get("split", 0)) != split for p in parsed):
        raise StepError(f"results of round {r} were scored on search splits {sorted({int(p.get('split', 0)) for p in parsed})}, "
                        f"not split {split} (round {r} of a search over search_splits={search_splits})")
    out = state_uri(work, search_name, r + 1)
    if storage.exists(out):
        done = storage.read_json(out)
        nxt = Controller.from_state_dict(done["controller"])
        if nxt.round == r + 1 and [list(t) for t in nxt.history[r].thetas] == expected:
            return _update_output(out, nxt, done["failed_trials"], samples, opts)
    failed_now = [p for p in parsed if p["failed"]]
    total_failed = int(doc.get("failed_trials", 0)) + len(failed_now)
    if total_failed > int(max_failed_trials):
        errors = "; ".join(f"r{p['round']} s{p['sample']}: {str(p['error']).splitlines()[0] if p['error'] else ''}"
                           for p in failed_now)
        raise SearchFailed(
            f"search {search_name!r}: {total_failed} failed trials exceed max_failed_trials={max_failed_trials} "
            f"(round {r}: {errors})"
        )
    groups = [parsed[i * reward_seeds:(i + 1) * reward_seeds] for i in range(samples)]
    rewards = [float("nan") if any(p["failed"] for p in g) else math.fsum(float(p["reward"]) for p in g) / len(g)
               for g in groups]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # failed trials: counted and reported below
        record = c.update(expected, rewards)
    storage.write_json(out, _state_doc(c, total_failed, search_name, opts))
    ok = [x for x in rewards if math.isfinite(x)]
    noise = reward_noise([[float("nan") if p["failed"] else float(p["reward"]) for p in g] for g in groups])
    _log(
        f"round {r + 1}/{c.rounds}: mean reward {record.mean_reward:.4f}, "
        f"max {max(ok) if ok else float('nan'):.4f}, failed {len(failed_now)} (total {total_failed})"
        + (f"; rewards' spread (sd) {noise[0]:.4f}, seed noise (sd) {noise[1]:.4f}" if noise else "")
    )
    if tracking is not None:
        from paploss import tracking as tr

        client = _client(tracking)
        parent = tr.find_search_run(client, tracking["experiment"], search_name)
        if parent is None:
            raise SearchFailed(f"no MLflow parent run for search {search_name!r}")
        history = [[None if i in rec.failed else v for i, v in enumerate(rec.rewards)] for rec in c.history]
        tr.log_round(
            client, parent.info.run_id, round=r, rewards=[None if not math.isfinite(x) else x for x in rewards],
            failed=len(failed_now), mu=c.mu.tolist(), names=c.parameter_names, spec=c.spec(), history=history,
            noise=[*_trials_noise(search_dir(work, search_name), reward_seeds, r), noise],
        )
    return _update_output(out, c, total_failed, samples, opts)


def _update_output(uri: str, c, failed: int, samples: int, opts: _SearchOptions) -> dict:
    rec = c.history[-1]
    ok = [v for i, v in enumerate(rec.rewards) if i not in rec.failed]
    return {
        "state": uri,
        "trials": _trials_of(c, samples, opts),
        "round": c.round,
        "mean_reward": rec.mean_reward,
        "max_reward": max(ok) if ok else None,
        "failed_trials": failed,
    }


# ----------------------------------------------------------------------------------
# Selection by re-evaluation (optional; off by default: SPEC §3's searched loss is μ)
# ----------------------------------------------------------------------------------
#
# A search rewards each sampled loss by one proxy training with one seed; near a good
# loss the differences between samples are of the size of one seed's luck, and the
# policy's mean may settle elsewhere (BENCHMARKS.md, issue 8, finding 16). The
# selection stage trains the ``top`` best samples of the whole search again with the
# ``seeds`` given (never the trials' own seed) on the same proxy, and the searched
# loss becomes the candidate with the best mean reward over those new trainings.

#: The selection writes the search state that holds its choice to
#: ``state/selected-<key>.json``, the key naming its inputs (a final training keyed by
#: the state's URI never reuses the result of another selection).
SELECTED_STATE = "selected-{key}.json"


def check_selection(top: int, seeds: Sequence[int], search_seed: int | None = None, reward_seeds: int = 1) -> None:
    """Range checks of the selection stage; raises ``StepError`` naming the bad value.
    ``top`` 0 turns the stage off; the ``seeds`` must be distinct and, when
    ``search_seed`` is given, differ from it and from its other ``reward_seeds``
    (those rewards picked the candidates)."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise StepError(f"select_top={top!r} is out of range: an integer >= 0 (0: no selection, the searched loss "
                        "is the policy's final mean)")
    if top == 0:
        return
    seeds = [int(x) for x in seeds]
    if not seeds:
        raise StepError("select_seeds is empty: the selection trains each candidate with at least one new seed")
    if len(set(seeds)) != len(seeds):
        raise StepError(f"select_seeds={seeds} repeats a seed")
    for seed in [] if search_seed is None else reward_seeds_of(int(search_seed), reward_seeds):
        if seed in seeds:
            raise StepError(f"select_seeds={seeds} holds the search's trial seed {seed}: the candidates were "
                            "picked by that seed's rewards, so it would measure them with their own luck")


#: How the selection ranks the search's samples to pick its candidates
#: (:func:`selection_trials`): ``reward``, the reward itself; ``round``, the reward
#: minus the mean reward of its round's finished samples. With one search-val split
#: the rewards of all rounds are measured on the same images and ``reward`` compares
#: them; with ``search_splits`` > 1 each round is scored on its own split, whose
#: difficulty moves every reward of that round alike, and ``round`` takes it out.
SELECT_RANKS = ("reward", "round")


def check_select_rank(rank: Any) -> str:
    """``rank`` when it is one of :data:`SELECT_RANKS`; else ``StepError`` naming it."""
    if rank not in SELECT_RANKS:
        raise StepError(f"select_rank={rank!r} is not one of {list(SELECT_RANKS)}: 'reward' ranks the search's "
                        "samples by their reward, 'round' by their reward minus their round's mean reward")
    return rank


def selection_trials(state: str, top: int, seeds: Sequence[int], rank: str = "reward") -> list[str]:
    """The re-evaluation trials: the ``top`` distinct θ of the whole search with the
    highest rewards (failed trials left out; ``rank`` ``round``: the highest rewards
    relative to their round's mean, :data:`SELECT_RANKS`), each with every seed of ``seeds``.

    Trials are numbered after the search's last round (``round`` = the number of
    rounds, ``sample`` = candidate × len(seeds) + seed index) and carry
    ``candidate``, ``search_round``, ``search_sample`` and ``search_reward``; in a
    search over n search splits, also the ``split`` a round numbered so would take
    (the number of rounds mod n: with n > rounds, one no round scored on)."""
    doc, c = _read_state(state)
    check_selection(int(top), seeds)
    check_select_rank(rank)
    if int(top) == 0:
        return []
    if not c.history:
        raise StepError(f"the state {state} has no finished round: nothing to select from")
    finished = [(reward, rec.round, i, [float(v) for v in theta]) for rec in c.history
                for i, (theta, reward) in enumerate(zip(rec.thetas, rec.rewards)) if i not in rec.failed]
    by_round: dict[int, list[float]] = {}
    for reward, rnd, _, _ in finished:
        by_round.setdefault(rnd, []).append(reward)
    offset = {rnd: sum(own) / len(own) if rank == "round" else 0.0 for rnd, own in by_round.items()}
    ranked = sorted(finished, key=lambda x: (-(x[0] - offset[x[1]]), x[1], x[2]))
    picked: list[tuple] = []
    for item in ranked:
        if len(picked) == int(top):
            break
        if all(item[3] != p[3] for p in picked):
            picked.append(item)
    if not picked:
        raise StepError(f"the search in {state} has no finished trial to select from")
    seeds = [int(x) for x in seeds]
    opts = _SearchOptions.of(doc)
    for reward, rnd, i, theta in picked:
        for own in _round_runs(c, rnd, opts)[0]:
            if own in seeds:
                raise StepError(f"select_seeds={seeds} holds {own}, the training seed of candidate r{rnd:03d}-s{i:02d}: "
                                "it was picked by that seed's reward, so it would be measured with its own luck")
    split = _split_field(c.round, opts.search_splits)
    return [json.dumps({"round": c.round, "sample": k * len(seeds) + j, "theta": theta, "seed": seed,
                        "candidate": k, "search_round": rnd, "search_sample": i, "search_reward": reward, **split})
            for k, (reward, rnd, i, theta) in enumerate(picked) for j, seed in enumerate(seeds)]


def select_loss(
    state: str,
    results: Sequence[str | Mapping[str, Any]],
    work: str,
    search_name: str,
    tracking: Mapping[str, str] | None = None,
    rank: str = "reward",
) -> str:
    """The candidate with the best mean reward over its re-evaluation trials
    (a failed one counts as reward 0, SPEC §3); writes the search state with that
    choice (and ``rank``, how :func:`selection_trials` picked the candidates) under
    ``"selected"`` to ``state/selected-<key>.json`` and returns its URI.
    :func:`searched_spec` of that state is the selected loss. Logs the candidates'
    mean rewards and ``selection.json`` on the parent MLflow run."""
    check_select_rank(rank)
    doc, c = _read_state(state)
    parsed = [json.loads(x) if isinstance(x, str) else dict(x) for x in results]
    if not parsed:
        raise StepError("select_loss got no trial results")
    wrong = sorted({int(p["round"]) for p in parsed} - {c.round})
    if wrong:
        raise StepError(f"results are for round(s) {wrong}, not the selection after round {c.round} of {state}")
    candidates: list[dict] = []
    for p in sorted(parsed, key=lambda d: int(d["sample"])):
        theta = [float(v) for v in p["theta"]]
        cand = next((x for x in candidates if x["theta"] == theta), None)
        if cand is None:
            cand = {"theta": theta, "rewards": {}, "failed": 0}
            candidates.append(cand)
        failed = bool(p.get("failed")) or p.get("reward") is None
        cand["rewards"][str(int(p["seed"]))] = 0.0 if failed else float(p["reward"])
        cand["failed"] += int(failed)
    for cand in candidates:
        cand["mean_reward"] = sum(cand["rewards"].values()) / len(cand["rewards"])
    pick = max(range(len(candidates)), key=lambda k: candidates[k]["mean_reward"])  # the first on ties
    best = candidates[pick]
    doc["selected"] = {"theta": best["theta"], "spec": c.spec_of(best["theta"]).to_json(), "candidate": pick,
                       "mean_reward": best["mean_reward"], "from_state": state, "candidates": candidates, "rank": rank}
    # rank "reward" (the default) adds nothing to the key, as before ranks existed; a
    # selection written under its legacy key keeps that name (earlier finals are keyed by it)
    outs = [storage.join(search_dir(work, search_name), "state", SELECTED_STATE.format(key=key))
            for key in cache_keys(work, At(state), [[c["theta"], c["rewards"]] for c in candidates],
                                  *([rank] if rank != "reward" else []))]
    out = first_existing(outs) or outs[0]
    storage.write_json(out, doc)
    _log(f"selection: candidate {pick} of {len(candidates)}, mean reward "
         f"{best['mean_reward']:.4f} over seeds {sorted(best['rewards'], key=int)}")
    if tracking is not None:
        from paploss import tracking as tr

        client = _client(tracking)
        parent = tr.find_search_run(client, tracking["experiment"], search_name)
        if parent is None:
            raise SearchFailed(f"no MLflow parent run for search {search_name!r}")
        for k, cand in enumerate(candidates):
            client.log_metric(parent.info.run_id, "selection.mean_reward", cand["mean_reward"], step=k)
        client.log_metric(parent.info.run_id, "selection.best_mean_reward", best["mean_reward"])
        client.log_dict(parent.info.run_id, doc["selected"], "selection.json")
    return out


def searched_spec(state: str):
    """The searched loss of a search state: the selected candidate when the state
    holds a selection (:func:`select_loss`), else the policy's final mean μ (SPEC §3)."""
    return _searched_spec_of(*_read_state(state))


def _searched_spec_of(doc: Mapping[str, Any], controller):
    from paploss.spec import LossSpec

    if doc.get("selected"):
        return LossSpec.from_json(doc["selected"]["spec"])
    return controller.spec()


# ----------------------------------------------------------------------------------
# Final training and report
# ----------------------------------------------------------------------------------


def final_train(
    data: str,
    init: str,
    loss: str,
    final: Mapping[str, Any],
    work: str,
    search_name: str,
    state: str = "",
    seed: int = 0,
    tracking: Mapping[str, str] | None = None,
    model_name: str = "paploss-retinanet",
    promote: bool = True,
) -> str:
    """Train the detector on train and evaluate it on the real val set (SPEC §4).

    ``loss``: ``searched`` (:func:`searched_spec` of ``state``: the controller's final
    mean μ, or the selected candidate after a selection stage) or
    a baseline (``focal+l1``, ``focal+giou``). Logs a nested ``paploss.kind=final``
    run; the searched one registers a version of ``model_name`` (and becomes
    ``champion`` when ``promote`` and it is at least as good). Returns JSON
    ``{"loss", "metrics", "checkpoint", "diverged", "seconds", "model_version", "promoted"}``.
    """
    if loss != SEARCHED and loss not in BASELINES:
        raise StepError(f"loss={loss!r}: expected {SEARCHED!r} or one of {list(BASELINES)}")
    spec = None
    if loss == SEARCHED:
        if not state:
            raise StepError("final_train(loss='searched') needs the final controller state")
        spec = searched_spec(state)
    out = storage.join(search_dir(work, search_name), "final", f"{loss}.json")
    final = plain(dict(final or {}))
    keys = cache_keys(work, At(data), At(init), loss, final, At(state), int(seed))
    key = keys[0]
    if storage.exists(out):
        done = storage.read_json(out)
        if done.get("key") in keys:
            return json.dumps(done)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="paploss-final-") as tmp:
        losses: list[float] = []
        cfg = _train_config(
            final, "final config",
            data=str(_local(data)), train_ann="train", val_ann="val",
            loss="paploss" if loss == SEARCHED else loss, spec=spec,
            init=str(_local(init)) if init else None, seed=int(seed), out_dir=tmp,
        )
        _log(f"final training with {loss}")
        res = _run_training(cfg, on_step=lambda it, value: losses.append(float(value)))
        ckpt_uri = storage.join(search_dir(work, search_name), "final", loss, "checkpoint.pt")
        if res.checkpoint:
            storage.write_bytes(ckpt_uri, Path(res.checkpoint).read_bytes())
        else:
            ckpt_uri = ""
    result = {
        "loss": loss, "key": key, "metrics": {k: float(v) for k, v in dict(res.metrics).items()},
        "checkpoint": ckpt_uri, "diverged": bool(res.diverged), "seconds": round(time.monotonic() - start, 3),
        "spec": spec.to_json() if spec is not None else None, "model_version": None, "promoted": False,
    }
    if tracking is not None:
        from paploss import tracking as tr

        client = _client(tracking)
        parent = tr.find_search_run(client, tracking["experiment"], search_name)
        if parent is None:
            raise SearchFailed(f"no MLflow parent run for search {search_name!r}")
        run_id = tr.log_final(
            client, parent.info.run_id, search_name=search_name, loss=loss, metrics=result["metrics"],
            losses=losses, checkpoint=ckpt_uri or None, spec_json=result["spec"],
            params={**{k: v for k, v in dict(final).items()}, "seed": seed},
        )
        result["run_id"] = run_id
        if loss == SEARCHED:
            version, promoted = tr.register_detector(
                client, model_name, run_id, search_name=search_name,
                ap=result["metrics"].get("AP", 0.0), promote=bool(promote),
            )
            result.update(model_version=version, promoted=promoted)
    storage.write_json(out, result)
    ap = result["metrics"].get("AP", float("nan"))
    _log(f"final {loss}: AP {ap:.4f}" + (f", model version {result['model_version']}" if result["model_version"] else ""))
    return json.dumps(result)


def report(
    finals: Sequence[str | Mapping[str, Any]],
    state: str,
    work: str,
    search_name: str,
    tracking: Mapping[str, str] | None = None,
) -> str:
    """The AP table of the final trainings (searched loss and baselines) as JSON;
    written to ``report.json`` in the search folder and on the parent MLflow run,
    which is then marked finished."""
    rows = [json.loads(x) if isinstance(x, str) else dict(x) for x in finals]
    doc, c = _read_state(state)
    best = c.best()
    table = {
        "search_name": search_name,
        "rounds": c.round,
        "failed_trials": doc.get("failed_trials", 0),
        "searched_spec": _searched_spec_of(doc, c).to_json(),
        "best_trial": dataclasses.asdict(best) if best is not None else None,
        "selection": {k: v for k, v in doc["selected"].items() if k != "from_state"} if doc.get("selected") else None,
        "final": {row["loss"]: row["metrics"] for row in rows},
        "model_version": next((row.get("model_version") for row in rows if row["loss"] == SEARCHED), None),
        "promoted": next((row.get("promoted") for row in rows if row["loss"] == SEARCHED), False),
    }
    uri = storage.join(search_dir(work, search_name), "report.json")
    storage.write_json(uri, table)
    if tracking is not None:
        from paploss import tracking as tr

        client = _client(tracking)
        parent = tr.find_search_run(client, tracking["experiment"], search_name)
        if parent is not None:
            client.log_dict(parent.info.run_id, table, "report.json")
            for row in rows:
                for k in ("AP", "AP50"):
                    if k in row["metrics"]:
                        client.log_metric(parent.info.run_id, f"final.{row['loss'].replace('+', '_')}.{k}", row["metrics"][k])
            tr.finish_search(client, parent.info.run_id)
    return json.dumps(table)


# ----------------------------------------------------------------------------------
# Presets (``paploss run --preset``, ``paploss search --preset``, ``make run PRESET=``)
# ----------------------------------------------------------------------------------
#
# A preset fixes the sizes of a search; every value can be overridden on the command
# line. ``rounds`` and ``parallelism`` are compile-time values of the KFP pipeline (a
# Python loop over rounds, each a sub-pipeline; ``ParallelFor`` takes a constant
# parallelism); everything else is a run-time pipeline parameter. The training
# options (``proxy``, ``final``) are fields of ``paploss.engine.TrainConfig``,
# ``pretrain`` the options of ``paploss.engine.pretrain``; unknown names are
# rejected before any training starts.


@dataclass(frozen=True)
class Preset:
    """Sizes of one search (see ``docs/pipeline.md`` for what each preset is for)."""

    rounds: int
    samples: int
    parallelism: int
    dataset: str = "bundled:shapes"
    bundled: dict = field(default_factory=dict)  # options of the bundled dataset (n_train, n_val, image_size)
    detector: str = ""  # "" = the engine's default
    proxy: dict = field(default_factory=dict)  # TrainConfig fields of a proxy trial
    final: dict = field(default_factory=dict)  # TrainConfig fields of the final trainings
    pretrain: dict = field(default_factory=dict)  # options of engine.pretrain
    controller: dict = field(default_factory=dict)  # Controller options (sigma, lr, steps, ...)
    max_failed_trials: int = 0  # 0 = a quarter of all trials (set in __post_init__)
    attempts: int = 2  # tries of a trial before it counts as failed
    seed: int = 0
    split_seed: int = 0
    # selection by re-evaluation after the last round: the select_top best samples,
    # each trained again with every seed of select_seeds (0: off, the searched loss is μ)
    select_top: int = 0
    select_seeds: list = field(default_factory=lambda: [1, 2, 3])
    # how the selection ranks the samples to pick its candidates (SELECT_RANKS)
    select_rank: str = "reward"
    # proxy trainings per sampled loss, each with its own seed; its reward is their mean (init_search)
    reward_seeds: int = 1
    # search-train/search-val splits the rounds cycle through (prepare_data, init_search)
    search_splits: int = 1
    # the share of train each search split holds out as search-val (prepare_data)
    search_val_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.max_failed_trials == 0:
            object.__setattr__(self, "max_failed_trials", max(1, self.rounds * self.samples * self.reward_seeds // 4))

    def with_overrides(self, **overrides: Any) -> "Preset":
        known = {f.name for f in fields(self)}
        unknown = sorted(k for k in overrides if k not in known)
        if unknown:
            raise ValueError(f"unknown preset field(s) {unknown}; known: {sorted(known)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        if "rounds" in given or "samples" in given or "reward_seeds" in given:
            if "max_failed_trials" not in given:
                given["max_failed_trials"] = 0  # recomputed from the new sizes
        return replace(self, **given)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


PRESETS: dict[str, Preset] = {
    # the plumbing end to end in a few minutes: tiny data, a few iterations per training
    "smoke": Preset(
        rounds=2, samples=2, parallelism=2,
        bundled={"n_train": 48, "n_val": 16, "image_size": 64},
        proxy={"preset": "smoke"},
        final={"preset": "smoke", "iterations": 8},
        pretrain={"iterations": 10, "batch_size": 8, "num_threads": 1},
    ),
    # the README's main job: a real (small) search on the bundled shapes, about 10
    # minutes on 2 idle CPU cores (proxy trials shortened from the engine's quick preset)
    "quick": Preset(
        rounds=2, samples=4, parallelism=2,
        bundled={"n_train": 500, "n_val": 100},
        proxy={"preset": "quick", "iterations": 60, "warmup_iters": 10},
        final={"preset": "quick", "iterations": 120, "warmup_iters": 20},
        pretrain={"iterations": 200, "num_threads": 2},
    ),
    # the paper's search: 40 rounds x 8 samples, 1-epoch proxies, 12-epoch final trainings (GPUs)
    "paper": Preset(
        rounds=40, samples=8, parallelism=8,
        proxy={"preset": "paper"},
        final={"preset": "paper", "epochs": 12, "lr_steps": [8 / 12, 11 / 12]},
        pretrain={"crop_size": 128, "iterations": 20000},
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None
