"""Where checkpoints live: run folders (RESULTS_DIR/NNN-MODEL/checkpoints/NNNNNNN.pt), ditkit model
folders (model.safetensors + config.json), the bundled models, and how a --ckpt or --resume value
names one of them. Only the file system is looked at here; reading the files is the formats' job."""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path
from typing import IO

WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"  # a ditkit model folder
CKPT_RE = re.compile(r"^(\d{7})\.pt$")
RUN_RE = re.compile(r"^(\d{3,})-.")  # a run folder: RESULTS_DIR/NNN-MODEL

ASSETS = Path(__file__).parent.parent / "assets"
BUNDLED = ASSETS / "fashion-mnist"
BUNDLED_NAME = "bundled"  # what --ckpt calls it; the other bundled models go by their folder names
BUNDLED_TEXT = ASSETS / "fashion-mnist-text"  # the default when prompts are given
# The official releases the README names, by file name: what each is and where it is downloaded once.
OFFICIAL_DOWNLOADS = {
    "DiT-XL-2-256x256.pt": ("the official DiT-XL/2 256x256 checkpoint", "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"),
    "DiT-XL-2-512x512.pt": ("the official DiT-XL/2 512x512 checkpoint", "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt"),
    "SiT-XL-2-256x256.pt": ("the official SiT-XL/2 256x256 checkpoint", "the release of the SiT repository (github.com/willisma/SiT)"),
    **{f"{name}.pth": (f"the official U-ViT {what}", "the U-ViT release (the table of github.com/baofff/U-ViT's README)") for name, what in (
        ("cifar10_uvit_small", "CIFAR-10 U-ViT-S/2"), ("celeba64_uvit_small", "CelebA 64 U-ViT-S/4"),
        ("imagenet64_uvit_mid", "ImageNet 64 U-ViT-M/4"), ("imagenet64_uvit_large", "ImageNet 64 U-ViT-L/4"),
        ("imagenet256_uvit_large", "ImageNet 256 U-ViT-L/2"), ("imagenet256_uvit_huge", "ImageNet 256 U-ViT-H/2"),
        ("imagenet512_uvit_large", "ImageNet 512 U-ViT-L/4"), ("imagenet512_uvit_huge", "ImageNet 512 U-ViT-H/4"))},
}  # fmt: skip
LOCK_NAME = ".lock"  # in a run folder: locked (flock) by the process training it


def checkpoint_steps(folder: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in folder.glob("*.pt") if (m := CKPT_RE.match(p.name)))


def prune_checkpoints(folder: Path, keep_last: int, keep_every: int | None) -> None:
    steps = checkpoint_steps(folder)
    for s in steps[:-keep_last]:
        if not (keep_every and s % keep_every == 0):
            (folder / f"{s:07d}.pt").unlink(missing_ok=True)


