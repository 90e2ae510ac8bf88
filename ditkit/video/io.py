"""Clips as files: animated GIFs (Pillow), MP4 and the other containers FFmpeg reads (PyAV, where
installed), and folders of frames. A clip in memory is (T, H, W, C) uint8, C = 1 or 3."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence

from ..data import is_image
from ..utils.images import make_grid
from ..utils.io import atomic_write

GIF_EXTENSIONS = (".gif",)
AV_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")  # read through PyAV
VIDEO_EXTENSIONS = GIF_EXTENSIONS + AV_EXTENSIONS
FPS = 8  # frames per second of the files ditkit writes
AV_HINT = "PyAV is not installed; pip install av (or ditkit[video])"


def has_av() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def is_video(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS


def is_frame_folder(path: Path) -> bool:
    """A folder of one clip's frames: image files, and no clips or folders."""
    entries = [p for p in path.iterdir() if not p.name.startswith(".")] if path.is_dir() else []
    return bool(entries) and all(p.is_file() and is_image(p.name) for p in entries)


def read_frames(path: str | Path) -> list[Image.Image]:
    """Every frame of a clip file (GIF; MP4 and the like through PyAV) or a folder of frames (in
    name order), as PIL images; an unreadable clip is a ValueError naming it."""
    path = Path(path)
    try:
        if path.is_dir():
            return [Image.open(p).copy() for p in sorted(path.iterdir()) if is_image(p.name)]
        if path.suffix.lower() in GIF_EXTENSIONS:
            with Image.open(path) as im:
                return [frame.convert("RGB") for frame in ImageSequence.Iterator(im)]
        if not has_av():
            raise ValueError(f"{path} needs PyAV to be read: {AV_HINT}.")
        import av

        with av.open(str(path)) as container:
            return [frame.to_image() for frame in container.decode(video=0)]
    except ValueError:
        raise
    except Exception as e:  # PIL, PyAV and OS errors alike: a clip that cannot be decoded
        raise ValueError(f"cannot read the clip {path} ({type(e).__name__}: {e}); replace or remove it.") from None


def _pil(frame: np.ndarray) -> Image.Image:
    return Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame)


def gif_bytes(clip: np.ndarray, fps: int = FPS) -> bytes:
    """(T, H, W, C) uint8 -> an animated GIF that loops."""
    frames = [_pil(f) for f in clip]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0, optimize=False)
    return buffer.getvalue()


def write_gif(clip: np.ndarray, path: str | Path, fps: int = FPS) -> Path:
    data = gif_bytes(clip, fps)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return Path(path)


def write_mp4(clip: np.ndarray, path: str | Path, fps: int = FPS) -> Path:
    """(T, H, W, C) uint8 -> H.264 MP4 through PyAV (yuv420p, so odd sides get a black edge)."""
    if not has_av():
        raise ValueError(f"writing {path} needs PyAV: {AV_HINT}.")
    import av

    t, h, w, c = clip.shape
    clip = np.pad(clip, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    rgb = np.repeat(clip, 3, axis=-1) if c == 1 else clip

    def write(tmp: str) -> None:
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = rgb.shape[2], rgb.shape[1], "yuv420p"
            stream.options = {"crf": "18"}
            for frame in rgb:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
            container.mux(stream.encode())  # flush the encoder

    atomic_write(path, write)
    return Path(path)


def write_clip(clip: np.ndarray, path: str | Path, fps: int = FPS) -> Path:
    """One clip to a .gif, or an .mp4 through PyAV, by the path's suffix."""
    suffix = Path(path).suffix.lower()
    if suffix == ".gif":
        return write_gif(clip, path, fps)
    if suffix == ".mp4":
        return write_mp4(clip, path, fps)
    raise ValueError(f"ditkit writes clips as .gif or .mp4, not {suffix or 'a file without a suffix'}; name the output NAME.gif or NAME.mp4.")


def save_clip_grid(clips: np.ndarray, path: str | Path, ncol: int, fps: int = FPS, mp4: bool = True, frames: bool = False) -> list[Path]:
    """(N, T, H, W, C) uint8 -> the clips tiled `ncol` to a row, animated: PATH (.gif or .mp4), with
    `mp4` an MP4 beside a GIF where PyAV is installed, with `frames` each frame of the grid as
    PATH-frames/NN.png. Returns the files written."""
    path = Path(path)
    grid = make_grid(clips, ncol)  # (T, rows, columns, C)
    written = [write_clip(grid, path, fps)]
    if mp4 and path.suffix.lower() == ".gif" and has_av():
        written.append(write_mp4(grid, path.with_suffix(".mp4"), fps))
    if frames:
        folder = path.with_name(f"{path.stem}-frames")
        folder.mkdir(parents=True, exist_ok=True)
        for t, frame in enumerate(grid):
            _pil(frame).save(folder / f"{t:02d}.png")
        written.append(folder)
    return written
