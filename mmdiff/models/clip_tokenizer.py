"""CLIP tokenizer files (``vocab.json`` + ``merges.txt``) from open_clip's bundled BPE vocabulary.

Stable Diffusion pipelines ship their tokenizers in this layout (transformers' ``CLIPTokenizer``
reads it). open_clip bundles the same OpenAI CLIP BPE, so a tokenizer folder can be written
offline: for exported pipelines and for the tiny test pipelines. The only differences between the
families are the padding token (SD 1.x and SDXL's first encoder pad with the end-of-text token,
SD 2.x and SDXL's second encoder with ``!``, id 0) and the context length.
"""
from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Any

from open_clip.tokenizer import SimpleTokenizer

from mmdiff.io.atomic import write_text_atomic

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# open_clip names the two special tokens differently from OpenAI's (and transformers') vocabulary.
_OPEN_CLIP_SPECIALS = {"<start_of_text>": BOS_TOKEN, "<end_of_text>": EOS_TOKEN}


def write_clip_tokenizer(folder: str | Path, *, pad_token: str = EOS_TOKEN, model_max_length: int = 77) -> Path:
    """Write a ``CLIPTokenizer`` folder (vocab, merges, config, special tokens); returns ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = SimpleTokenizer()
    vocab = {_OPEN_CLIP_SPECIALS.get(token, token): index for token, index in bpe.encoder.items()}
    if pad_token not in vocab:
        raise ValueError(f"pad token {pad_token!r} is not in the CLIP vocabulary.")
    merges = sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])
    write_text_atomic(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    write_text_atomic(folder / "merges.txt",
                      "#version: 0.2\n" + "".join(f"{a} {b}\n" for (a, b), _ in merges))
    specials = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    write_text_atomic(folder / "special_tokens_map.json", json.dumps(specials, indent=2))
    config = {**specials, "tokenizer_class": "CLIPTokenizer", "model_max_length": int(model_max_length),
              "do_lower_case": True, "errors": "replace"}
    write_text_atomic(folder / "tokenizer_config.json", json.dumps(config, indent=2))
    return folder


@functools.lru_cache(maxsize=8)
def clip_tokenizer(pad_token: str = EOS_TOKEN, model_max_length: int = 77) -> Any:
    """transformers' ``CLIPTokenizer`` over the bundled vocabulary (what SD pipelines ship).

    Used rather than open_clip's tokenizer wherever a pipeline's ids must be matched exactly:
    transformers treats the padding token as special, so with ``!`` padding (SD 2.x) a ``!`` in a
    prompt becomes the pad id, where open_clip's BPE would merge it into e.g. ``!!``.
    """
    from transformers import CLIPTokenizer  # heavy; only pipeline text encoders need it

    with tempfile.TemporaryDirectory() as folder:
        write_clip_tokenizer(folder, pad_token=pad_token, model_max_length=model_max_length)
        return CLIPTokenizer.from_pretrained(folder)


__all__ = ["clip_tokenizer", "write_clip_tokenizer", "BOS_TOKEN", "EOS_TOKEN"]
