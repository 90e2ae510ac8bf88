"""Folders of real clips: one subfolder per class (or the clips directly in the folder: one class),
each clip a GIF, an MP4 (or another container PyAV reads) or a subfolder of its frames."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from ..data import BadImageError, DitDataset, center_crop_arr, to_unit_range
from .io import VIDEO_EXTENSIONS, is_frame_folder, is_video, read_frames
from .moving import FRAMES


def _clips_in(folder: Path) -> tuple[list[Path], list[Path]]:
    """(clips, other subfolders) directly in `folder`, in name order."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    clips = [p for p in entries if is_video(p) or is_frame_folder(p)]
    return clips, [p for p in entries if p.is_dir() and p not in clips]


def scan_clip_folder(root: Path) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
    """(class names, [(clip, label)]) of a folder of class folders of clips, or of clips."""
    clips, subdirs = _clips_in(root)
    kinds = f"{', '.join(VIDEO_EXTENSIONS)} files or folders of frames"
    if clips and subdirs:
        raise ValueError(f"{root} holds both clips and class folders ({subdirs[0].name}, ...); put every clip in a class folder, or move the folders out.")
    if clips:
        return (root.name,), [(p, 0) for p in clips]
    if not subdirs:
        raise ValueError(f"{root} holds no clips ({kinds}); put clips in it, or one subfolder of clips per class.")
    samples = []
    for label, folder in enumerate(subdirs):
        found, _ = _clips_in(folder)
        if not found:
            raise ValueError(f"class folder {folder} holds no clips ({kinds}); add clips to it or remove it.")
        samples += [(p, label) for p in found]
    return tuple(p.name for p in subdirs), samples


class VideoFolderDataset(DitDataset):
    """Real clips as (C, T, S, S) in [-1, 1]: the first `frames` frames of each, every frame
    ADM-center-cropped to `image_size` (default: the first clip's short side), gray or RGB, maybe
    mirrored. A clip that cannot be read or is too short is skipped (with a warning) or stops the run."""

    def __init__(self, root: str | Path, frames: int | None = None, image_size: int | None = None, channels: int = 3,
                 flip: bool = True, on_bad_image: str = "skip", seed: int = 0):  # fmt: skip
        super().__init__(flip, seed)
        self.root = Path(root)
        self.source = str(self.root)
        self.class_names, self.samples = scan_clip_folder(self.root)
        self.num_classes = len(self.class_names)
        self.labels = np.array([label for _, label in self.samples], dtype=np.int64)
        self.frames, self.channels, self.on_bad_image = frames or FRAMES, channels, on_bad_image
        self.mode = {3: "RGB", 1: "L"}[channels]
        self.image_size = image_size or min(read_frames(self.samples[0][0])[0].size)
        self._warned: set[Path] = set()

    def load(self, path: Path) -> torch.Tensor:
        """One clip -> (C, T, S, S) uint8."""
        frames = read_frames(path)
        if len(frames) < self.frames:
            raise ValueError(f"the clip {path} has {len(frames)} frames, fewer than the {self.frames} a sample takes; pass a smaller --frames or remove it.")
        arrays = [np.array(center_crop_arr(f.convert(self.mode), self.image_size)) for f in frames[: self.frames]]
        clip = torch.from_numpy(np.stack(arrays)).reshape(self.frames, self.image_size, self.image_size, -1)  # (T, S, S, C)
        return clip.permute(3, 0, 1, 2).contiguous()

    def _item(self, index: int, rand: int) -> tuple[torch.Tensor, int]:
        for offset in range(len(self)):  # a bad clip is replaced by the next good one
            path, label = self.samples[(index + offset) % len(self)]
            try:
                clip = self.load(path)
            except ValueError as e:
                if self.on_bad_image == "stop":
                    raise BadImageError(f"{e}".removesuffix(".") + " (or pass --on-bad-image skip).") from None
                if path not in self._warned:
                    self._warned.add(path)
                    print(f"skipping a clip: {e}", file=sys.stderr, flush=True)
                continue
            x = to_unit_range(clip)
            return (x.flip(-1) if self._flipped(rand) else x), label
        raise ValueError(f"none of the {len(self)} clips in {self.root} can be read with {self.frames} frames; check the files or pass a smaller --frames.")

    def __repr__(self) -> str:
        return (f"VideoFolderDataset({self.source}: {len(self)} clips, {self.num_classes} classes, "
                f"{self.channels}x{self.frames}x{self.image_size}x{self.image_size})")  # fmt: skip
