"""Stage 6, the report: the AP table of the final trainings."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

from paploss import storage
from paploss.steps.finals import SEARCHED
from paploss.steps.state import _read_state, _searched_spec_of
from paploss.steps.work import _client, search_dir

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

