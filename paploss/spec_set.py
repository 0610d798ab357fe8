"""A loss spec per head: the Parameterized AP Loss of a detector with several heads (SPEC §3).

A one-stage detector (RetinaNet) has one :class:`~paploss.spec.LossSpec`. Faster R-CNN
has two heads trained with the PAP loss, the RPN and the RoI box head, each with its
own five functions and its own gradient scale; the search optimises both together,
2 × 41 = 82 numbers. A :class:`SpecSet` holds a named ``LossSpec`` per head.

The JSON of a spec set::

    {"format": "paploss-specs/1",
     "heads": {"rpn": {"form": ..., "points": ..., "grad_scale": ...},
               "roi": {"form": ..., "points": ..., "grad_scale": ...}}}

A plain ``LossSpec`` JSON (``{"form": ...}``) stays valid everywhere a spec is read
(:func:`read_spec` returns whichever it finds). For a detector with several heads a
plain ``LossSpec`` means the same loss on every head.

θ of a detector (the search's vector): the per-head θ (``LossSpec.to_theta``, 41
numbers for five functions and the gradient scale) concatenated in the detector's
fixed head order :func:`head_names` (``rpn`` then ``roi`` for Faster R-CNN)::

    θ = [ θ(rpn) (41) | θ(roi) (41) ]                     (82 numbers)

:func:`theta_dim`, :func:`from_theta`, :func:`to_theta` and :func:`split_theta` map
between θ and specs for any detector name; a detector with one head (and an
``mmdet:<config>`` detector) has no head names and takes a plain ``LossSpec``.

Detectors by name (:func:`detector_names`): the torchvision ones of
``paploss.models.DETECTORS`` and the MMDetection configs of :data:`MMDET_DETECTORS`
(``deformable_detr_tiny``). Such a config is a file of the installed package
(``paploss/configs/mmdet/``), so a TrainConfig, a pipeline parameter and a CLI flag
carry the *name*; the machine that trains it finds its own copy with
:func:`mmdet_config` (:func:`is_mmdet` tells which detectors train through
MMDetection: these names and ``mmdet:<config file>``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from paploss.config import MMDET_PREFIX  # "mmdet:<config file>": a user's own MMDetection config
from paploss.spec import LossSpec

__all__ = [
    "SPECS_FORMAT",
    "FAMILY_HEADS",
    "SpecSet",
    "head_names",
    "theta_dim",
    "split_theta",
    "from_theta",
    "to_theta",
    "read_spec",
    "spec_for_heads",
    "check_spec",
    "MMDET_DETECTORS",
    "MMDET_PREFIX",
    "is_mmdet",
    "mmdet_config",
    "resolve_detector",
    "detector_names",
]

SPECS_FORMAT = "paploss-specs/1"
# detector family (paploss.models.DETECTORS) -> its PAP-loss heads, in θ order
FAMILY_HEADS: dict[str, tuple[str, ...]] = {"faster_rcnn": ("rpn", "roi")}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# detector name -> its MMDetection config, a file of the paploss package (package data,
# relative to the package folder), so the name works wherever paploss is installed; one loss each
MMDET_DETECTORS: dict[str, str] = {"deformable_detr_tiny": "configs/mmdet/paploss_deformable_detr_tiny_shapes.py"}


@dataclass(frozen=True)
class SpecSet:
    """A named :class:`LossSpec` per head, in the order given (the θ order of :meth:`to_theta`).

    ``heads``: ``((name, spec), ...)``, at least one, names unique, lower-case
    identifiers (``rpn``, ``roi``). Build it with ``SpecSet.of(rpn=..., roi=...)``.
    """

    heads: tuple[tuple[str, LossSpec], ...]

    def __post_init__(self) -> None:
        heads = self.heads
        if isinstance(heads, Mapping):
            heads = tuple(heads.items())
        if isinstance(heads, (str, bytes)) or not isinstance(heads, Sequence) or not heads:
            raise ValueError(f"a spec set needs at least one (name, LossSpec) head, got {self.heads!r}")
        seen = []
        for i, item in enumerate(heads):
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(f"spec set head {i} must be a (name, LossSpec) pair, got {item!r}")
            name, spec = item
            if not isinstance(name, str) or not _NAME.match(name):
                raise ValueError(f"spec set head {i}: name must be a lower-case identifier such as 'rpn', got {name!r}")
            if name in seen:
                raise ValueError(f"spec set head {name!r} is given twice")
            if not isinstance(spec, LossSpec):
                raise ValueError(f"spec set head {name!r} must be a LossSpec, got {type(spec).__name__}: {spec!r}")
            seen.append(name)
        object.__setattr__(self, "heads", tuple((n, s) for n, s in heads))

    @classmethod
    def of(cls, **specs: LossSpec) -> "SpecSet":
        """``SpecSet.of(rpn=spec_a, roi=spec_b)``: heads in the order of the keywords."""
        return cls(tuple(specs.items()))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.heads)

    def __getitem__(self, name: str) -> LossSpec:
        for n, s in self.heads:
            if n == name:
                return s
        raise KeyError(f"no head {name!r} in the spec set (heads: {list(self.names)})")

    def to_theta(self) -> tuple[float, ...]:
        """The heads' θ (``LossSpec.to_theta``) concatenated in the set's order."""
        out: list[float] = []
        for name, spec in self.heads:
            try:
                out += spec.to_theta()
            except ValueError as exc:
                raise ValueError(f"head {name!r}: {exc}") from None
        return tuple(out)

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        return {"format": SPECS_FORMAT, "heads": {n: s.to_dict() for n, s in self.heads}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SpecSet":
        if not isinstance(d, Mapping):
            raise ValueError(f"a spec set must be a JSON object / mapping, got {type(d).__name__}: {d!r}")
        unknown = set(d) - {"format", "heads"}
        if unknown:
            raise ValueError(f"unknown field(s) in spec set: {sorted(unknown)} (known: format, heads)")
        if d.get("format") != SPECS_FORMAT:
            raise ValueError(f"spec set field 'format' must be {SPECS_FORMAT!r}, got {d.get('format')!r}")
        heads = d.get("heads")
        if not isinstance(heads, Mapping) or not heads:
            raise ValueError(f"spec set field 'heads' must be a non-empty object of name -> loss spec, got {heads!r}")
        out = []
        for name, spec in heads.items():
            try:
                out.append((name, LossSpec.from_dict(spec)))
            except ValueError as exc:
                raise ValueError(f"spec set field 'heads.{name}': {exc}") from None
        return cls(tuple(out))

    def to_json(self) -> str:
        """JSON text; ``SpecSet.from_json(s.to_json()) == s`` exactly (floats use repr)."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str | bytes) -> "SpecSet":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"spec set is not valid JSON: {exc}") from None
        return cls.from_dict(d)


