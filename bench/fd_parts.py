"""Where a sample set's FD-EffNet against the Fashion-MNIST test set lies: its mean term
||mu_s - mu_r||^2 beside the covariance term, pixel statistics beside the real images', and the
distance the same samples would have with faint background values set to zero. The last is a
diagnosis of how much the samples' background noise costs, not a post-process ditkit applies (a
threshold tuned to one dataset's black backgrounds would be a hack).

    python bench/fd_parts.py S.npz [S2.npz ...] [--floor 8] [--real 2000]

The first row is `--real` training images against the test set, the floor every row is read against.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditkit.eval.features import EffNetFeatures, reference_features  # noqa: E402
from ditkit.eval.metrics import FeatureStats, frechet_distance  # noqa: E402
from ditkit.eval.npz import fashion_mnist, read_images, resolve_images  # noqa: E402

HEADER = ("images", "n", "FD-EffNet", "mean term", "covariance term", "pixels = 0", "pixels <= 3", "images reaching 250",
          "FD-EffNet, values < floor set to 0")  # fmt: skip


def stats(net: EffNetFeatures, images: np.ndarray) -> FeatureStats:
    return FeatureStats.fit(np.concatenate([net(images[i : i + 250])["pool"] for i in range(0, len(images), 250)]))


def row(name: str, images: np.ndarray, net: EffNetFeatures, real: FeatureStats, floor: int) -> list[str]:
    s = stats(net, images)
    fd, diff = frechet_distance(real, s), s.mu - real.mu
    floored = np.where(images < floor, 0, images).astype(np.uint8)
    flat = images.reshape(len(images), -1)
    return [name, str(len(images)), f"{fd:.1f}", f"{diff @ diff:.1f}", f"{fd - diff @ diff:.1f}", f"{(flat == 0).mean():.3f}",
            f"{(flat <= 3).mean():.3f}", f"{(flat.max(1) >= 250).mean():.3f}", f"{frechet_distance(real, stats(net, floored)):.1f}"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("samples", nargs="+", help=".npz files of 32x32 grey uint8 samples (ditkit sample-npz)")
    ap.add_argument("--floor", type=int, default=8, help="background values under this are set to 0 for the last column")
    ap.add_argument("--real", type=int, default=2000, help="training images for the real-against-real row")
    args = ap.parse_args()
    net = EffNetFeatures()
    test = fashion_mnist("test")[0]
    real = reference_features(net, read_images(resolve_images("fashion-mnist", "reference"), "reference"))[0]["pool"]  # ditkit eval's cache
    rows = [row(f"{args.real} training images", fashion_mnist("train")[0][: args.real], net, real, args.floor)]
    for path in args.samples:
        shape = read_images(path).shape[1:]
        if shape != test.shape[1:]:
            sys.exit(f"{path} holds images of shape {shape}; this diagnosis is for 32x32 grey Fashion-MNIST samples.")
        images = np.load(path)["arr_0"]
        rows.append(row(path, images, net, real, args.floor))
    print(f"against the {len(test)} test images; test images: pixels = 0 {(test == 0).mean():.3f}, <= 3 {(test <= 3).mean():.3f}, "
          f"reaching 250 {(test.reshape(len(test), -1).max(1) >= 250).mean():.3f}; floor {args.floor}")  # fmt: skip
    print("| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
