"""The CLIP tokenizer folder written from open_clip's BPE reproduces the CLIP vocabulary's ids."""
import torch
from open_clip.tokenizer import SimpleTokenizer

from mmdiff.models.clip_tokenizer import EOS_TOKEN, clip_tokenizer, write_clip_tokenizer

PROMPTS = ["a photo of a cat", "", "Hello, World -- 123 it's naive", "a " * 100]


def test_eos_padded_tokenizer_matches_open_clip_ids() -> None:
    ids = torch.tensor(clip_tokenizer(EOS_TOKEN, 77)(PROMPTS, padding="max_length", max_length=77,
                                                     truncation=True).input_ids)
    reference = SimpleTokenizer()(PROMPTS, context_length=77)
    # open_clip pads with 0; the SD 1.x tokenizer pads with the end-of-text token (49407).
    reference = torch.where((reference == 0) & (torch.arange(77) > 0), 49407, reference)
    assert torch.equal(ids, reference)


def test_folder_has_the_pipeline_layout_and_pad_token(tmp_path) -> None:
    folder = write_clip_tokenizer(tmp_path / "tokenizer", pad_token="!", model_max_length=16)
    assert sorted(p.name for p in folder.iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    tokenizer = clip_tokenizer("!", 16)
    assert tokenizer.pad_token_id == 0 and tokenizer.model_max_length == 16
    assert tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]
