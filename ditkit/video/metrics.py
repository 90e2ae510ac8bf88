"""What `ditkit eval` measures of clips beyond their frames: class accuracy per clip and temporal
consistency from per-frame predictions, the motion of the item (its centroid's speed and how that
speed changes, whether it vanishes or splits), and the I3D features of FVD.

Clips are (N, T, H, W, C) uint8. The motion statistics look at the item as the pixels brighter than
FOREGROUND on a black background, as moving-fashion-mnist draws it.

FVD (Unterthiner et al. 2018) is the Fréchet distance of I3D features (Kinetics-400 logits, 400-d)
of whole clips. ditkit reads the TorchScript I3D that StyleGAN-V's FVD and most PyTorch ports use
(`i3d_torchscript.pt`), called as `detector(x, rescale=False, resize=False, return_features=True)`
on (N, 3, T, 224, 224) clips in [-1, 1]: frames bilinearly resized so the short side is 224,
center-cropped, gray repeated to RGB. Like FID's Inception weights, the user brings the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

FOREGROUND = 32  # gray level above which a pixel belongs to the item (of 255)
MIN_PART = 6  # pixels a connected piece of foreground needs to count as a part of the item
I3D_WEIGHTS = "i3d_torchscript.pt"
I3D_SIZE = 224


def majority(preds: np.ndarray) -> np.ndarray:
    """(N, T) per-frame classes -> (N,) each clip's most frequent class (the smallest on a tie)."""
    counts = np.stack([np.bincount(p, minlength=preds.max() + 1) for p in preds])
    return counts.argmax(1)


def clip_accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    """Share of clips whose majority class over frames is their label."""
    return float((majority(preds) == labels).mean())


def temporal_consistency(preds: np.ndarray) -> float:
    """Mean share of a clip's frames that agree with its majority class."""
    return float((preds == majority(preds)[:, None]).mean())


def _gray(clips: np.ndarray) -> np.ndarray:
    return clips.mean(-1) if clips.shape[-1] == 3 else clips[..., 0].astype(np.float64)  # (N, T, H, W)


def centroids(clips: np.ndarray) -> np.ndarray:
    """(N, T, 2) centre of mass (x, y) of each frame's foreground, weighted by brightness above
    FOREGROUND; NaN where a frame has none."""
    w = np.clip(_gray(clips) - FOREGROUND, 0, None)  # (N, T, H, W)
    mass = w.sum((-2, -1))
    ys, xs = np.arange(w.shape[-2]), np.arange(w.shape[-1])
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (w.sum(-2) * xs).sum(-1) / mass
        cy = (w.sum(-1) * ys).sum(-1) / mass
    return np.stack([cx, cy], axis=-1)


def motion_stats(clips: np.ndarray) -> dict[str, float]:
    """The item's motion over a set of clips:
    speed: mean distance its centroid moves per frame (pixels);
    speed change: mean |speed(t + 1) - speed(t)| (pixels per frame, per frame; 0 for constant speed);
    vanished: share of frames whose foreground area is under half its clip's median area;
    split: share of frames whose foreground falls into more than one part of MIN_PART pixels."""
    from scipy import ndimage  # here, not at the top: `ditkit sample` reaches this module and need not load scipy (0.3 s)

    c = centroids(clips)
    speed = np.linalg.norm(np.diff(c, axis=1), axis=-1)  # (N, T - 1)
    area = (_gray(clips) > FOREGROUND).sum((-2, -1))  # (N, T)
    vanished = area < 0.5 * np.median(area, axis=1, keepdims=True)
    eight = np.ones((3, 3), dtype=bool)
    parts = [[(np.bincount(ndimage.label(f > FOREGROUND, eight)[0].ravel())[1:] >= MIN_PART).sum() for f in clip] for clip in _gray(clips)]
    return {
        "speed": float(np.nanmean(speed)),
        "speed change": float(np.nanmean(np.abs(np.diff(speed, axis=1)))),
        "vanished": float(vanished.mean()),
        "split": float((np.array(parts) > 1).mean()),
    }


def load_i3d(path: str | Path, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """The TorchScript I3D of FVD from `path`; a file that is not one is a ValueError saying so."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"I3D weights {path} do not exist; pass --i3d with StyleGAN-V's {I3D_WEIGHTS}.")
    try:
        return torch.jit.load(str(path), map_location=device).eval()
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{path} is not a TorchScript I3D ({str(e).splitlines()[0]}); pass StyleGAN-V's {I3D_WEIGHTS}.") from None


def i3d_input(clips: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, T, H, W, C) uint8 -> (N, 3, T, 224, 224) in [-1, 1]: the short side resized to 224
    (bilinear), center-cropped, gray repeated to RGB."""
    n, t, h, w, c = clips.shape
    x = torch.tensor(clips).to(device).float().div(255)  # (N, T, H, W, C); a copy: .npz arrays are read-only
    x = x.reshape(n * t, h, w, c).permute(0, 3, 1, 2).expand(-1, 3, -1, -1)  # (N T, 3, H, W)
    scale = I3D_SIZE / min(h, w)
    x = F.interpolate(x, size=(max(I3D_SIZE, round(h * scale)), max(I3D_SIZE, round(w * scale))), mode="bilinear", align_corners=False)
    top, left = (x.shape[-2] - I3D_SIZE) // 2, (x.shape[-1] - I3D_SIZE) // 2
    x = x[..., top : top + I3D_SIZE, left : left + I3D_SIZE]
    return (x * 2 - 1).reshape(n, t, 3, I3D_SIZE, I3D_SIZE).transpose(1, 2).contiguous()  # (N, 3, T, 224, 224)


class I3DFeatures:
    """FVD's feature network, as ditkit.eval's feature networks are: clips in, {"logits": (N, 400)} out."""

    name = "i3d"

    def __init__(self, detector: torch.nn.Module, device: torch.device | str = "cpu", dim: int = 400):
        self.detector, self.device = detector.to(device), device
        self.dims = {"logits": dim}  # the Kinetics-400 logits of the real I3D

    @torch.no_grad()
    def __call__(self, clips: np.ndarray) -> dict[str, np.ndarray]:
        out = self.detector(i3d_input(clips, self.device), rescale=False, resize=False, return_features=True)
        return {"logits": out.double().cpu().numpy()}
