"""`build_dataset`: the dataset a data path names."""

from __future__ import annotations

from pathlib import Path

from ..config import BAD_IMAGE_ACTIONS, SPLITS
from .base import DitDataset
from .images import ImageFolderDataset
from .latents import LatentDataset, is_latent_store
from .named import NAMED, NamedDataset


def build_dataset(data_path: str | Path, image_size: int | None = None, channels: int | None = None,
                  split: str = "train", flip: bool = True, on_bad_image: str = "skip", seed: int = 0) -> DitDataset:  # fmt: skip
    """The dataset at `data_path`: a latent store, an image folder, or a named dataset (fashion-mnist,
    mnist, digits; an existing path of the same name wins).

    image_size: pixels (default: 256 for folders, the dataset's own for named ones); for a latent
        store, None or the pixel size it was extracted at.
    channels: 3 (RGB) or 1 (gray); default 3 for folders, 1 for named datasets (3 repeats the gray
        channel); for a latent store, None or its latent channel count.
    split: "train" or "test", for named datasets only (mnist and digits: every 10th image is test).
    flip: mirror half the items, chosen by (seed, epoch, index); see `DitDataset.set_epoch`.
    on_bad_image: "skip" (warn and use the next image) or "stop" (raise) on an unreadable file.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}; pick one of those.")
    if on_bad_image not in BAD_IMAGE_ACTIONS:
        raise ValueError(f"on_bad_image {on_bad_image!r} is not one of {', '.join(BAD_IMAGE_ACTIONS)}; pick one of those.")
    if image_size is not None and image_size <= 0:
        raise ValueError(f"image size must be positive, got {image_size}.")
    path = Path(data_path)
    if path.exists() and split != "train":
        raise ValueError(f"--split applies to named datasets only; point the data path at the folder of the {split} images instead.")
    if is_latent_store(path):
        dataset = LatentDataset(path, flip=flip, seed=seed)
        if image_size is not None and image_size != dataset.pixel_size:
            raise ValueError(f"latent store {path} was extracted at {dataset.pixel_size}px, not {image_size}px; use --image-size {dataset.pixel_size} or extract again.")
        if channels is not None and channels != dataset.channels:
            raise ValueError(f"latent store {path} holds {dataset.channels}-channel latents, not {channels} channels; leave the channels unset for latent stores.")
        return dataset
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 (gray) or 3 (RGB), got {channels}.")
    if path.is_dir():
        return ImageFolderDataset(path, image_size, channels or 3, flip=flip, on_bad_image=on_bad_image, seed=seed)
    if path.exists():
        raise ValueError(f"{path} is a file, not a folder; pass a folder of images (one subfolder per class) or a latent store.")
    if str(data_path) in NAMED:
        return NamedDataset(str(data_path), image_size, channels or 1, split=split, flip=flip, seed=seed)
    raise FileNotFoundError(f"data path {data_path} does not exist and is not a named dataset ({', '.join(NAMED)}); pass an image folder, a latent store or one of those names.")
