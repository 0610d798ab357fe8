"""``paploss pretrain | train | evaluate``: the engine on the command line."""

from __future__ import annotations

import json
import re
from importlib import resources

import click

from paploss import storage
from paploss.errors import InputError, check_writable, expected, one_line

#: The PAP loss ``paploss train --loss paploss`` trains without --spec/--form: the
#: loss the paper's authors searched on COCO for RetinaNet (their public release, also
#: in configs/mmdet/paploss_retinanet_r50_fpn_1x_coco.py): five functions H2, I2, I3,
#: I1, H1 and gradient scale 4.1231.
DEFAULT_SPEC = "retinanet_paper.json"


def default_spec():
    """The :class:`~paploss.spec.LossSpec` of :data:`DEFAULT_SPEC` (package data)."""
    from paploss.spec import LossSpec

    return LossSpec.from_json(resources.files("paploss").joinpath("specs", DEFAULT_SPEC).read_text("utf-8"))


def _spec(spec: str | None, form: str | None):
    from paploss.spec import LossSpec
    from paploss.spec_set import read_spec

    if spec and form:
        raise InputError("--spec/--form", "give --spec or --form, not both")
    if form:
        return LossSpec.handcrafted(form)
    if spec:
        try:
            return read_spec(storage.read_text(spec))
        except (FileNotFoundError, ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"--spec {spec}", one_line(getattr(exc, "what", exc))) from None
    return None


#: TrainConfig fields whose flag is not ``--<field with dashes>``.
_FLAGS = {"out_dir": "--out", "num_threads": "--threads", "resume": "--no-resume", "spec": "--spec/--form"}


def _flags_of(message: str) -> str:
    """The flags of the TrainConfig fields a message names, in order (``"--iterations/--epochs"``)."""
    from dataclasses import fields

    from paploss.engine import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    seen = []
    for word in re.findall(r"[a-z][a-z0-9_]*", message):
        if word in names and word not in seen and word != "data":  # "data" is also a plain word
            seen.append(word)
    return "/".join(_FLAGS.get(w, "--" + w.replace("_", "-")) for w in seen[:2]) or "options"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data", required=True, help="Dataset folder or s3:// prefix (images/, annotations/<split>.json).")
@click.option("--out", "out_file", required=True, help="Backbone file to write (local or s3://).")
@click.option("--ann", default="train", show_default=True, help="Split whose boxes are classified.")
@click.option("--detector", default="retinanet_mobilenet_v3_small", show_default=True,
              help="Detector whose backbone is trained (must match the trainings' --detector).")
@click.option("--iterations", type=int, default=600, show_default=True)
@click.option("--image-size", type=int, default=128, show_default=True)
@click.option("--crop-size", type=int, default=64, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=0.05, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a loaded CPU).")
def pretrain(data, out_file, ann, detector, iterations, image_size, crop_size, batch_size, lr, seed, device, threads):
    """Pre-train the warm-start backbone by classifying object crops (and background
    crops): no detection loss, so no candidate loss is favoured by the start."""
    from paploss.engine import pretrain as run

    check_writable(out_file, "--out", folder=False)
    with expected(ValueError, where="pretrain options"):
        click.echo(run(data, out_file, ann=ann, detector=detector, iterations=iterations, image_size=image_size,
                   crop_size=crop_size, batch_size=batch_size, lr=lr, seed=seed, device=device, num_threads=threads))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data", required=True, help="Dataset folder or s3:// prefix.")
@click.option("--out", "out_dir", default=None, help="Folder (or s3://) for checkpoint.pt and metrics.json.")
@click.option("--preset", default=None, type=click.Choice(["smoke", "quick", "paper"]),
              help="Start from a proxy preset (its splits, model and schedule); other options override it.")
@click.option("--loss", default=None, help="focal+l1 | focal+giou | paploss  [default: focal+l1]. paploss without "
              "--spec/--form trains the paper's published RetinaNet loss (paploss/specs/retinanet_paper.json).")
@click.option("--spec", default=None,
              help="Loss spec JSON file (for --loss paploss): one LossSpec, or a spec set with one per head.")
@click.option("--form", default=None, type=click.Choice(["sigmoid", "sqrt", "linear", "square"]),
              help="Handcrafted PAP form instead of --spec (implies --loss paploss).")
@click.option("--detach-i3", is_flag=True,
              help="PAP loss without the gradient into the boxes through I3 (not SPEC section 1; off by default). "
                   "On the bundled datasets it raised square by 1.3-2.3 AP but dropped sqrt "
                   "(docs/research/search-quality.md).")
@click.option("--train-ann", default=None, help="Training split [default: train].")
@click.option("--val-ann", default=None, help="Evaluation split [default: val].")
@click.option("--detector", default=None, help="retinanet_mobilenet_v3 | retinanet_mobilenet_v3_small | retinanet_resnet50 "
              "| faster_rcnn_mobilenet_v3 | faster_rcnn_mobilenet_v3_small | deformable_detr_tiny (MMDetection) "
              "| mmdet:<config file>")