def read_spec(source: str | bytes | Mapping[str, Any]) -> LossSpec | SpecSet:
    """A ``LossSpec`` or a ``SpecSet`` from its JSON text or dict: a dict with
    ``"format": "paploss-specs/1"`` (or a ``"heads"`` field) is a spec set, anything
    else is read as a plain loss spec (and its errors name that)."""
    if isinstance(source, (str, bytes)):
        try:
            d = json.loads(source)
        except json.JSONDecodeError as exc:
            raise ValueError(f"loss spec is not valid JSON: {exc}") from None
    else:
        d = source
    if isinstance(d, Mapping) and ("format" in d or "heads" in d):
        return SpecSet.from_dict(d)
    return LossSpec.from_dict(d)


# ------------------------------------------------------------------ per detector
def detector_names() -> list[str]:
    """Every detector name ``--detector`` takes (``mmdet:<config>`` aside), sorted."""
    from paploss.models import DETECTORS

    return sorted({*DETECTORS, *MMDET_DETECTORS})


def is_mmdet(detector: str) -> bool:
    """Whether ``detector`` trains through MMDetection (``paploss.integrations.mmdet_train``):
    an :data:`MMDET_DETECTORS` name or ``mmdet:<config file>``."""
    if not isinstance(detector, str):
        raise ValueError(f"detector must be a name, got {detector!r}")
    return detector.startswith(MMDET_PREFIX) or detector in MMDET_DETECTORS


def mmdet_config(detector: str) -> str:
    """The MMDetection config file of ``detector`` on *this* machine.

    An :data:`MMDET_DETECTORS` name -> the file shipped in the installed paploss package
    (found through ``importlib.resources``, so a wheel, an image or a checkout each give
    their own path); ``mmdet:<config file>`` -> that file as given. Call it where the
    training runs, never to build what is sent elsewhere: send the name.
    Raises ValueError for any other detector, or when the packaged file is missing."""
    if not is_mmdet(detector):
        raise ValueError(f"detector {detector!r} is not an MMDetection one: "
                         f"{', '.join(sorted(MMDET_DETECTORS))} or {MMDET_PREFIX}<config file>")
    if detector.startswith(MMDET_PREFIX):
        path = detector[len(MMDET_PREFIX):]
        if not path:
            raise ValueError(f"detector {detector!r} names no MMDetection config file after {MMDET_PREFIX!r}")
        return path
    from importlib import resources
    from pathlib import Path

    shipped = resources.files("paploss").joinpath(*MMDET_DETECTORS[detector].split("/"))
    if not (isinstance(shipped, Path) and shipped.is_file()):
        raise ValueError(f"detector {detector}: its MMDetection config paploss/{MMDET_DETECTORS[detector]} is missing "
                         f"from the installed package ({shipped}); reinstall paploss (the file is package data)")
    return str(shipped)


