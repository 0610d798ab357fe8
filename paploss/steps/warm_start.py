"""Stage 2, warm start: the backbone every trial and final training begins from."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Mapping

from paploss import storage
from paploss.steps.errors import StepError
from paploss.steps.options import pretrain_options
from paploss.steps.work import At, _engine, _local, _log, cache_key

def pretrain(data: str, work: str, config: Mapping[str, Any] | None = None, seed: int = 0,
             detector: str = "", proxy: Mapping[str, Any] | None = None, *, only_cached: bool = False) -> str:
    """The warm start every trial and final training begins from (a backbone
    pre-trained on a classification task, as the paper's ImageNet one; see
    ``paploss.engine.pretrain``, whose options ``config`` holds); returns its URI,
    shared by every search on the same data and config.

    The backbone must fit the trials' detector: ``detector``, ``width_mult`` and
    ``image_size`` not in ``config`` come from the ``proxy`` training options;
    ``detector`` (the pipeline parameter, "" = keep) overrides both.

    An MMDetection detector (a name such as ``deformable_detr_tiny`` or ``"mmdet:<config>"``) gets no warm start here: it
    starts as its config says (``init_cfg`` / ``load_from``), and this returns "".
    With ``only_cached``, train nothing: return the URI if it exists, else ""."""
    config = pretrain_options(config, proxy, detector)
    if _engine().is_mmdet(str(config.get("detector", ""))):
        _log(f"no warm start for {config['detector']}: the MMDetection config's own init_cfg/load_from applies")
        return ""
    out = storage.join(work, "pretrain", cache_key(work, "pretrain", At(data), config, int(seed)), "backbone.pt")
    if storage.exists(out):
        return out
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

