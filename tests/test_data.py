"""Datasets and `ditkit extract`: named datasets, image folders and the official preprocessing,
bad files, deterministic flips, latent stores against a direct VAE encode, resume, 2 processes."""

import gzip
import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_vae
from PIL import Image
from torch.utils.data import DataLoader

import ditkit.data as data
from ditkit.data import named
from ditkit.cli import main
from ditkit.data import LatentDataset, build_dataset, item_seed


def reference_transform(path, image_size, flip):
    """The official train.py's pipeline: ImageFolder's RGB loader, center_crop_arr (ditkit's, which
    test_center_crop_matches_the_official_algorithm holds to the official one), RandomHorizontalFlip,
    ToTensor, Normalize(0.5, 0.5)."""
    arr = np.array(data.center_crop_arr(Image.open(path).convert("RGB"), image_size))
    if flip:
        arr = arr[:, ::-1]
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255)
    return (x - 0.5) / 0.5


def random_image(rng, size, mode="RGB"):
    w, h = size
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return img.convert(mode) if mode != "P" else img.quantize(16)


@pytest.fixture
def class_folder(tmp_path):
    """dog/ then cat/ (sorted: cat = 0, dog = 1), images of several sizes and modes, one bad file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    (root / "dog" / "nested").mkdir(parents=True)
    (root / "cat").mkdir()
    random_image(rng, (40, 30)).save(root / "dog" / "a.png")
    random_image(rng, (33, 70), "L").save(root / "dog" / "nested" / "b.jpg")
    random_image(rng, (24, 24), "RGBA").save(root / "cat" / "a.png")
    (root / "cat" / "b.png").write_bytes(b"not an image at all")
    random_image(rng, (100, 61), "P").save(root / "cat" / "c.png")
    (root / "cat" / "notes.txt").write_text("ignored: not an image extension")
    return root


def test_center_crop_matches_the_official_algorithm():
    """ditkit's crop against what the official train.py's center_crop_arr returned for the same
    images (tests/reference/center_crop_official.npz, made by running the official function)."""
    expected = np.load(Path(__file__).parent / "reference" / "center_crop_official.npz")
    rng = np.random.default_rng(20261206)
    # 517x300 -> two BOX halvings (min side 300 >= 128, 150 >= 128) -> bicubic to short side 64 -> crop.
    for k, (size, mode) in enumerate((((517, 300), "RGB"), ((63, 90), "RGB"), ((64, 64), "RGB"), ((301, 150), "L"), ((129, 257), "RGB"))):
        arr = rng.integers(0, 256, size=(size[1], size[0], 3) if mode == "RGB" else (size[1], size[0]), dtype=np.uint8)
        assert hashlib.sha256(arr.tobytes()).digest() == expected[f"sha256_{k}"].tobytes(), "the fixture's input image"
        got = np.array(data.center_crop_arr(Image.fromarray(arr, mode), 64))
        np.testing.assert_array_equal(got, expected[f"crop_{k}"])


def test_class_folder_matches_the_official_pipeline(class_folder):
    ds = build_dataset(class_folder, image_size=16, flip=True, seed=3)
    assert ds.class_names == ("cat", "dog") and ds.num_classes == 2 and ds.channels == 3 and ds.image_size == 16
    names = [os.path.relpath(p, class_folder) for p, _ in ds.samples]
    assert names == ["cat/a.png", "cat/b.png", "cat/c.png", "dog/a.png", "dog/nested/b.jpg"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1] and ds.labels.dtype == np.int64
    flips = []
    for i in (0, 2, 3, 4):
        x, y = ds[i]
        assert x.dtype == torch.float32 and x.shape == (3, 16, 16) and y == ds.labels[i]
        plain, mirrored = (reference_transform(ds.samples[i][0], 16, flip) for flip in (False, True))
        assert not torch.equal(plain, mirrored)
        assert torch.equal(x, plain) or torch.equal(x, mirrored), "the official pipeline's item, mirrored or not"
        flips.append(torch.equal(x, mirrored))
    assert any(flips) and not all(flips), "seed 3 should flip some of these items and not others"
    assert [torch.equal(ds[i][0], ds[i][0]) for i in (0, 2, 3, 4)] == [True] * 4, "the same item twice: the same flip"


def test_gray_folder(class_folder):
    ds = build_dataset(class_folder, image_size=8, channels=1, flip=False)
    x, _ = ds[0]
    assert x.shape == (1, 8, 8)
    gray = np.array(data.center_crop_arr(Image.open(ds.samples[0][0]).convert("L"), 8))
    torch.testing.assert_close(x[0], torch.from_numpy(gray).float() / 127.5 - 1)


def test_bad_image_skip_reports_once_on_stderr_and_uses_the_next(class_folder, capfd):
    ds = build_dataset(class_folder, image_size=8, flip=False, on_bad_image="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PYTHONWARNINGS=ignore must not hide it
        x, y = ds[1]
    assert capfd.readouterr().err.startswith(f"skipping unreadable image {class_folder / 'cat' / 'b.png'} (UnidentifiedImageError")
    next_x, next_y = ds[2]
    assert torch.equal(x, next_x) and y == next_y
    batches = [b for _ in range(2) for b in DataLoader(ds, batch_size=2)]  # two epochs, no crash
    assert sum(len(b[1]) for b in batches) == 2 * len(ds)
    assert capfd.readouterr().err == "", "a bad file is reported once per process, not once per read"
    fresh = build_dataset(class_folder, image_size=8, on_bad_image="skip")
    list(DataLoader(fresh, batch_size=2, num_workers=1))  # a worker process reports on the same stderr
    assert "cat/b.png" in capfd.readouterr().err


def test_bad_image_stop_names_the_file(class_folder, tmp_path, capsys):
    ds = build_dataset(class_folder, image_size=8, on_bad_image="stop")
    expected = f"cannot read image {class_folder / 'cat' / 'b.png'} (UnidentifiedImageError: "
    with pytest.raises(ValueError, match=r"cat/b\.png.*remove the file or pass --on-bad-image skip"):
        ds[1]
    # From a DataLoader worker too: the sentence, not "Caught ValueError in DataLoader worker process 0".
    with pytest.raises(ValueError) as e:
        list(DataLoader(ds, batch_size=5, num_workers=1))
    assert str(e.value).startswith(expected) and "\n" not in str(e.value)
    args = ["train", "--data-path", str(class_folder), "--image-size", "8", "--model", "DiT-S/2", "--depth", "1", "--hidden-size", "32",
            "--num-heads", "2", "--global-batch-size", "5", "--max-steps", "1", "--num-workers", "1", "--on-bad-image", "stop",
            "--results-dir", str(tmp_path / "r")]  # fmt: skip
    assert main(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"ditkit train: error: {expected}")
    # a truncated file is bad too
    path = class_folder / "dog" / "a.png"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"dog/a\.png"):
        ds[3]


def test_unconditional_folder(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "faces"
    root.mkdir()
    for i in range(3):
        random_image(rng, (20 + i, 18)).save(root / f"{i}.png")
    ds = build_dataset(root, image_size=8)
    assert (len(ds), ds.num_classes, ds.class_names) == (3, 1, ("faces",))
    assert [ds[i][1] for i in range(3)] == [0, 0, 0]
    assert len(list(ds)) == 3  # iteration stops: out-of-range indices raise IndexError


def test_bad_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        build_dataset(tmp_path / "empty")
    (tmp_path / "mixed" / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "mixed" / "x.png")
    with pytest.raises(ValueError, match="both images and subfolders"):
        build_dataset(tmp_path / "mixed")
    (tmp_path / "classes" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="class folder .*a holds no images"):
        build_dataset(tmp_path / "classes")
    with pytest.raises(FileNotFoundError, match="not a named dataset"):
        build_dataset("fashion_mnist")
    with pytest.raises(ValueError, match="split"):
        build_dataset("digits", split="val")


def test_fashion_mnist():
    root = data.FASHION_MNIST_DIR
    if not (root / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("dataset-fashion-mnist is not installed")
    ds = build_dataset("fashion-mnist", flip=False)
    assert (len(ds), ds.num_classes, ds.image_size, ds.channels) == (60000, 10, 32, 1)
    assert ds.class_names[9] == "Ankle boot"
    with gzip.open(root / "train-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read(16 + 3 * 784), np.uint8, offset=16).reshape(3, 28, 28).copy()
    with gzip.open(root / "train-labels-idx1-ubyte.gz") as f:
        raw_labels = np.frombuffer(f.read(8 + 3), np.uint8, offset=8)
    for i in range(3):
        x, y = ds[i]
        assert x.dtype == torch.float32 and x.shape == (1, 32, 32) and y == raw_labels[i]
        assert x.min() >= -1 and x.max() <= 1
        border = torch.ones(32, 32, dtype=torch.bool)
        border[2:30, 2:30] = False
        assert (x[0][border] == -1).all(), "padded with black"
        torch.testing.assert_close(x[0, 2:30, 2:30], torch.from_numpy(raw[i]).float() / 127.5 - 1)
    assert np.bincount(ds.labels).tolist() == [6000] * 10
    test = build_dataset("fashion-mnist", split="test", image_size=28)
    assert len(test) == 10000 and np.bincount(test.labels).tolist() == [1000] * 10
    assert test[0][0].shape == (1, 28, 28)


def test_missing_fashion_mnist_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(named, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        build_dataset("fashion-mnist")


def test_digits_sizes_channels_and_split():
    from sklearn.datasets import load_digits

    raw = load_digits()
    ds = build_dataset("digits", flip=False)
    test = build_dataset("digits", split="test", flip=False)
    assert (len(ds), len(test), ds.image_size, ds.channels) == (1618, 179, 8, 1)
    x, y = ds[0]
    torch.testing.assert_close(x[0], torch.from_numpy(raw.images[0]).float() / 8 - 1)
    assert y == raw.target[0] and test[0][1] == raw.target[9]
    # Other sizes resize (bilinear, antialiased: PIL's BILINEAR on the float image is the reference).
    for size, channels in ((16, 3), (5, 1)):
        xs, _ = build_dataset("digits", image_size=size, channels=channels, flip=False)[0]
        assert xs.shape == (channels, size, size) and torch.equal(xs[0], xs[-1])
        ref = Image.fromarray(x[0].numpy(), mode="F").resize((size, size), Image.BILINEAR)
        torch.testing.assert_close(xs[0], torch.from_numpy(np.array(ref)), rtol=0, atol=1e-6)


def test_flips_are_a_function_of_seed_epoch_index():
    ds = build_dataset("digits", flip=True, seed=7)
    plain = build_dataset("digits", flip=False)
    n = 200

    def flipped():
        out = []
        for i in range(n):
            x, p = ds[i][0], plain[i][0]
            assert torch.equal(x, p) or torch.equal(x, p.flip(-1))
            out.append(not torch.equal(x, p))
        return out

    epoch0 = flipped()
    assert 0.35 < np.mean(epoch0) < 0.65
    ds.set_epoch(1)
    epoch1 = flipped()
    assert epoch1 != epoch0
    ds.set_epoch(0)
    assert flipped() == epoch0
    # workers do not matter: the same batches with 0 and 2 worker processes
    a = torch.cat([x for x, _ in DataLoader(ds, batch_size=50, num_workers=0)])
    b = torch.cat([x for x, _ in DataLoader(ds, batch_size=50, num_workers=2)])
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# ditkit extract


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random AutoencoderKL (factor 2) saved to a folder, and 5 images in 2 classes."""
    root = tmp_path_factory.mktemp("extract")
    torch.manual_seed(0)
    vae = tiny_vae(root / "vae").eval()
    rng = np.random.default_rng(3)
    for i, (cls, size) in enumerate([("a", (20, 24)), ("a", (16, 16)), ("b", (40, 17)), ("b", (30, 30)), ("b", (17, 33))]):
        (root / "images" / cls).mkdir(parents=True, exist_ok=True)
        random_image(rng, size).save(root / "images" / cls / f"{i}.png")
    out = root / "store"
    args = ["extract", "--data-path", str(root / "images"), "--vae", str(root / "vae"), "--image-size", "16",
            "--batch-size", "2", "--num-workers", "0", "--device", "cpu"]  # fmt: skip
    assert main([*args, "--out", str(out)]) == 0
    return dict(root=root, vae=vae, out=out, args=args)


