"""`ditkit extract`: a dataset encoded by the VAE into a latent store, torchrun-parallel; an
interrupted extraction resumes when run again with the same settings."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..config import ExtractConfig
from ..parallel import barrier, setup_distributed
from ..utils.devices import loader_workers
from ..utils.vae import VAE_SHORTHANDS, load_vae, vae_factor
from .build import build_dataset
from .latents import STORE_DONE, STORE_FORMAT, STORE_META, STORE_PARTIAL, is_latent_store


def _check_out(out: Path, plan: dict) -> bool:
    """Whether `out` holds an interrupted extraction of this very plan (to resume); raises when
    `out` holds anything else."""
    if (out / STORE_META).exists():
        raise ValueError(f"{out} already holds a finished latent store; pass another --out or delete it.")
    if (out / STORE_PARTIAL).exists():
        if json.loads((out / STORE_PARTIAL).read_text()) != plan:
            raise ValueError(f"{out} holds an unfinished extraction with other settings; run it again with the same settings to finish it, or pass another --out.")
        return True
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder; pass a new folder as --out.")
    return False


def _create_store(out: Path, plan: dict) -> None:
    n, shape = plan["num_images"], (plan["num_images"], 2, *plan["latent_shape"])  # (N, plain/mirror, C, h, w)
    out.mkdir(parents=True, exist_ok=True)
    for name, dtype, size in (("mean", plan["dtype"], shape), ("logvar", plan["dtype"], shape),
                              ("labels", np.int64, (n,)), (STORE_DONE.removesuffix(".npy"), np.uint8, (n,))):  # fmt: skip
        open_memmap(out / f"{name}.npy", mode="w+", dtype=dtype, shape=size).flush()
    # Written last (and atomically): its presence says the arrays above exist, so a rerun may resume into them.
    tmp = out / f".{STORE_PARTIAL}.tmp"
    tmp.write_text(json.dumps(plan, indent=2) + "\n")
    os.replace(tmp, out / STORE_PARTIAL)


@torch.no_grad()
def run_extract(cfg: ExtractConfig) -> Path:
    d = setup_distributed(cfg.device)
    device, rank, world, started = d.device, d.rank, d.world, d.started
    try:  # the group is destroyed however this ends
        out = Path(cfg.out)
        if is_latent_store(Path(cfg.data_path)):
            raise ValueError(f"{cfg.data_path} is already a latent store; pass an image folder or a named dataset.")
        dataset = build_dataset(cfg.data_path, cfg.image_size, channels=3, split=cfg.split, flip=False, on_bad_image=cfg.on_bad_image)  # fmt: skip
        vae = load_vae(cfg.vae, device)
        if vae.config.in_channels != dataset.channels:
            dataset = build_dataset(cfg.data_path, cfg.image_size, channels=vae.config.in_channels, split=cfg.split, flip=False, on_bad_image=cfg.on_bad_image)  # fmt: skip
        factor, size = vae_factor(vae), dataset.image_size
        if size % factor:
            raise ValueError(f"image size {size} is not divisible by the VAE's downsampling factor {factor}; use --image-size {max(factor, size // factor * factor)} or another multiple of {factor}.")
        vae_name = VAE_SHORTHANDS.get(cfg.vae, cfg.vae)
        plan = {
            "format": STORE_FORMAT, "version": 1, "num_images": len(dataset),
            "latent_shape": [vae.config.latent_channels, size // factor, size // factor],
            "num_classes": dataset.num_classes, "class_names": list(dataset.class_names),
            "image_size": size, "image_channels": dataset.channels,
            "vae": str(Path(vae_name).resolve()) if Path(vae_name).exists() else vae_name,
            "scaling_factor": float(vae.config.scaling_factor), "dtype": cfg.dtype,
            "data": str(Path(cfg.data_path).resolve()) if Path(cfg.data_path).exists() else cfg.data_path,
            "split": cfg.split, "contents": "mean.npy, logvar.npy: (N, 2, C, h, w), [:, 0] the image, [:, 1] its mirror; labels.npy: (N,)",
        }  # fmt: skip

        resume = _check_out(out, plan)  # every rank checks before anyone writes
        barrier(d)
        if rank == 0 and not resume:
            _create_store(out, plan)
        barrier(d)
        mean, logvar, labels, done = (np.load(out / f"{name}.npy", mmap_mode="r+") for name in ("mean", "logvar", "labels", "done"))
        n = len(dataset)
        lo, hi = rank * n // world, (rank + 1) * n // world  # this process's contiguous share
        todo = lo + np.flatnonzero(done[lo:hi] == 0)
        if rank == 0 and resume:
            print(f"resuming the extraction in {out}: {int(done.sum())} of {n} images already encoded", flush=True)
        loader = DataLoader(Subset(dataset, todo.tolist()), batch_size=cfg.batch_size, shuffle=False,
                            num_workers=loader_workers(cfg.num_workers), pin_memory=device.type == "cuda")  # fmt: skip
        start, pos = time.perf_counter(), 0
        with tqdm(total=len(todo), unit="img", desc=f"extract ({world} process{'es' * (world > 1)})", disable=rank != 0) as bar:
            for x, y in loader:
                idx = todo[pos : pos + len(x)]
                pos += len(x)
                x = x.to(device, non_blocking=True)  # (B, 3, S, S)
                posterior = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist  # (2B, C, h, w) each
                for array, value in ((mean, posterior.mean), (logvar, posterior.logvar)):
                    array[idx] = value.unflatten(0, (2, len(x))).transpose(0, 1).cpu().numpy()  # (B, 2, C, h, w)
                labels[idx] = y.numpy()
                for array in (mean, logvar, labels):
                    array.flush()
                done[idx] = 1  # only after the latents are on disk
                done.flush()
                bar.update(len(x))
        barrier(d)
        if rank == 0:
            missing = len(done) - int(done.sum())
            if missing:
                raise RuntimeError(f"{missing} images of {out} were not encoded; run the same ditkit extract command again to finish them.")
            os.replace(out / STORE_PARTIAL, out / STORE_META)  # the store is complete from here on
            (out / STORE_DONE).unlink()
            print(f"wrote latent store {out}: {n} images and their mirrors, latents {tuple(plan['latent_shape'])}, "
                  f"in {time.perf_counter() - start:.1f}s")  # fmt: skip
        barrier(d)
    finally:
        if started:
            torch.distributed.destroy_process_group()
    return out
