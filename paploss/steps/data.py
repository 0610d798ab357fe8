"""Stage 1, data: the dataset a search needs, with its search-train / search-val splits (SPEC §4)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Mapping

from paploss import storage
from paploss.steps.errors import StepError
from paploss.steps.options import (_ANN_SPLITS, _bundled_name, check_dataset, check_search_splits,
                                   check_search_val_fraction)
from paploss.steps.work import _log, _split_suffix, content_key, plain, search_split_files

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