def load_store(out):
    return {name: np.load(out / f"{name}.npy") for name in ("mean", "logvar", "labels")}


def test_extract_store_equals_a_direct_vae_encode(tiny):
    out, vae = tiny["out"], tiny["vae"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_images"] == 5 and meta["latent_shape"] == [4, 8, 8] and meta["image_size"] == 16
    assert meta["class_names"] == ["a", "b"] and meta["num_classes"] == 2 and meta["dtype"] == "float32"
    assert meta["scaling_factor"] == vae.config.scaling_factor
    assert sorted(p.name for p in out.iterdir()) == ["labels.npy", "logvar.npy", "mean.npy", "meta.json"]
    images = build_dataset(tiny["root"] / "images", image_size=16, flip=False)
    x = torch.stack([images[i][0] for i in range(5)])  # (5, 3, 16, 16)
    store = load_store(out)
    assert store["labels"].tolist() == [0, 0, 1, 1, 1]
    with torch.no_grad():
        for mirror, batch in ((0, x), (1, x.flip(-1))):
            posterior = vae.encode(batch).latent_dist
            torch.testing.assert_close(torch.from_numpy(store["mean"][:, mirror]), posterior.mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(torch.from_numpy(store["logvar"][:, mirror]), posterior.logvar, rtol=1e-5, atol=1e-6)


def test_latent_dataset_samples_the_stored_posterior(tiny):
    out = tiny["out"]
    store = load_store(out)
    for flip in (False, True):
        ds = build_dataset(out, flip=flip, seed=5)
        assert isinstance(ds, LatentDataset)
        assert (len(ds), ds.channels, ds.image_size, ds.num_classes, ds.pixel_size) == (5, 4, 8, 2, 16)
        assert ds.vae == str(Path(tiny["root"] / "vae").resolve()) and ds.scaling_factor == tiny["vae"].config.scaling_factor
        mirrors = []
        for i in range(5):
            z, y = ds[i]
            rand = item_seed(5, 0, i)
            mirror = int(flip and rand & 1)
            mirrors.append(mirror)
            mean, logvar = (torch.from_numpy(store[k][i, mirror]) for k in ("mean", "logvar"))
            noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(rand >> 1))
            assert z.dtype == torch.float32 and z.shape == (4, 8, 8) and y == store["labels"][i]
            torch.testing.assert_close(z, (mean + torch.exp(0.5 * logvar) * noise) * ds.scaling_factor, rtol=0, atol=0)
            assert not torch.equal(z, mean * ds.scaling_factor), "a sample, not the mean"
        assert any(mirrors) == flip
    ds = build_dataset(out)
    first = ds[0][0]
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0], first), "a new epoch draws a new sample"
    with pytest.raises(ValueError, match="extracted at 16px"):
        build_dataset(out, image_size=32)