@click.option("--image-size", type=int, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--iterations", type=int, default=None)
@click.option("--epochs", type=float, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default=None)
@click.option("--warmup-iters", type=int, default=None)
@click.option("--init", default=None, help="Warm-start backbone file from `paploss pretrain`.")
@click.option("--backbone-weights", default=None, help="torchvision weights name (DEFAULT = ImageNet; needs the internet).")
@click.option("--seed", type=int, default=None)
@click.option("--device", default=None, help="auto | cpu | cuda")
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--checkpoint-every", type=int, default=None)
@click.option("--no-resume", is_flag=True, help="Start over even if --out holds a checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--config", "config_json", default=None, metavar="JSON",
              help='More training options (fields of paploss.config.TrainConfig without a flag of their own), '
                   'e.g. \'{"fpn_channels": 32, "anchor_size": 8}\'; the flags above win.')
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Nodes of a distributed training (with --trainjob).")
@click.option("--gpus-per-node", type=click.IntRange(min=0), default=1, show_default=True,
              help="GPUs (torchrun processes) per node (with --trainjob; 0: CPU nodes).")
@click.option("--trainjob", is_flag=True,
              help="Run this training as a Kubeflow Trainer TrainJob on the cluster (torchrun on --nodes x "
                   "--gpus-per-node; --data/--out/--init/--spec must be s3://) and wait for it.")
@click.option("--dry-run", is_flag=True, help="With --trainjob: print the TrainJob as YAML, contact nothing.")
@click.option("--image", envvar="PAPLOSS_IMAGE", default=None, help="TrainJob: the image [env PAPLOSS_IMAGE].")
@click.option("--namespace", default=None, help="TrainJob: its namespace [the pod's own].")
@click.option("--k8s-api", default=None, help="TrainJob: Kubernetes API URL [in a pod: its service account's].")
@click.option("--runtime", default="torch-distributed", show_default=True,
              help="TrainJob: the ClusterTrainingRuntime it runs on.")
@click.option("--s3-secret", default="paploss-s3", show_default=True,
              help="TrainJob: secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.")
@click.option("--mlflow-secret", default=None,
              help="TrainJob: secret with MLFLOW_TRACKING_USERNAME / _PASSWORD or _TOKEN (each optional).")
@click.option("--service-account", default=None, help="TrainJob: service account of its pods.")
def train(data, out_dir, preset, loss, spec, form, detach_i3, train_ann, val_ann, detector, image_size, batch_size, iterations,
          epochs, lr, optimizer, warmup_iters, init, backbone_weights, seed, device, threads, checkpoint_every,
          no_resume, quiet, config_json, **placement):
    """Train a detector with a loss and write checkpoint.pt and metrics.json to --out.
    Prints the metrics (COCO AP on --val-ann) as JSON. With --trainjob, the same
    training runs on the cluster as a Kubeflow Trainer TrainJob (docs/deployment.md)."""
    if placement["trainjob"] or placement["dry_run"] or placement["nodes"] > 1 or placement["gpus_per_node"] > 1:
        from pipelines import trainjob  # kfp-free, but not part of the library: imported only here

        ctx = click.get_current_context()
        if trainjob.wants_trainjob(ctx.params):
            return trainjob.train_command(ctx, ctx.params)
    from paploss.engine import PROXY_PRESETS, TrainConfig, train as run

    base = {**(dict(PROXY_PRESETS[preset]) if preset else {}), **_config_option(config_json)}
    spec_obj = _spec(spec, form)
    if form and loss not in (None, "paploss"):
        raise InputError("--form", f"--form needs --loss paploss, got --loss {loss}")
    if spec_obj is None and (loss or base.get("loss")) == "paploss":
        spec_obj = default_spec()  # documented in --loss's help
    over = dict(loss=loss or ("paploss" if spec_obj is not None else None), spec=spec_obj, train_ann=train_ann,
                val_ann=val_ann, detector=detector, image_size=image_size, batch_size=batch_size, lr=lr,
                optimizer=optimizer, warmup_iters=warmup_iters, init=init, backbone_weights=backbone_weights,
                seed=seed, device=device, num_threads=threads, checkpoint_every=checkpoint_every,
                detach_i3=detach_i3 or None)
    cfg = {**base, **{k: v for k, v in over.items() if v is not None}}
    if iterations is not None or epochs is not None:
        cfg["iterations"], cfg["epochs"] = iterations, epochs
    elif "iterations" not in cfg and "epochs" not in cfg:
        cfg["epochs"] = 1.0
    try:
        config = TrainConfig(data=data, out_dir=out_dir, resume=not no_resume, **cfg)
    except ValueError as exc:
        raise InputError(_flags_of(str(exc)), one_line(exc)) from None
    if out_dir:
        check_writable(out_dir, "--out")
    result = run(config, progress=not quiet)
    click.echo(json.dumps({"metrics": result.metrics, "diverged": result.diverged, "iterations": result.iterations,
                           "seconds": round(result.seconds, 1), "checkpoint": result.checkpoint}))


def _config_option(text: str | None) -> dict:
    """``--config``'s JSON object of TrainConfig fields ({} when not given)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError("--config", f"not JSON ({exc.msg}): {text[:200]!r}") from None
    if not isinstance(value, dict):
        raise InputError("--config", f"must be a JSON object of training options, got {text[:200]!r}")
    return value


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint")
@click.option("--data", default=None, help="Dataset folder or s3:// prefix [default: the one trained on].")
@click.option("--ann", default="val", show_default=True, help="Split to evaluate.")
@click.option("--device", default="auto", show_default=True)
@click.option("--out", "out_file", default=None, help="Also write the metrics JSON here (local or s3://).")
def evaluate(checkpoint, data, ann, device, out_file):
    """COCO AP (AP, AP50, AP75, APs, APm, APl) of CHECKPOINT on a split, as JSON."""
    from paploss.engine import evaluate_checkpoint

    if out_file:
        check_writable(out_file, "--out", folder=False)
    with expected(ValueError, where=f"{checkpoint} on --ann {ann}"):
        metrics = evaluate_checkpoint(checkpoint, data, ann, device=device)
    if out_file:
        storage.write_json(out_file, metrics)
    click.echo(json.dumps(metrics))
