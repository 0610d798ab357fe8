"""Stage 6, the report: the AP table of the final trainings."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

from paploss import storage
from paploss.steps.finals import SEARCHED
from paploss.steps.lr_sweep import START
from paploss.steps.state import _read_state, _searched_spec_of
from paploss.steps.errors import StepError
from paploss.steps.work import search_dir

def report(
    finals: Sequence[str | Mapping[str, Any]],
    state: str,
    work: str,
    search_name: str,
    tracking: Mapping[str, str] | None = None,
    model_name: str = "paploss-retinanet",
    promote: bool = False,
    promote_rule: str = "beat-baselines",
) -> str:
    """The AP table of the final trainings (searched loss and baselines) as JSON;
    written to ``report.json`` in the search folder and on the parent MLflow run,
    which is then described (the table, the decision, the searched loss's figure)
    and marked finished.

    Promotion is decided here, where every final is known
    (:func:`paploss.tracking.decide_promotion`): with ``promote``, the searched
    model version becomes ``champion`` when it is at least the current champion and,
    by ``promote_rule`` ``beat-baselines`` (the default), not behind a baseline of
    this search; ``champion`` ignores the baselines. ``promote`` is off by default so
    that a caller that does not pass it (the retrain gate) decides itself. The
    table's ``promotion`` says what was decided and why. With the search's start among
    the finals, ``searched_minus_start`` is the searched loss's AP x 100 minus its
    start's; ``lrs`` holds the lr sweep's choices when there was one."""
    from paploss import tracking as tr

    if promote_rule not in tr.PROMOTE_RULES:
        raise StepError(f"promote_rule={promote_rule!r}: expected one of {list(tr.PROMOTE_RULES)}")
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
        "ap_unit": "the metrics here are COCO AP as fractions; MLflow, the console and the promotion say AP x 100",
    }
    finals_ap = {loss: m.get("AP") for loss, m in table["final"].items()}
    if isinstance(finals_ap.get(SEARCHED), (int, float)) and isinstance(finals_ap.get(START), (int, float)):
        table["searched_minus_start"] = tr.ap100(finals_ap[SEARCHED]) - tr.ap100(finals_ap[START])  # AP x 100
    sweep = storage.join(search_dir(work, search_name), "lr_sweep.json")
    if storage.exists(sweep):
        table["lrs"] = storage.read_json(sweep).get("lrs", {})
    if tracking is not None:
        decision = tr.record_report(tracking, search_name, table, model_name=model_name, promote=bool(promote),
                                    rule=promote_rule, searched=SEARCHED)
    else:
        decision = tr.offline_decision(table, promote_rule, searched=SEARCHED)
    table.update(promotion=decision, promoted=bool(decision["promote"]))
    uri = storage.join(search_dir(work, search_name), "report.json")
    storage.write_json(uri, table)
    return json.dumps(table)


def report_outputs(table: str | Mapping[str, Any]) -> tuple[dict[str, float], str]:
    """What the report task shows on the KFP run page: ``(metrics, markdown)``, the
    finals' ``AP.<loss>``/``AP50.<loss>`` (AP x 100) for a ``Metrics`` output and the AP
    table with the promotion decision for a ``Markdown`` output."""
    from paploss import tracking as tr

    t = json.loads(table) if isinstance(table, str) else dict(table)
    metrics = {f"{k}.{loss}": tr.ap100(m[k]) for loss, m in t["final"].items() for k in ("AP", "AP50")
               if isinstance(m.get(k), (int, float)) and m[k] >= 0}
    return metrics, tr.report_markdown(t, t.get("promotion"), None)
