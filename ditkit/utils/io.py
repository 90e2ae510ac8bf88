"""Files that are never half-written: atomic writes (temporary file, fsync, rename), torch and
safetensors writes that report a full disk, safe .pt reads, .npz writes, and the cache folder."""

from __future__ import annotations

import argparse
import errno
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

TMP_SUFFIX = ".tmp"  # atomic_write's temporaries: .NAME.XXXXXXXX.tmp beside NAME


class NoSpaceError(OSError):
    """The disk filled up during an atomic write; the file it was replacing is untouched."""


def atomic_write(path: str | Path, write) -> None:
    """Call write(tmp_path), fsync it, rename it over `path` and fsync the folder: a crash or a power
    loss leaves the old file or the new one, never half of one. A full disk raises NoSpaceError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
        os.replace(tmp, path)
        _fsync(path.parent)  # the rename itself reaches the disk
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpaceError(f"no space left on {path.parent} while writing {path.name}") from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_temporaries(folder: str | Path, name: str = "*") -> None:
    """Delete what interrupted atomic writes of `folder/name` left behind (.NAME.XXXXXXXX.tmp, each
    as large as the file it was to become)."""
    for tmp in Path(folder).glob(f".{name}.*{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)


class _Writes:
    """A file that keeps the OSError of a failed write: torch.save reports any error of its file's
    writes as RuntimeError("unexpected pos ..."), which would hide a full disk."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def torch_save(obj, path: str | Path) -> None:
    """torch.save through a Python file, so a full disk raises OSError(ENOSPC) (which atomic_write
    turns into NoSpaceError) and not torch's "unexpected pos" RuntimeError."""
    with open(path, "wb") as f:
        writes = _Writes(f)
        try:
            torch.save(obj, writes)
        except RuntimeError:
            if writes.error is not None:
                raise writes.error from None
            raise


def safetensors_save(state: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """safetensors' bytes written through a Python file: its own save_file can miss a write error."""
    with open(path, "wb") as f:
        f.write(safetensors.torch.save(state, metadata=metadata))


def read_pt(path: str | Path) -> dict:
    """torch.load with weights_only=True (no arbitrary object is unpickled); official training
    checkpoints carry an argparse.Namespace, which is allowed."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(
            f"cannot read checkpoint {path}: it is not a PyTorch file of tensors ({type(e).__name__}); "
            "check that the download finished and the path is right."
        ) from None


def read_json(path: str | Path):
    """A JSON file, or one sentence naming it when it is not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); write it again, or export the model again.") from None


def save_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    """np.savez written atomically (tmp + rename): a crash leaves the old file or none."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)

    atomic_write(path, write)
    return Path(path)


def cache_dir(explicit: str | Path | None = None) -> Path:
    """Where reference statistics, dataset files and caption encodings are kept."""
    if explicit is not None:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ditkit"