def resolve_detector(detector: str) -> str:
    """``mmdet:<this machine's config file>`` for an :data:`MMDET_DETECTORS` name
    (:func:`mmdet_config`); any other name as it is ("" too: the engine's default).

    Only for a tool that runs here and needs the file itself (MMDetection's own
    ``tools/train.py``): a TrainConfig, the pipeline and the CLIs take the name, which
    the training machine resolves."""
    if not isinstance(detector, str):
        raise ValueError(f"detector must be a name, got {detector!r}")
    if detector not in MMDET_DETECTORS:
        return detector
    return MMDET_PREFIX + mmdet_config(detector)


def head_names(detector: str) -> tuple[str, ...]:
    """The PAP-loss heads of ``detector`` in θ order: ``("rpn", "roi")`` for a Faster
    R-CNN, ``()`` for a detector with one loss (RetinaNet, an MMDetection one: :func:`is_mmdet`)."""
    if not isinstance(detector, str):
        raise ValueError(f"detector must be a name, got {detector!r}")
    if is_mmdet(detector):
        return ()
    from paploss.models import DETECTORS

    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; known: {sorted(DETECTORS)}")
    return FAMILY_HEADS.get(DETECTORS[detector][0], ())


def theta_dim(detector: str, per_head: int = 41) -> int:
    """Length of θ for ``detector``: ``per_head`` (41: five functions and the gradient
    scale; a search of fewer functions has fewer) times the number of heads (1 or 2)."""
    if isinstance(per_head, bool) or not isinstance(per_head, int) or per_head < 1:
        raise ValueError(f"per_head must be a positive int, got {per_head!r}")
    return per_head * max(1, len(head_names(detector)))


def split_theta(detector: str, theta: Sequence[float]) -> list[list[float]]:
    """θ of ``detector`` -> one θ per head (equal parts, in :func:`head_names` order);
    a one-head detector gives ``[θ]``."""
    t = [float(v) for v in theta]
    n = max(1, len(head_names(detector)))
    if len(t) % n:
        raise ValueError(f"theta of {detector} must hold {n} equal parts (one per head), got {len(t)} numbers")
    k = len(t) // n
    return [t[i * k:(i + 1) * k] for i in range(n)]


def from_theta(detector: str, theta: Sequence[float]) -> LossSpec | SpecSet:
    """The spec of θ for ``detector``: a ``LossSpec`` (one head) or a ``SpecSet`` of the
    heads in :func:`head_names` order. Each part goes through ``LossSpec.from_theta``
    (41, 40, 33, 32, 9 or 8 numbers)."""
    names = head_names(detector)
    parts = split_theta(detector, theta)
    if not names:
        return LossSpec.from_theta(parts[0])
    specs = []
    for name, part in zip(names, parts):
        try:
            specs.append((name, LossSpec.from_theta(part)))
        except ValueError as exc:
            raise ValueError(f"head {name!r} of {detector}: {exc}") from None
    return SpecSet(tuple(specs))


def to_theta(detector: str, spec: LossSpec | SpecSet) -> tuple[float, ...]:
    """θ of ``spec`` for ``detector`` (inverse of :func:`from_theta`): the heads in the
    detector's order whatever the set's order; a plain ``LossSpec`` on a two-head
    detector gives its θ once per head."""
    per_head = spec_for_heads(detector, spec)
    if isinstance(per_head, LossSpec):
        return per_head.to_theta()
    return SpecSet(tuple(per_head.items())).to_theta()


def check_spec(detector: str, spec: Any) -> None:
    """Raise a ``ValueError`` when ``spec`` (None, a LossSpec or a SpecSet) does not fit
    ``detector``: a spec set on a one-head detector, or heads other than the detector's."""
    if spec is None or isinstance(spec, LossSpec):
        return
    if not isinstance(spec, SpecSet):
        raise ValueError(f"spec must be a LossSpec or a SpecSet, got {type(spec).__name__}: {spec!r}")
    names = head_names(detector)
    if not names:
        raise ValueError(
            f"detector {detector} has one loss: give a plain loss spec, not a spec set with heads {list(spec.names)}"
        )
    if set(spec.names) != set(names):
        raise ValueError(f"detector {detector} has the heads {list(names)}; the spec set has {list(spec.names)}")


def spec_for_heads(detector: str, spec: LossSpec | SpecSet) -> LossSpec | dict[str, LossSpec]:
    """What each head of ``detector`` trains with: the ``LossSpec`` itself for a one-head
    detector, else ``{head: LossSpec}`` in head order (a plain ``LossSpec`` on every head)."""
    if spec is None:
        raise ValueError(f"detector {detector}: the PAP loss needs a spec")
    check_spec(detector, spec)
    names = head_names(detector)
    if not names:
        return spec
    if isinstance(spec, LossSpec):
        return {n: spec for n in names}
    return {n: spec[n] for n in names}
