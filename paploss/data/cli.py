"""``paploss data``: make bundled datasets, split for search, convert VOC."""

from __future__ import annotations

import tempfile

import click

from paploss import storage
from paploss.errors import check_writable, expected

#: The documented failures of the data functions (their messages name the file or value).
_EXPECTED = (ValueError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError, FileNotFoundError)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def data() -> None:
    """Datasets in COCO layout: DIR/images/*, DIR/annotations/<split>.json."""


@data.command("make")
@click.argument("name", type=click.Choice(["shapes", "digits"]))
@click.option("--out", required=True, help="Output folder (or s3:// prefix: generated locally, then uploaded).")
@click.option("--n-train", type=int, default=None, show_default="1000", help="Training images.")
@click.option("--n-val", type=int, default=None, show_default="250", help="Validation images.")
@click.option("--image-size", type=int, default=None, show_default="128", help="Square image side in pixels.")
@click.option("--seed", type=int, default=0, show_default=True, help="Generator seed (same seed, same dataset).")
@click.option("--split/--no-split", default=True, show_default=True,
              help="Also write the search split (search_train.json, search_val.json) of the training set.")
def make(name: str, out: str, n_train, n_val, image_size, seed: int, split: bool) -> None:
    """Generate the bundled dataset NAME (shapes: filled shapes on textures;
    digits: scikit-learn's handwritten digits on a canvas)."""
    from paploss.data import make_dataset, search_split

    check_writable(out, "--out")
    def _split(local) -> None:
        if split:
            try:
                search_split(local, seed=seed)
            except ValueError as exc:  # too few images for every class on both sides
                click.echo(f"warning: search split not written: {exc}", err=True)

    with expected(*_EXPECTED, where="--out" if not storage.is_s3(out) else ""):
        if storage.is_s3(out):
            with tempfile.TemporaryDirectory() as tmp:
                local = make_dataset(name, f"{tmp}/ds", n_train=n_train, n_val=n_val, image_size=image_size, seed=seed)
                _split(local)
                storage.upload_dir(local, out)
        else:
            _split(make_dataset(name, out, n_train=n_train, n_val=n_val, image_size=image_size, seed=seed))
    click.echo(out)


@data.command("split")
@click.option("--data", "root", required=True, help="Dataset folder or s3:// prefix.")
@click.option("--source", default="train", show_default=True, help="Split to cut (annotations/<source>.json).")
@click.option("--val-fraction", type=float, default=0.2, show_default=True, help="Share of images in search_val.")
@click.option("--seed", type=int, default=0, show_default=True)
def split_cmd(root: str, source: str, val_fraction: float, seed: int) -> None:
    """Write annotations/search_train.json and search_val.json (disjoint by image,
    every class on both sides)."""
    from paploss.data import load_coco, search_split

    with expected(*_EXPECTED):
        a, b = search_split(root, source=source, val_fraction=val_fraction, seed=seed)
    for path in (a, b):
        coco = load_coco(path)
        click.echo(f"{path}: {len(coco['images'])} images, {len(coco['annotations'])} boxes")


@data.command("voc2coco")
@click.option("--voc-root", required=True, type=click.Path(exists=True, file_okay=False),
              help="VOC folder holding Annotations/, ImageSets/Main/, JPEGImages/.")
@click.option("--image-set", default="trainval", show_default=True, help="ImageSets/Main/<image-set>.txt")
@click.option("--out", required=True, help="Output COCO JSON (local or s3://).")
@click.option("--drop-difficult", is_flag=True, help="Drop 'difficult' objects instead of marking them iscrowd.")
def voc2coco(voc_root: str, image_set: str, out: str, drop_difficult: bool) -> None:
    """Convert PASCAL VOC XML annotations to one COCO file."""
    from paploss.data import voc_to_coco

    if not storage.is_s3(out):
        check_writable(out, "--out", folder=False)
    with expected(*_EXPECTED):
        coco = voc_to_coco(voc_root, image_set, out, keep_difficult=not drop_difficult)
    click.echo(f"{out}: {len(coco['images'])} images, {len(coco['annotations'])} boxes")


@data.command("check")
@click.argument("ann")
@click.option("--images", default=None, help="Image folder to check every file against.")
def check(ann: str, images) -> None:
    """Validate a COCO annotation file (and optionally its images)."""
    from paploss.data import load_coco

    coco = load_coco(ann, images_dir=images)
    click.echo(f"{ann}: OK, {len(coco['images'])} images, {len(coco['annotations'])} boxes, "
               f"{len(coco['categories'])} categories, {coco['info']['dropped_degenerate']} degenerate dropped")
