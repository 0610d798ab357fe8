"""What people and platforms see of a search in MLflow, beyond its metrics.

- the **lineage** tags of a registered model version (git commit, image, data digest,
  loss spec, KFP run id): where the model came from;
- the **parent run's description**: the AP table and the promotion decision, as Markdown;
- the **runs table's saved views**: the columns (duration, AP, AP50, reward) and filters
  a user would otherwise set by hand, and the address that opens them.

Pure text and tags; :mod:`paploss.tracking` writes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping

#: The tag that says what a run is (``search``, ``trial``, ``final``).
KIND_TAG = "paploss.kind"


def ap100(value: float) -> float:
    """A COCO AP as a fraction (what evaluation returns) → the one unit recorded: AP × 100, to
    COCO's two decimals (the runs table shows 12.66, not 12.6607035...)."""
    return round(100.0 * float(value), 2)


# ----------------------------------------------------------------------------- lineage

def _git_commit() -> str:
    if os.environ.get("PAPLOSS_GIT_COMMIT"):
        return os.environ["PAPLOSS_GIT_COMMIT"]
    here = Path(__file__).resolve().parent.parent
    if not (here / ".git").exists():
        return "unknown"
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _data_digest(data: str | None) -> str:
    """sha256 (first 16 hex) of the dataset's train and val annotation files: which data trained and scored it."""
    if not data:
        return "unknown"
    from paploss import storage

    h = hashlib.sha256()
    for name in ("train", "val"):
        uri = storage.join(data, "annotations", f"{name}.json")
        if not storage.exists(uri):
            return "unknown"
        h.update(storage.read_bytes(uri))
    return h.hexdigest()[:16]


def lineage(*, data: str | None, spec_json: str | None, image: str | None = None,
            kfp_run_id: str | None = None) -> dict[str, str]:
    """Where a detector came from, as tags: ``paploss.git_commit`` (``PAPLOSS_GIT_COMMIT``
    or the checkout's HEAD), ``paploss.image`` (``image``, else ``PAPLOSS_IMAGE``, else
    "none (not in a container)"), ``paploss.data_digest`` (:func:`_data_digest`),
    ``paploss.loss_spec`` (the spec JSON, or "handcrafted baseline") and
    ``paploss.kfp_run_id`` (``kfp_run_id``, else ``KFP_RUN_ID``) where there is one."""
    out = {
        "paploss.git_commit": _git_commit(),
        "paploss.image": image or os.environ.get("PAPLOSS_IMAGE") or "none (not in a container)",
        "paploss.data_digest": _data_digest(data),
        "paploss.loss_spec": spec_json or "handcrafted baseline",
    }
    run = kfp_run_id or os.environ.get("KFP_RUN_ID")
    if run:
        out["paploss.kfp_run_id"] = run
    return out


# ----------------------------------------------------------------------------- the report

def report_markdown(table: Mapping[str, Any], decision: Mapping[str, Any] | None, parent_run_id: str | None) -> str:
    """The parent run's description: the AP table (AP × 100 on val), the promotion
    decision and the searched loss's figure (the run's ``functions.png``)."""
    keys = ("AP", "AP50", "AP75")
    lines = [f"## paploss search `{table['search_name']}`", "",
             "| loss | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for loss, metrics in table["final"].items():
        cells = [f"{ap100(metrics[k]):.2f}" if isinstance(metrics.get(k), (int, float)) and metrics[k] >= 0 else "-"
                 for k in keys]
        lines.append(f"| {loss} | " + " | ".join(cells) + " |")
    lines += ["", f"COCO AP x 100 on val; {table['rounds']} rounds, {table['failed_trials']} failed trials."]
    if table.get("model_version"):
        lines.append(f"Registered model version {table['model_version']}.")
    if decision:
        lines.append(f"**{decision['reason']}**")
    if parent_run_id:
        lines += ["", "The searched loss (its five functions, as the paper's Figure 1):", "",
                  f"![searched loss](get-artifact?path=functions.png&run_uuid={parent_run_id})", "",
                  f"[functions.png](get-artifact?path=functions.png&run_uuid={parent_run_id}) · "
                  f"[rewards.png](get-artifact?path=rewards.png&run_uuid={parent_run_id}) · "
                  f"[report.json](get-artifact?path=report.json&run_uuid={parent_run_id})"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the UI's runs view

#: The saved view of the runs table this module keeps on the experiment (MLflow 3's
#: "Views" menu; an experiment tag ``mlflow.sharedViewState.<id>``).
RUNS_VIEW = "paploss"
_VIEW_TAG = "mlflow.sharedViewState."
#: Its columns: what a user sorts finals and trials by (AP x 100, the reward, duration).
RUNS_VIEW_COLUMNS = ("attributes.`Duration`", "metrics.`AP`", "metrics.`AP50`", "metrics.`reward`",
                     "metrics.`AP.searched`", "metrics.`AP.focal_l1`", "metrics.`AP.focal_giou`",
                     "tags.`paploss.loss`")


#: The second view: the finals and trials side by side (their parent rows left out,
#: so none is folded away), best AP first.
FINALS_VIEW = "paploss-finals"


def _set_view(client, experiment: str, view: str, name: str, state: Mapping[str, Any]) -> None:
    old = (client.get_experiment(experiment).tags or {}).get(_VIEW_TAG + view)
    now = int(time.time() * 1000)
    try:
        created = int(json.loads(old)["createdAt"]) if old else now
    except (ValueError, KeyError, TypeError):
        created = now
    client.set_experiment_tag(experiment, _VIEW_TAG + view, json.dumps(
        {"name": name, "createdAt": created, "updatedAt": now, "state": json.dumps(dict(state))}))


def save_runs_views(client, experiment: str) -> None:
    """Keep the experiment's two saved views of the runs table (MLflow 3's "Views"
    menu), both with :data:`RUNS_VIEW_COLUMNS` shown: :data:`RUNS_VIEW`, every run,
    newest first; :data:`FINALS_VIEW`, the finals and trials only, best AP first.
    :func:`runs_url` opens one."""
    columns = list(RUNS_VIEW_COLUMNS)
    _set_view(client, experiment, RUNS_VIEW, "paploss: AP, reward, duration",
              {"selectedColumns": columns, "orderByKey": "attributes.start_time", "orderByAsc": False})
    _set_view(client, experiment, FINALS_VIEW, "paploss: finals and trials by AP",
              {"selectedColumns": columns, "orderByKey": "metrics.`AP`", "orderByAsc": False,
               "searchFilter": f"tags.`{KIND_TAG}` != 'search'"})


def runs_url(experiment_id: str, base: str = "http://127.0.0.1:5000", view: str = RUNS_VIEW) -> str:
    """The UI address of the experiment's runs table in the model-training view, opened on a saved view."""
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={view}"
