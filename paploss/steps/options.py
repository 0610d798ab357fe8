"""The checks and normalisation of a search's options, run before any work.

Every check raises :class:`~paploss.steps.errors.StepError` naming the option and its
value; ``paploss run|search`` call them all before data is generated or anything trains.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from paploss import storage
from paploss.steps.errors import StepError
from paploss.steps.work import _engine, plain

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


_ANN_SPLITS = ("train", "val", "search_train", "search_val")


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
        from paploss.config import PROXY_PRESETS

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


#: The proxy trials' training seed: the search's seed in every round. A state file records
#: it (``trial_seeds``); ``per-round`` (seed + round) measured no better and is gone, so
#: a state file that names it is refused.
TRIAL_SEEDS = ("fixed",)


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



def check_pretrain_options(config: Mapping[str, Any] | None, proxy: Mapping[str, Any] | None = None,
                           detector: str = "") -> dict:
    """The warm start's options (``engine.pretrain``'s, completed by
    :func:`pretrain_options`): known names, known detector, sizes and counts >= 1, a
    learning rate and width > 0. Returns them; raises ``StepError`` naming the bad one."""
    import inspect
    import math

    engine = _engine()
    params = inspect.signature(engine.pretrain).parameters
    known = sorted(k for k in params if k not in ("data", "out_file", "progress"))
    options = pretrain_options(config, proxy, detector)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise StepError(f"pretrain options have unknown name(s) {unknown}; known: {known}")
    for name, value in options.items():
        default = params[name].default
        if name == "detector":
            if engine.is_mmdet(str(value)):
                continue  # an MMDetection detector gets no warm start (steps.pretrain): its own init applies
            if value not in engine.DETECTORS:
                raise StepError(f"pretrain options: detector={value!r} is unknown; known: {sorted(engine.DETECTORS)}")
        elif name in ("seed",):
            if isinstance(value, bool) or not isinstance(value, int):
                raise StepError(f"pretrain options: {name}={value!r} must be an integer")
        elif isinstance(default, int) and not isinstance(default, bool) or name == "num_threads":
            if value is None and default is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise StepError(f"pretrain options: {name}={value!r} must be an integer >= 1")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise StepError(f"pretrain options: {name}={value!r} must be a number > 0")
        elif isinstance(default, str) and not isinstance(value, str):
            raise StepError(f"pretrain options: {name}={value!r} must be a string")
    return options


#: MLflow tracking URI schemes that need no database driver.
_PLAIN_TRACKING = ("http", "https", "file", "sqlite", "databricks", "databricks-uc", "uc")
#: The database schemes MLflow stores runs in through SQLAlchemy.
_SQL_TRACKING = ("postgresql", "mysql", "mssql")


def check_tracking_uri(uri: str) -> None:
    """The tracking URI's scheme is one MLflow stores runs in, and a database URI's
    driver is installed (``postgresql://`` needs psycopg2 or psycopg, ``mysql://``
    mysqlclient or pymysql, ...): else ``StepError`` naming the URI (its credentials
    masked) and the missing module. Contacts nothing."""
    from paploss.errors import mask

    if not isinstance(uri, str) or not uri:
        raise StepError(f"tracking_uri={uri!r}: give an MLflow tracking URI")
    if "://" not in uri:
        return  # a local path: a file store
    scheme = uri.split("://", 1)[0].lower()
    base = scheme.split("+", 1)[0]
    if base in _PLAIN_TRACKING and "+" not in scheme:
        return
    if base not in _SQL_TRACKING and base != "sqlite":
        raise StepError(f"tracking_uri={mask(uri)!r}: unknown scheme {scheme!r}; MLflow takes "
                        f"{', '.join(_PLAIN_TRACKING + _SQL_TRACKING)} (a database with its driver: postgresql+psycopg2)")
    try:
        from sqlalchemy.engine import make_url

        make_url(uri).get_dialect().import_dbapi()
    except ImportError as exc:
        raise StepError(f"tracking_uri={mask(uri)!r}: the {scheme} database driver is not installed "
                        f"({exc}); install it (pip install psycopg2-binary for postgresql, pymysql for "
                        f"mysql+pymysql) or use sqlite:/// or an http(s):// server") from None
    except Exception as exc:  # noqa: BLE001 - a URI SQLAlchemy cannot parse
        raise StepError(f"tracking_uri={mask(uri)!r}: not a database URI SQLAlchemy reads ({exc})") from None
