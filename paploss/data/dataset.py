"""A torch ``Dataset`` over a validated COCO file, yielding what torchvision detectors take."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from paploss.data.coco import category_index

__all__ = ["CocoDetection", "collate"]


class CocoDetection(torch.utils.data.Dataset):
    """Item ``i``: ``(image float[3, H, W] in [0, 1], target)`` with ``target`` holding
    ``boxes float[n, 4]`` (x0, y0, x1, y1 pixels), ``labels int64[n]`` (contiguous
    0..K-1, in the order of sorted category ids) and ``image_id``.  Crowd boxes are
    left out of training targets (COCO evaluation ignores them).

    ``get(i, hflip=True)`` flips the item horizontally (the engine decides flips from
    a seeded generator, so data order and augmentation are a pure function of the
    seed and the iteration).  Decoded images are cached in memory (``cache=True``):
    the bundled datasets are a few tens of MB."""

    def __init__(self, coco: dict, images_dir: str | os.PathLike, cache: bool = True):
        self.coco = coco
        self.images_dir = Path(images_dir)
        self.images = sorted(coco["images"], key=lambda im: im["id"])
        self.cat_ids, self.label_of = category_index(coco)
        by_image: dict[int, list] = {im["id"]: [] for im in self.images}
        for a in coco["annotations"]:
            if not a.get("iscrowd", 0):
                by_image[a["image_id"]].append(a)
        self._anns = [by_image[im["id"]] for im in self.images]
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def load_image(self, i: int) -> torch.Tensor:
        """``uint8[3, H, W]``."""
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        path = self.images_dir / self.images[i]["file_name"]
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        except FileNotFoundError:
            raise FileNotFoundError(f"missing image file {path} (image id {self.images[i]['id']})") from None
        t = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
        if self._cache is not None:
            self._cache[i] = t
        return t

    def get(self, i: int, hflip: bool = False) -> tuple[torch.Tensor, dict]:
        img = self.load_image(i).float().div_(255.0)
        anns = self._anns[i]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        if hflip:
            W = img.shape[-1]
            img = img.flip(-1)
            boxes = torch.stack([W - boxes[:, 2], boxes[:, 1], W - boxes[:, 0], boxes[:, 3]], dim=1)
        return img, {"boxes": boxes, "labels": labels, "image_id": self.images[i]["id"]}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
        return self.get(i)


def collate(batch: list) -> tuple[list[torch.Tensor], list[dict]]:
    images, targets = zip(*batch)
    return list(images), list(targets)
