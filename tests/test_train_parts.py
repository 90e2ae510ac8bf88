"""The parts the Trainer is assembled from, each on its own."""

import pytest
import torch

from ditkit.config import TrainConfig
from ditkit.models import DiT
from ditkit.parallel import Dist
from ditkit.train import ClassTask
from ditkit.train.builders import build_ema, build_loader, build_network, build_optimizer, build_run_dir, data_shape, total_steps
from ditkit.train.schedule import ResumableSampler, ema_decay, learning_rate

CPU = Dist(rank=0, world=1, device=torch.device("cpu"), started=False)
TINY = dict(model="DiT-S/4", depth=1, hidden_size=32, num_heads=2, data_path="digits", num_workers=0, global_batch_size=8, device="cpu")


class Shape:
    """What data_shape reads off a dataset."""

    def __init__(self, n=100, classes=10, channels=1, size=32, vae=None):
        self.n, self.num_classes, self.channels, self.image_size, self.vae = n, classes, channels, size, vae

    def __len__(self):
        return self.n


def test_data_shape_checks_batch_classes_and_latents():
    cfg = TrainConfig(**TINY)
    assert data_shape(Shape(), None, cfg) == (10, 32, 1)
    assert data_shape(Shape(classes=3), None, TrainConfig(**TINY, num_classes=5)) == (5, 32, 1)
    with pytest.raises(ValueError, match="fewer than the global batch 8"):
        data_shape(Shape(n=5), None, cfg)
    with pytest.raises(ValueError, match="data has 10 classes but --num-classes is 4"):
        data_shape(Shape(), None, TrainConfig(**TINY, num_classes=4))

    class VaeConfig(dict):  # diffusers' configs answer both ways
        __getattr__ = dict.__getitem__

    vae = type("Vae", (), {"config": VaeConfig(block_out_channels=(4, 4, 4), latent_channels=4)})()
    assert data_shape(Shape(channels=3, size=64), vae, cfg) == (10, 16, 4)
    with pytest.raises(ValueError, match="not divisible by the VAE's factor 4"):
        data_shape(Shape(channels=3, size=30), vae, cfg)
    with pytest.raises(ValueError, match="already holds latents; drop --vae"):
        data_shape(Shape(vae="ema"), vae, cfg)


def test_network_ema_and_optimizer():
    cfg = TrainConfig(**TINY, class_dropout_prob=0.1)
    config = cfg.model_config(10, 8, 1)
    torch.manual_seed(0)
    model = build_network(DiT, config, cfg)
    assert model.y_embedder.dropout_prob == 0.0 and model.y_embedder.embedding_table.num_embeddings == 11  # null row kept, drawn by the trainer
    ema = build_ema(model, lambda: build_network(DiT, config, cfg))
    assert not any(p.requires_grad for p in ema.parameters()) and not ema.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ema.state_dict().values()))
    opt = build_optimizer(model, TrainConfig(**TINY, lr=3e-3, adam_beta2=0.95, weight_decay=0.1), torch.device("cpu"))
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (3e-3, (0.9, 0.95), 0.1)
    assert len(group["params"]) == len(list(model.parameters()))  # pos_embed too, as saved states expect


def test_lora_network_trains_only_the_adapter(tmp_path):
    base_cfg = TrainConfig(**TINY)
    config = base_cfg.model_config(10, 8, 1)
    base = type("Base", (), {"state": DiT(config).state_dict(), "path": tmp_path})()
    cfg = TrainConfig(**TINY, init_from=str(tmp_path), lora_rank=2)
    model = build_network(DiT, config, cfg, base, base_name="base")
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".lora_" in n for n in trained)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    assert sum(p.numel() for p in opt.param_groups[0]["params"]) == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)


def test_run_dir_new_or_the_resumed_runs(tmp_path):
    cfg = TrainConfig(**TINY, results_dir=str(tmp_path))
    first = build_run_dir(cfg, CPU, "DiT-S-4", None)
    second = build_run_dir(cfg, CPU, "DiT-S-4", None)
    assert (first.name, second.name) == ("000-DiT-S-4", "001-DiT-S-4") and (first / "checkpoints").is_dir()
    ck = first / "checkpoints" / "0000010.pt"
    assert build_run_dir(cfg, CPU, "DiT-S-4", ck) == first  # a run's own checkpoint: continue in its folder
    loose = tmp_path / "elsewhere.pt"
    assert build_run_dir(cfg, CPU, "DiT-S-4", loose).name == "002-DiT-S-4"


def test_loader_and_schedule():
    cfg = TrainConfig(**TINY)
    dataset = ClassTask().dataset(cfg, None, CPU)
    loader, sampler = build_loader(dataset, CPU, cfg, 8)
    assert isinstance(sampler, ResumableSampler) and sampler.batches_per_epoch() == len(dataset) // 8
    whole = [y for _, y in loader]
    sampler.set_epoch(0, start_batch=3)
    assert torch.equal(torch.cat([y for _, y in loader]), torch.cat(whole[3:]))  # resumes part-way through the epoch
    assert total_steps(TrainConfig(**TINY, max_steps=5), 100) == 5 and total_steps(TrainConfig(**TINY, epochs=2), 100) == 200
    optim = TrainConfig(**TINY, lr=1e-3, warmup_steps=10, lr_schedule="cosine", min_lr=1e-5).optim
    assert learning_rate(optim, 0, 110) == pytest.approx(1e-4) and learning_rate(optim, 109, 110) == pytest.approx(1e-5)
    assert ema_decay(TrainConfig(**TINY, ema_schedule="warmup", ema_decay=0.99).ema, 1) == pytest.approx(2 / 11)
