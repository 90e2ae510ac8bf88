"""Video: the moving-fashion-mnist generator, folders of real clips, clip files (GIF; MP4 through
PyAV), the video DiT's training task and the video metrics. The network is ditkit.models.video's."""

from .build import VIDEO_NAMED, build_video_dataset
from .folders import VideoFolderDataset, scan_clip_folder
from .io import FPS, VIDEO_EXTENSIONS, gif_bytes, has_av, read_frames, save_clip_grid, write_clip, write_gif, write_mp4
from .moving import CANVAS, FRAMES, ITEM, SPEED, MovingFashionMNIST, moving_clips, render, trajectory

__all__ = ["VIDEO_NAMED", "build_video_dataset", "VideoFolderDataset", "scan_clip_folder", "FPS", "VIDEO_EXTENSIONS", "gif_bytes",
           "has_av", "read_frames", "save_clip_grid", "write_clip", "write_gif", "write_mp4", "CANVAS", "FRAMES", "ITEM", "SPEED",
           "MovingFashionMNIST", "moving_clips", "render", "trajectory"]  # fmt: skip
