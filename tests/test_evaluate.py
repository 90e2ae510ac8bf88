"""`ditkit sample-npz` and `ditkit eval`: the metrics against direct numpy/scipy computations of
ADM's definitions, the networks' layouts, caching, and bad input. Tiny networks, few images."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import free_port, rel
from scipy import linalg
from scipy.special import softmax

import ditkit
from ditkit import config, pipeline
from ditkit.checkpoints import save_pretrained
from ditkit.cli import main
from ditkit.eval import classifier, evaluate, features, metrics, npz


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """No test reads or writes the user's caches (Inception weights, reference statistics)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def random_features(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + shift


# --- Fréchet distance ------------------------------------------------------------------------


def test_frechet_matches_scipy_directly():
    a, b = random_features(300, 6, 0), random_features(250, 6, 1, shift=0.3)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    direct = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    fd = metrics.frechet_distance(metrics.FeatureStats.fit(a), metrics.FeatureStats.fit(b))
    assert fd > 1.0
    assert fd == pytest.approx(direct, rel=1e-9)
    few = metrics.FeatureStats.fit(a[:4])  # 4 points in 6-d: a singular covariance, as with too few samples
    root = linalg.sqrtm(few.sigma @ s2)
    assert np.isfinite(root).all()
    direct = ((few.mu - mu2) ** 2).sum() + np.trace(few.sigma + s2) - 2 * np.trace(root).real
    assert metrics.frechet_distance(few, metrics.FeatureStats.fit(b)) == pytest.approx(direct, rel=1e-6)


def test_frechet_closed_form_and_identity():
    # Diagonal covariances commute: FD = |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2.
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    a = metrics.FeatureStats(np.zeros(3), np.diag(v1))
    b = metrics.FeatureStats(np.array([1.0, 0.0, 2.0]), np.diag(v2))
    assert metrics.frechet_distance(a, b) == pytest.approx(5.0 + 4.0 + 1.0, rel=1e-12)
    same = metrics.FeatureStats.fit(random_features(100, 5, 2))
    assert abs(metrics.frechet_distance(same, same)) < 1e-9 * np.trace(same.sigma)


# --- Inception Score -------------------------------------------------------------------------


def adm_inception_score(logits, split_size):
    """guided-diffusion's compute_inception_score, written out on softmax probabilities."""
    preds = softmax(logits.astype(np.float64), axis=1)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def test_inception_score_known_values():
    assert metrics.inception_score(np.zeros((40, 1008))) == pytest.approx(1.0)  # no confidence, no diversity
    confident = np.full((40, 10), -50.0)
    confident[np.arange(40), np.arange(40) % 8] = 50.0  # sure of each, 8 classes equally often
    assert metrics.inception_score(confident, split_size=40) == pytest.approx(8.0, rel=1e-9)
    logits = np.random.default_rng(0).normal(scale=3.0, size=(23, 12))
    assert metrics.inception_score(logits, split_size=10) == pytest.approx(adm_inception_score(logits, 10), rel=1e-10)
    assert metrics.inception_score(logits, split_size=10) != pytest.approx(metrics.inception_score(logits, split_size=23))


# --- precision / recall ----------------------------------------------------------------------


def brute_precision_recall(ref, samples, k):
    d = ((ref[:, None, :] - samples[None, :, :]) ** 2).sum(-1)  # (refs, samples), squared as ADM
    radius = lambda x: np.sort(((x[:, None] - x[None]) ** 2).sum(-1), axis=1)[:, k]  # noqa: E731
    r_ref, r_s = radius(ref), radius(samples)
    precision = (d <= r_ref[:, None]).any(0).mean()
    recall = (d <= r_s[None, :]).any(1).mean()
    return precision, recall, r_ref