def run_folders(results_dir: Path) -> list[Path]:
    """The run folders (NNN-MODEL) under `results_dir`, oldest (lowest NNN) first."""
    if not results_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in results_dir.iterdir() if (m := RUN_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def create_run_dir(results_dir: Path, name: str) -> Path:
    """results_dir/NNN-name/checkpoints, NNN one past the highest index there, the run folder made
    exclusively: a new run never writes into an existing folder, not even one that a run started
    at the same instant has just made."""
    results_dir.mkdir(parents=True, exist_ok=True)
    while True:
        taken = [int(m.group(1)) for p in results_dir.iterdir() if (m := RUN_RE.match(p.name))]
        path = results_dir / f"{max(taken, default=-1) + 1:03d}-{name}"
        try:
            path.mkdir()
        except FileExistsError:
            continue  # another run took this index after the scan: scan again
        (path / "checkpoints").mkdir()
        return path


def lock_run(folder: Path) -> IO:
    """An advisory lock (flock) on folder/.lock, held until the returned file is closed: one process
    at a time trains a run, so a second resume of a running run is refused here, in one sentence,
    before it writes anything. The kernel drops the lock when its process dies, even by kill -9."""
    f = open(Path(folder) / LOCK_NAME, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip()
        f.close()
        raise RuntimeError(f"{folder} is in use: another process{f' ({pid})' if pid.isdigit() else ''} is training this run; "
                           "wait for it to end (or stop it) before resuming the run.") from None  # fmt: skip
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def is_run_checkpoint(path: Path) -> bool:
    """Whether `path` is RESULTS_DIR/NNN-MODEL/checkpoints/NNNNNNN.pt, inside the run that wrote it."""
    return bool(CKPT_RE.match(path.name)) and path.parent.name == "checkpoints" and bool(RUN_RE.match(path.parent.parent.name))


def latest_checkpoint(results_dir: Path) -> Path | None:
    """The newest checkpoint of the newest run under `results_dir` that has one."""
    for run in reversed(run_folders(results_dir)):
        steps = checkpoint_steps(run / "checkpoints")
        if steps:
            return run / "checkpoints" / f"{steps[-1]:07d}.pt"
    return None


def resume_checkpoint(resume: str, results_dir: Path) -> Path:
    """The checkpoint --resume names: 'latest' (under results_dir), a run folder (its newest) or a file."""
    if resume == "latest":
        found = latest_checkpoint(results_dir)
        if found is None:
            raise FileNotFoundError(f"no checkpoint to resume under {results_dir}; train without --resume first.")
        return found
    path = Path(resume)
    if path.is_dir():
        steps = checkpoint_steps(path / "checkpoints")
        if not steps:
            raise FileNotFoundError(f"{path} holds no checkpoints/NNNNNNN.pt; pass a run folder of ditkit train, a checkpoint or 'latest'.")
        return path / "checkpoints" / f"{steps[-1]:07d}.pt"
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} to resume from does not exist; pass a checkpoint, a run folder or 'latest'.")
    return path


def bundled_model(name: str) -> Path | None:
    """The bundled model a name means ("bundled", or an assets folder name such as
    fashion-mnist-turbo), or None; callers look for a path of that name first."""
    if name == BUNDLED_NAME:
        return BUNDLED
    return ASSETS / name if "/" not in name and (ASSETS / name / WEIGHTS_NAME).exists() else None


def check_official_download(path: str | Path) -> None:
    """The one sentence for an official checkpoint that is not there: where to download it."""
    path = Path(path)
    if path.name in OFFICIAL_DOWNLOADS and not path.exists():
        what, where = OFFICIAL_DOWNLOADS[path.name]
        raise FileNotFoundError(f"{path} does not exist: {what} is downloaded once from {where}; pass the path of the downloaded file.")


def find_checkpoint(ckpt: str | None, bundled: Path = BUNDLED) -> Path:
    """The checkpoint `--ckpt` names, as read_checkpoint takes it: a .pt or .safetensors file, a
    model folder, a run folder (RESULTS/NNN-MODEL: its model/, else its newest checkpoint) or its
    checkpoints/ folder; None (or "bundled") is the bundled model (`bundled`: the class-conditional
    one, or the text-to-image one), and a bundled model's folder name (fashion-mnist-turbo, ...)
    names it unless a path of that name exists."""
    if ckpt is None or (ckpt == BUNDLED_NAME and not Path(ckpt).exists()):
        if not (bundled / WEIGHTS_NAME).exists():
            raise FileNotFoundError(f"this install has no bundled model at {bundled}; pass --ckpt with a checkpoint.")
        return bundled
    path = Path(ckpt).expanduser()
    if not path.exists() and bundled_model(ckpt) is not None:
        return bundled_model(ckpt)
    if not path.exists():
        check_official_download(path)
        names = ", ".join(sorted(d.name for d in ASSETS.iterdir() if (d / WEIGHTS_NAME).exists()))
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a .pt file, a ditkit model folder, a run folder (RESULTS/NNN-MODEL) or a bundled model ({names}).")
    if not path.is_dir() or (path / WEIGHTS_NAME).exists():
        return path
    if (path / "model" / WEIGHTS_NAME).exists():
        return path / "model"
    for folder in (path / "checkpoints", path):
        steps = checkpoint_steps(folder)
        if steps:
            return folder / f"{steps[-1]:07d}.pt"
    raise FileNotFoundError(f"{path} holds no {WEIGHTS_NAME}, model/ or checkpoints/*.pt; point --ckpt at a .pt file, a ditkit model folder or a run folder (RESULTS/NNN-MODEL).")