def test_extract_refuses_to_overwrite_and_resumes(tiny, tmp_path, capsys):
    args = tiny["args"]
    assert main([*args, "--out", str(tiny["out"])]) == 2
    assert "already holds a finished latent store" in capsys.readouterr().err
    # An interrupted run: the same store with meta.json not yet written and rows 1 and 3 not done.
    import shutil

    out = tmp_path / "partial"
    shutil.copytree(tiny["out"], out)
    os.replace(out / "meta.json", out / "meta.partial.json")
    done = np.lib.format.open_memmap(out / "done.npy", mode="w+", dtype=np.uint8, shape=(5,))
    done[:] = [1, 0, 1, 0, 1]
    done.flush()
    mean = np.load(out / "mean.npy", mmap_mode="r+")
    mean[[1, 3]] = 0
    mean[2] = 7  # marked done: must be kept, not recomputed
    mean.flush()
    with pytest.raises(ValueError, match="unfinished latent store"):
        build_dataset(out)
    assert main([*args, "--image-size", "8", "--out", str(out)]) == 2
    assert "unfinished extraction with other settings" in capsys.readouterr().err
    assert main([*args, "--out", str(out)]) == 0
    assert "resuming" in capsys.readouterr().out
    expected, got = load_store(tiny["out"]), load_store(out)
    expected["mean"][2] = 7
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])
    assert not (out / "done.npy").exists() and (out / "meta.json").exists()


def test_extract_bad_input(tiny, tmp_path, capsys):
    args = tiny["args"]
    assert main([*args, "--image-size", "15", "--out", str(tmp_path / "o")]) == 2
    assert "not divisible by the VAE's downsampling factor 2" in capsys.readouterr().err
    bad = [a if a != str(tiny["root"] / "images") else str(tmp_path / "nowhere") for a in args]
    assert main([*bad, "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["extract", "--vae", str(tiny["root"] / "vae")]) == 2
    assert "pass --data-path" in capsys.readouterr().err
    assert main([*args, "--data-path", str(tiny["out"]), "--out", str(tmp_path / "o")]) == 2
    assert "already a latent store" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_extract_two_processes_equals_one(tiny, tmp_path):
    out = tmp_path / "store2"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ditkit", *tiny["args"], "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "meta.json").read_text()) == json.loads((tiny["out"] / "meta.json").read_text())
    one, two = load_store(tiny["out"]), load_store(out)
    np.testing.assert_array_equal(two["labels"], one["labels"])
    for k in ("mean", "logvar"):
        np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-6)
