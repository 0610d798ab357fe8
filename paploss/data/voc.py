"""PASCAL VOC (one XML file per image) -> COCO.

VOC boxes are 1-based inclusive pixel corners ``(xmin, ymin, xmax, ymax)``; COCO
boxes are ``[x, y, w, h]`` with ``x = xmin - 1``, ``w = xmax - xmin + 1``.  Objects
marked ``difficult`` are kept with ``iscrowd = 1`` (ignored by COCO evaluation, as
VOC's own evaluation ignores them) unless ``keep_difficult=False`` drops them.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

from paploss import storage

__all__ = ["VOC_CLASSES", "voc_to_coco"]

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]


def _text(node: ET.Element, tag: str, source: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        raise ValueError(f"{source}: missing <{tag}>")
    return child.text.strip()


def voc_to_coco(
    voc_root: str | os.PathLike,
    image_set: str,
    out_json: str | os.PathLike,
    *,
    classes: list[str] | None = None,
    keep_difficult: bool = True,
) -> dict:
    """Convert ``voc_root/ImageSets/Main/<image_set>.txt`` (ids) with
    ``voc_root/Annotations/<id>.xml`` into a COCO file at ``out_json`` (images are
    referred to as ``<filename>`` under ``voc_root/JPEGImages``).  Returns the dict."""
    root = Path(voc_root)
    classes = list(classes or VOC_CLASSES)
    cat_id = {name: k + 1 for k, name in enumerate(classes)}
    list_file = root / "ImageSets" / "Main" / f"{image_set}.txt"
    if not list_file.is_file():
        raise FileNotFoundError(f"no VOC image set file {list_file} (image_set={image_set!r})")
    ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    images, annotations = [], []
    for n, stem in enumerate(ids, start=1):
        xml_path = root / "Annotations" / f"{stem}.xml"
        try:
            tree = ET.parse(xml_path).getroot()
        except FileNotFoundError:
            raise FileNotFoundError(f"{list_file}: image id {stem!r} has no annotation file {xml_path}") from None
        except ET.ParseError as exc:
            raise ValueError(f"{xml_path}: not valid XML ({exc})") from None
        size = tree.find("size")
        if size is None:
            raise ValueError(f"{xml_path}: missing <size>")
        width, height = int(float(_text(size, "width", str(xml_path)))), int(float(_text(size, "height", str(xml_path))))
        file_name = tree.findtext("filename", default=f"{stem}.jpg").strip()
        images.append({"id": n, "file_name": file_name, "width": width, "height": height})
        for k, obj in enumerate(tree.findall("object")):
            name = _text(obj, "name", f"{xml_path} object #{k}")
            if name not in cat_id:
                raise ValueError(f"{xml_path}: object #{k} has unknown class {name!r}; known: {classes}")
            difficult = int(obj.findtext("difficult", default="0").strip() or 0)
            if difficult and not keep_difficult:
                continue
            bnd = obj.find("bndbox")
            if bnd is None:
                raise ValueError(f"{xml_path}: object #{k} ({name}) has no <bndbox>")
            x0, y0, x1, y1 = (float(_text(bnd, t, f"{xml_path} object #{k}")) for t in ("xmin", "ymin", "xmax", "ymax"))
            w, h = x1 - x0 + 1, y1 - y0 + 1
            annotations.append({"id": len(annotations) + 1, "image_id": n, "category_id": cat_id[name],
                                "bbox": [x0 - 1, y0 - 1, w, h], "area": w * h, "iscrowd": int(bool(difficult))})
    coco = {"info": {"converted_from": "PASCAL VOC", "image_set": image_set},
            "images": images, "annotations": annotations,
            "categories": [{"id": i, "name": c, "supercategory": "voc"} for c, i in cat_id.items()]}
    storage.write_json(out_json, coco, indent=None)
    return coco
