"""Text to image in one place: text encoders and the cache of caption encodings (`encoder`),
captioned datasets and the measured attributes of fashion-mnist-captions (`captions`), prompt
suites and prompt following (`prompts`), and what ditkit train does differently for an MMDiT
(`task`). The network itself is ditkit.models.mmdit."""

from .encoder import TextEncoder, caption_table, resolve_encoder

__all__ = ["TextEncoder", "caption_table", "resolve_encoder"]