def test_precision_recall_matches_brute_force():
    ref = random_features(70, 5, 3).astype(np.float32)
    samples = (random_features(55, 5, 4) * 0.6 + 1.5).astype(np.float32)
    precision, recall, r_ref = brute_precision_recall(ref.astype(np.float64), samples.astype(np.float64), 3)
    assert 0 < precision < 1 and 0 < recall < 1 and precision != recall
    got = metrics.precision_recall(ref, samples, k=3, batch_size=16)  # blocks smaller than the sets
    assert got == pytest.approx((precision, recall), abs=1e-12)
    radii = metrics.manifold_radii(torch.from_numpy(ref), k=3, batch_size=16).numpy()
    np.testing.assert_allclose(radii, r_ref, rtol=1e-4)
    assert metrics.precision_recall(ref, ref, k=3) == (1.0, 1.0)


# --- networks --------------------------------------------------------------------------------


def test_inception_layout_matches_fid_weights():
    state = features.InceptionV3().state_dict()
    expected = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1), "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7), "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1), "fc.weight": (1008, 2048), "fc.bias": (1008,),
    }  # fmt: skip
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("AuxLogits") for k in state)
    # torchvision's inception_v3 without the aux head, 1008 classes: the FID network's size.
    assert sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k) == 23_850_960


