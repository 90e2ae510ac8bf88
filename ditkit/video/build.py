"""`build_video_dataset`: the clips a data path names."""

from __future__ import annotations

from pathlib import Path

from ..config import BAD_IMAGE_ACTIONS
from ..data import DitDataset
from .folders import VideoFolderDataset
from .captions import MovingFashionCaptions
from .moving import CANVAS, MovingFashionMNIST

VIDEO_NAMED = ("moving-fashion-mnist",)
CAPTIONED_VIDEO_NAMED = ("moving-fashion-mnist-captions",)


def build_video_dataset(data_path: str | Path, frames: int | None = None, image_size: int | None = None, channels: int | None = None,
                        split: str = "train", flip: bool = True, on_bad_image: str = "skip", seed: int = 0) -> DitDataset:  # fmt: skip
    """A folder of clips (one subfolder per class, or the clips directly in it), or moving-fashion-mnist
    (an existing path of that name wins). frames: per clip (default 16); image_size: a folder's
    frames are center-cropped to it; channels: 1 or 3 (default: 3 for folders, 1 for moving-fashion-mnist)."""
    if on_bad_image not in BAD_IMAGE_ACTIONS:
        raise ValueError(f"on_bad_image {on_bad_image!r} is not one of {', '.join(BAD_IMAGE_ACTIONS)}; pick one of those.")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 (gray) or 3 (RGB), got {channels}.")
    path = Path(data_path)
    if path.is_dir():
        if split != "train":
            raise ValueError(f"--split applies to moving-fashion-mnist only; point the data path at the folder of the {split} clips instead.")
        return VideoFolderDataset(path, frames, image_size, channels or 3, flip=flip, on_bad_image=on_bad_image, seed=seed)
    if path.exists():
        raise ValueError(f"{path} is a file, not a folder; pass a folder of clips (one subfolder per class) or moving-fashion-mnist.")
    if str(data_path) in VIDEO_NAMED:
        if image_size not in (None, CANVAS):
            raise ValueError(f"moving-fashion-mnist clips are {CANVAS}x{CANVAS}; drop --image-size (or pass {CANVAS}).")
        return MovingFashionMNIST(frames, channels or 1, split=split, flip=flip)
    raise FileNotFoundError(f"data path {data_path} does not exist and is not a named video dataset ({', '.join(VIDEO_NAMED)}); "
                            "pass a folder of clips or one of those names.")  # fmt: skip


def build_captioned_video_dataset(data_path: str | Path, frames: int | None = None, image_size: int | None = None, channels: int | None = None,
                                  split: str = "train", flip: bool = True, seed: int = 0) -> MovingFashionCaptions:  # fmt: skip
    """Captioned clips for a text-to-video model: moving-fashion-mnist-captions."""
    if str(data_path) not in CAPTIONED_VIDEO_NAMED:
        raise ValueError(f"a text-to-video model trains on captioned clips, and ditkit has {', '.join(CAPTIONED_VIDEO_NAMED)}; pass --data-path with that.")
    if image_size not in (None, CANVAS):
        raise ValueError(f"moving-fashion-mnist clips are {CANVAS}x{CANVAS}; drop --image-size (or pass {CANVAS}).")
    return MovingFashionCaptions(frames, channels or 1, split=split, flip=flip, seed=seed)