def test_inception_from_file(tmp_path):
    torch.manual_seed(0)
    state = {k: v for k, v in features.InceptionV3().state_dict().items() if "num_batches_tracked" not in k}
    torch.save(state, tmp_path / features.INCEPTION_WEIGHTS)  # as the released file: no num_batches_tracked
    net = features.InceptionV3.from_file(tmp_path / features.INCEPTION_WEIGHTS)
    assert torch.equal(net.state_dict()["Mixed_6d.branch1x1.conv.weight"], state["Mixed_6d.branch1x1.conv.weight"])
    torch.save({"fc.weight": torch.zeros(1000, 2048)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not the FID Inception network"):
        features.InceptionV3.from_file(tmp_path / "other.pth")


def fid_inception_reference(p, x):
    """pytorch-fid's FID network written out as plain functional calls on a state dict `p`, from
    its documented layout: torchvision's Inception-v3 (BasicConv2d = conv without bias, batch norm
    with eps 0.001, ReLU), 1008 classes, no aux head, with the FID blocks swapped in
    (FIDInceptionA, FIDInceptionC and FIDInceptionE_1 average-pool without counting the padding,
    FIDInceptionE_2 max-pools), pool_3 the 8x8 average. Also ADM's sFID features (mixed_6/conv:
    Mixed_6d's 1x1 branch, first 7 channels, NHWC order) and its logits (pool_3 @ W.T)."""

    def conv(name, x, stride=1, same=True):
        w = p[f"{name}.conv.weight"]
        pad = (w.shape[2] // 2, w.shape[3] // 2) if same and stride == 1 else 0
        x = F.conv2d(x, w, stride=stride, padding=pad)
        bn = {k: p[f"{name}.bn.{k}"] for k in ("running_mean", "running_var", "weight", "bias")}
        return F.relu(F.batch_norm(x, bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"], training=False, eps=0.001))

    def chain(block, names, x):
        for name in names:
            x = conv(f"{block}.{name}", x)
        return x

    def avg(x):
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

    def fid_a(b, x):
        return torch.cat([conv(f"{b}.branch1x1", x), chain(b, ["branch5x5_1", "branch5x5_2"], x),
                          chain(b, ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"], x), conv(f"{b}.branch_pool", avg(x))], 1)  # fmt: skip

    def fid_c(b, x):
        return torch.cat([conv(f"{b}.branch1x1", x), chain(b, [f"branch7x7_{i}" for i in (1, 2, 3)], x),
                          chain(b, [f"branch7x7dbl_{i}" for i in (1, 2, 3, 4, 5)], x), conv(f"{b}.branch_pool", avg(x))], 1)  # fmt: skip

    def fid_e(b, x, pool):
        b3, dbl = conv(f"{b}.branch3x3_1", x), chain(b, ["branch3x3dbl_1", "branch3x3dbl_2"], x)
        return torch.cat([conv(f"{b}.branch1x1", x), conv(f"{b}.branch3x3_2a", b3), conv(f"{b}.branch3x3_2b", b3),
                          conv(f"{b}.branch3x3dbl_3a", dbl), conv(f"{b}.branch3x3dbl_3b", dbl), conv(f"{b}.branch_pool", pool(x))], 1)  # fmt: skip

    x = conv("Conv2d_1a_3x3", x, stride=2)
    x = conv("Conv2d_2a_3x3", x, same=False)
    x = F.max_pool2d(conv("Conv2d_2b_3x3", x), 3, stride=2)
    x = conv("Conv2d_3b_1x1", x)
    x = F.max_pool2d(conv("Conv2d_4a_3x3", x, same=False), 3, stride=2)  # (N, 192, 35, 35)
    for b in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = fid_a(b, x)
    x = torch.cat([conv("Mixed_6a.branch3x3", x, stride=2), conv("Mixed_6a.branch3x3dbl_3", chain("Mixed_6a", ["branch3x3dbl_1", "branch3x3dbl_2"], x), stride=2),
                   F.max_pool2d(x, 3, stride=2)], 1)  # torchvision's InceptionB  # fmt: skip
    for b in ("Mixed_6b", "Mixed_6c"):
        x = fid_c(b, x)
    spatial = conv("Mixed_6d.branch1x1", x)[:, :7].permute(0, 2, 3, 1).flatten(1)
    for b in ("Mixed_6d", "Mixed_6e"):
        x = fid_c(b, x)
    x = torch.cat([conv("Mixed_7a.branch3x3_2", conv("Mixed_7a.branch3x3_1", x), stride=2),
                   conv("Mixed_7a.branch7x7x3_4", chain("Mixed_7a", ["branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3"], x), stride=2),
                   F.max_pool2d(x, 3, stride=2)], 1)  # torchvision's InceptionD  # fmt: skip
    x = fid_e("Mixed_7b", x, avg)  # FIDInceptionE_1
    x = fid_e("Mixed_7c", x, lambda x: F.max_pool2d(x, 3, stride=1, padding=1))  # FIDInceptionE_2
    pool = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (N, 2048)
    return {"pool": pool, "spatial": spatial, "logits": pool @ p["fc.weight"].T}


def test_inception_features_equal_an_independent_fid_network():
    """The port against the reference above, with the same random weights (batch-norm statistics
    and affine parameters random too, so eps and every pooling choice show) and pytorch-fid's
    preprocessing (bilinear resize to 299, [-1, 1], gray repeated to RGB)."""
    torch.manual_seed(0)
    net = features.InceptionV3()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 0.05 + 0.002)  # small: eps 1e-3 vs 1e-5 differs by percents
            elif name.endswith(("running_mean", "bn.bias")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif name.endswith("bn.weight"):
                t.copy_(torch.rand(t.shape, generator=g) * 0.1 + 0.05)  # keeps activations of order one through 90 layers
        net.fc.bias.fill_(5.0)  # ADM's logits ignore the bias
    images = np.random.default_rng(0).integers(0, 256, size=(1, 32, 32, 1), dtype=np.uint8)
    got = features.InceptionFeatures(net)(images)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    with torch.no_grad():
        ref = fid_inception_reference(net.state_dict(), 2 * x - 1)
    assert ref["pool"].std() > 0.01 and ref["spatial"].std() > 0.001  # alive after 90 layers: the comparison means something
    for k in ("pool", "spatial", "logits"):
        assert got[k].shape == tuple(ref[k].shape), k
        assert rel(torch.from_numpy(got[k]), ref[k]) < 1e-5, k


def scipy_frechet(a, b):
    """The Fréchet distance of two feature sets, straight from its formula."""
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)


def test_effnet_fd_path():
    """The real EfficientNet-Lite0 on 16 Fashion-MNIST images: its features against the package's
    network called directly (64 px bilinear antialiased, ImageNet mean/std, pooled
    extract_features), and the FD of two halves against the formula."""
    images = npz.fashion_mnist("test")[0][:16]
    net = features.EffNetFeatures()
    feats = net(images)["pool"]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        direct = features.load_effnet().extract_features((x - mean) / std).mean((2, 3)).numpy()
    assert feats.shape == (16, 1280) and feats.std() > 0.1
    np.testing.assert_allclose(feats, direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net(images[:4])["pool"], feats[:4], rtol=1e-4, atol=1e-5)  # batch-independent
    a, b = feats[:8, :64].astype(np.float64), feats[8:, :64].astype(np.float64)  # 64 dims: fast on a CPU
    fd = metrics.frechet_distance(metrics.FeatureStats.fit(a), metrics.FeatureStats.fit(b))
    assert fd > 1.0 and fd == pytest.approx(scipy_frechet(a, b), rel=1e-6)


# --- reference caching and the metric plumbing, with a tiny injected network ------------------


class TinyNet:
    """A fixed random projection standing in for a feature network; counts the images it sees."""

    name = "tiny"
    dims = {"pool": 5, "spatial": 3}

    def __init__(self):
        rng = np.random.default_rng(0)
        self.proj = {k: rng.normal(size=(8 * 8, d)) for k, d in {"pool": 5, "spatial": 3, "logits": 7}.items()}
        self.seen = 0

    def __call__(self, images):
        self.seen += len(images)
        n, h, w, c = images.shape
        x = images.reshape(n, 8, h // 8, 8, w // 8, c).mean((2, 4, 5)).reshape(n, 64) / 255  # 8x8 block means
        return {k: (x @ p).astype(np.float32) for k, p in self.proj.items()}


def write_images(path, n, seed, labels=None):
    images = np.random.default_rng(seed).integers(0, 256, size=(n, 8, 8, 1), dtype=np.uint8)
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "labels": labels}
    return npz.save_npz(path, **arrays), images


def test_metrics_with_injected_network(tmp_path):
    s_path, s_img = write_images(tmp_path / "s.npz", 40, 0)
    r_path, r_img = write_images(tmp_path / "r.npz", 30, 1)
    net = TinyNet()
    samples, ref = npz.read_images(s_path), npz.read_images(r_path)
    got = evaluate.compute_metrics(samples, ref, {"inception": net}, cache=tmp_path / "c", batch_size=16)
    fs, fr = net(s_img), net(r_img)
    assert got["FID"] == pytest.approx(metrics.frechet_distance(metrics.FeatureStats.fit(fs["pool"]), metrics.FeatureStats.fit(fr["pool"])))
    assert got["sFID"] == pytest.approx(metrics.frechet_distance(metrics.FeatureStats.fit(fs["spatial"]), metrics.FeatureStats.fit(fr["spatial"])))
    assert got["IS"] == pytest.approx(adm_inception_score(fs["logits"], metrics.IS_SPLIT_SIZE), rel=1e-6)
    assert (got["precision"], got["recall"]) == pytest.approx(brute_precision_recall(fr["pool"].astype(np.float64), fs["pool"].astype(np.float64), 3)[:2])
    same = evaluate.compute_metrics(ref, ref, {"inception": TinyNet()}, cache=tmp_path / "c")
    assert abs(same["FID"]) < 1e-6 and same["precision"] == same["recall"] == 1.0


def test_reference_statistics_are_cached(tmp_path):
    s_path, _ = write_images(tmp_path / "s.npz", 20, 0)
    r_path, _ = write_images(tmp_path / "r.npz", 30, 1)
    samples, ref = npz.read_images(s_path), npz.read_images(r_path)
    first, second = TinyNet(), TinyNet()
    a = evaluate.compute_metrics(samples, ref, {"effnet": first}, cache=tmp_path / "c")
    b = evaluate.compute_metrics(samples, ref, {"effnet": second}, cache=tmp_path / "c")
    assert first.seen == 20 + 30 and second.seen == 20  # the reference came from the cache
    assert a == b
    os.utime(r_path, ns=(0, 0))  # a changed reference file is recomputed
    third = TinyNet()
    evaluate.compute_metrics(samples, ref, {"effnet": third}, cache=tmp_path / "c")
    assert third.seen == 50


def test_streaming_reader(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(11, 5, 4, 3), dtype=np.uint8)
    labels = np.arange(11, dtype=np.int32)
    np.savez_compressed(tmp_path / "c.npz", images, labels)  # guided-diffusion's layout: arr_0, arr_1
    for path in (tmp_path / "c.npz", npz.save_npz(tmp_path / "u.npz", arr_0=images, labels=labels)):
        data = npz.read_images(path)
        np.testing.assert_array_equal(np.concatenate(list(data.batches(4))), images)
        np.testing.assert_array_equal(data.labels, labels)
        assert data.labels.dtype == np.int64


# --- datasets and the classifier -------------------------------------------------------------


def test_dataset_npz(tmp_path):
    path = npz.resolve_images("fashion-mnist-train:50", "samples", cache=tmp_path)
    data = npz.read_images(path)
    assert data.shape == (50, 32, 32, 1) and data.labels.dtype == np.int64 and data.labels.max() < 10
    images = next(data.batches(50))
    assert images[:, :2].max() == 0 and images[:, :, -2:].max() == 0 and images.max() > 200  # black border
    assert npz.resolve_images("fashion-mnist-train:50", "samples", cache=tmp_path) == path  # written once
    with pytest.raises(FileNotFoundError, match="neither an existing .npz file nor a dataset name"):
        npz.resolve_images("mnist", "reference", cache=tmp_path)


def test_shipped_classifier():
    model, meta = classifier.load_classifier()
    assert float(meta["test_accuracy"]) >= 0.90
    assert classifier.CLASSIFIER_PATH.stat().st_size < 2_000_000
    images, labels = npz.fashion_mnist("test")
    assert classifier.classifier_accuracy(model, images[:1000], labels[:1000]) >= 0.88


# --- sample-npz ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    m = ditkit.DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    return save_pretrained(m, m.config, tmp_path_factory.mktemp("ckpt") / "tiny")


def sample_npz_args(ckpt, out, n=8):
    return ["sample-npz", "--ckpt", str(ckpt), "--num-samples", str(n), "--batch-size", "2", "--sampler", "ddim",
            "--num-sampling-steps", "2", "--cfg-scale", "1", "--device", "cpu", "--seed", "3", "--out", str(out)]  # fmt: skip


def seeded_batches(ckpt, labels, batch_size=2, seed=3):
    """What sample-npz draws, computed directly: batch i with noise from a generator seeded by (seed, i)."""
    pipe = pipeline.load_pipeline(config.SampleNpzConfig(ckpt=str(ckpt), sampler="ddim", num_sampling_steps=2, cfg_scale=1.0, device="cpu"))
    return np.concatenate([
        pipeline.to_uint8(pipe.images(torch.from_numpy(labels[i : i + batch_size]), generator=torch.Generator().manual_seed(seed * 1_000_003 + i // batch_size)))
        for i in range(0, len(labels), batch_size)
    ])  # fmt: skip


def test_sample_npz_end_to_end(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert main(sample_npz_args(tiny_ckpt, out, n=9)) == 0
    with np.load(out) as data:
        assert sorted(data.files) == ["arr_0", "labels"]
        images, labels = data["arr_0"], data["labels"]
    assert images.shape == (9, 8, 8, 1) and images.dtype == np.uint8 and images.std() > 0
    assert labels.dtype == np.int64 and labels.shape == (9,)
    np.testing.assert_array_equal(labels, np.random.default_rng(3).integers(0, 3, size=9))  # seeded uniform draw
    np.testing.assert_array_equal(images, seeded_batches(tiny_ckpt, labels))
    assert npz.read_images(out).labels is not None
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]  # no shards or temporary files left
    said = capsys.readouterr()
    assert f"9 samples (ddim, 2 steps, cfg 1) on 1 process(es) into {out}" in said.out  # where, at the start
    assert "the first batch of 2 took" in said.out and "to go" in said.out  # and how long, once it knows


def test_sample_npz_resumes_after_a_kill(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """Killed after 2 of 5 batches: the same command draws only the other 3 and writes what an
    uninterrupted run writes; other settings meanwhile are refused, naming them."""
    from ditkit import generate

    out = tmp_path / "s.npz"
    real, drawn = generate.to_uint8, []

    def dying(x):
        if len(drawn) == 2:
            raise KeyboardInterrupt
        drawn.append(len(x))
        return real(x)

    monkeypatch.setattr(generate, "to_uint8", dying)
    assert main(sample_npz_args(tiny_ckpt, out, n=9)) == 130
    parts = tmp_path / ".s.npz.parts"
    assert sorted(p.name for p in parts.iterdir()) == ["0000000.npz", "0000001.npz", "plan.json"] and not out.exists()
    stale = [parts / ".0000002.npz.x1y2z3w4.tmp", tmp_path / ".s.npz.a1b2c3d4.tmp"]  # what kill -9 leaves mid-write
    for path in stale:
        path.write_bytes(b"\0" * 100)
    assert main([*sample_npz_args(tiny_ckpt, out, n=9), "--num-sampling-steps", "3"]) == 2
    assert "with other settings (--num-sampling-steps 2)" in capsys.readouterr().err
    monkeypatch.setattr(generate, "to_uint8", lambda x: (drawn.append(len(x)), real(x))[1])
    assert main(sample_npz_args(tiny_ckpt, out, n=9)) == 0
    assert drawn == [2, 2, 2, 2, 1] and "resuming with 4 already in" in capsys.readouterr().out
    with np.load(out) as data:
        np.testing.assert_array_equal(data["arr_0"], seeded_batches(tiny_ckpt, data["labels"]))
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]


def test_sample_npz_two_processes(tiny_ckpt, tmp_path):
    """A 2-process gloo run as torchrun starts it (each process draws every other batch, rank 0
    joins them) writes exactly what one process writes."""
    out = tmp_path / "two.npz"
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
               "RANK": str(rank), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"}  # fmt: skip
        cmd = [sys.executable, "-m", "ditkit", *sample_npz_args(tiny_ckpt, out)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        log, _ = p.communicate(timeout=120)
        assert p.returncode == 0, log
    with np.load(out) as data:
        images, labels = data["arr_0"], data["labels"]
    np.testing.assert_array_equal(labels, np.random.default_rng(3).integers(0, 3, size=8))
    np.testing.assert_array_equal(images, seeded_batches(tiny_ckpt, labels))
    assert not np.array_equal(images[:4], images[4:])
    assert [p.name for p in tmp_path.iterdir()] == ["two.npz"]  # the shards are gone


# --- bad input: one sentence, non-zero exit --------------------------------------------------


def eval_error(capsys, samples, ref, *extra):
    rc = main(["eval", "--samples", str(samples), "--ref", str(ref), "--device", "cpu", *extra])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1, err
    return err


def test_bad_inputs(tmp_path, capsys):
    good, _ = write_images(tmp_path / "good.npz", 10, 0)
    cases = {
        "no arr_0 array": {"images": np.zeros((4, 8, 8, 1), np.uint8)},
        "not uint8": {"arr_0": np.zeros((4, 8, 8, 3), np.float32)},
        "contains NaN": {"arr_0": np.full((4, 8, 8, 3), np.nan, np.float32)},
        "channels-first": {"arr_0": np.zeros((4, 3, 8, 8), np.uint8)},
        "C = 1 or 3": {"arr_0": np.zeros((4, 8, 8, 2), np.uint8)},
        "4 entries for 5 images": {"arr_0": np.zeros((5, 8, 8, 1), np.uint8), "labels": np.arange(4)},
    }
    for message, arrays in cases.items():
        bad = npz.save_npz(tmp_path / "bad.npz", **arrays)
        assert message in eval_error(capsys, bad, good)
    assert "does not exist" in eval_error(capsys, tmp_path / "missing.npz", good)
    err = eval_error(capsys, good, good, "--inception", str(tmp_path / "nowhere.pth"))
    assert features.INCEPTION_WEIGHTS in err and "--inception" in err
    err = eval_error(capsys, good, good)  # 10 images: the 1280-d covariance would be singular
    assert "FD-EffNet needs at least 1281 samples" in err and "got 10" in err
    assert main(["sample-npz", "--out", str(tmp_path / "x.png")]) != 0
    assert main(["sample-npz", "--num-samples", "0"]) != 0


def test_eval_cli_end_to_end(tmp_path, capsys, monkeypatch):
    """`ditkit eval` on real Fashion-MNIST images (train subset against test subset), with a tiny
    network standing in for EfficientNet (too slow for a unit test on a shared CPU) and the real
    shipped classifier; table and JSON output."""
    tiny = TinyNet()
    tiny.dims = {"pool": 5}
    monkeypatch.setattr(evaluate, "EffNetFeatures", lambda device: tiny)
    args = ["eval", "--samples", "fashion-mnist-train:300", "--ref", "fashion-mnist:200", "--device", "cpu", "--cache-dir", str(tmp_path)]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_samples"] == 300 and result["num_ref"] == 200
    metrics = result["metrics"]
    samples, ref = (next(npz.read_images(npz.resolve_images(name, kind, cache=tmp_path)).batches(1000))
                    for name, kind in (("fashion-mnist-train:300", "samples"), ("fashion-mnist:200", "reference")))  # fmt: skip
    expected = scipy_frechet(TinyNet()(samples)["pool"].astype(np.float64), TinyNet()(ref)["pool"].astype(np.float64))
    assert sorted(metrics) == ["FD-EffNet", "accuracy"] and metrics["FD-EffNet"] == pytest.approx(expected, rel=1e-5)
    assert metrics["accuracy"] > 0.85
    assert len(result["skipped"]) == 1 and features.INCEPTION_WEIGHTS in result["skipped"][0]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "FD-EffNet" in table and f"{metrics['accuracy']:.4f}" in table and "skipped FID, sFID, IS" in table
    assert tiny.seen == 300 + 200 + 300  # the second run read the reference statistics from the cache


def test_fd_parts_splits_the_distance_and_reads_the_pixels():
    """bench/fd_parts.py: its mean and covariance terms add up to the Frechet distance, and its
    pixel columns and floored distance describe the images it was given."""
    import importlib.util
    from pathlib import Path

    from ditkit.eval.metrics import FeatureStats, frechet_distance

    spec = importlib.util.spec_from_file_location("fd_parts", Path(__file__).parents[1] / "bench" / "fd_parts.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    net = lambda x: {"pool": x.reshape(len(x), -1)[:, 100:108].astype(np.float64)}  # noqa: E731  (8 pixels as features)
    rng = np.random.default_rng(0)
    real_images = rng.integers(0, 256, (300, 32, 32, 1), dtype=np.uint8)
    real = FeatureStats.fit(net(real_images)["pool"])
    images = np.zeros((200, 32, 32, 1), np.uint8)
    images[:100, :, :, 0] = 255  # half all white: every pixel 255; half black with a faint 3 at one feature pixel
    images[100:, 3, 4, 0] = 3
    name, n, fd, mean, cov, zeros, low, bright, floored = bench.row("x", images, net, real, floor=8)
    s = FeatureStats.fit(net(images)["pool"])
    assert (name, n) == ("x", "200") and float(fd) == pytest.approx(frechet_distance(real, s), abs=0.06)
    assert float(mean) + float(cov) == pytest.approx(float(fd), abs=0.11)
    assert float(mean) == pytest.approx(float(((s.mu - real.mu) ** 2).sum()), abs=0.06)
    assert (zeros, low, bright) == (f"{(100 * 1024 - 100) / 204800:.3f}", "0.500", "0.500")
    no_floor = bench.row("x", images, net, real, floor=0)[-1]
    assert no_floor == fd and floored != fd  # the floor only moves the last column, and only where faint values are features
