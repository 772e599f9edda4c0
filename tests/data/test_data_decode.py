"""Safe decoding: images/text/json/npy only, decompression bombs refused, captions from txt or json."""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datakit import evil_pickle, image_bytes
from mmdiff.data.decode import CorruptSample, DecodeSpec, decode_image, decode_sample
from mmdiff.data.tario import RawSample
from mmdiff.data.transforms import ImageTransform


def test_evil_pickle_really_runs_code_when_unpickled(tmp_path: Path) -> None:
    pickle.loads(evil_pickle(tmp_path / "ran"))
    assert (tmp_path / "ran").is_dir()  # so the tests below prove something


def test_pickle_members_are_never_decoded(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = evil_pickle(marker)
    raw = RawSample("k", "x.tar", 0, {"jpg": image_bytes(0), "txt": b"cap", "pyd": payload,
                                      "pickle": payload, "pth": payload, "latent.pyd": payload})
    out = decode_sample(raw, DecodeSpec())
    assert out.caption == "cap" and out.image is not None and not marker.exists()


def test_npy_arrays_load_without_pickle() -> None:
    buf = io.BytesIO()
    np.save(buf, np.arange(6, dtype=np.float32).reshape(2, 3))
    raw = RawSample("k", "x", 0, {"txt": b"c", "latent.npy": buf.getvalue()})
    out = decode_sample(raw, DecodeSpec(load_images=False, array_keys=("latent",)))
    assert out.arrays["latent"].shape == (2, 3)
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    raw.members["latent.npy"] = buf.getvalue()
    with pytest.raises(CorruptSample, match="not a plain .npy"):
        decode_sample(raw, DecodeSpec(load_images=False, array_keys=("latent",)))


def test_captions_from_txt_or_json_field() -> None:
    members = {"png": image_bytes(1, fmt="PNG"), "txt": b"  plain text \n",
               "json": json.dumps({"caption": "from json", "meta": {"alt": "nested"}, "n": 3}).encode()}
    raw = RawSample("k", "x", 0, members)
    assert decode_sample(raw, DecodeSpec()).caption == "plain text"
    assert decode_sample(raw, DecodeSpec(caption_key="json:caption")).caption == "from json"
    assert decode_sample(raw, DecodeSpec(caption_key="json:meta.alt")).caption == "nested"
    with pytest.raises(CorruptSample, match="no field 'missing'"):
        decode_sample(raw, DecodeSpec(caption_key="json:missing"))
    with pytest.raises(CorruptSample, match="not a string"):
        decode_sample(raw, DecodeSpec(caption_key="json:n"))
    with pytest.raises(CorruptSample, match="missing .txt"):
        decode_sample(RawSample("k", "x", 0, {"jpg": members["png"]}), DecodeSpec())


def test_bad_images_and_decompression_bombs_are_refused() -> None:
    with pytest.raises(CorruptSample, match="not a readable"):
        decode_image(b"\xff\xd8\xff\xe0 garbage")
    truncated = image_bytes(5, size=(64, 64))[:300]
    with pytest.raises(CorruptSample):
        decode_image(truncated)
    big = Image.new("L", (3000, 3000))  # 9 Mpx of zeros: a tiny PNG
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    assert len(buf.getvalue()) < 100_000
    with pytest.raises(CorruptSample, match="decompression bomb"):
        decode_image(buf.getvalue(), max_pixels=1_000_000)
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    with pytest.raises(CorruptSample):  # only JPEG, PNG and WebP parsers are used
        decode_image(gif.getvalue())


def test_alpha_and_grey_images_become_rgb() -> None:
    buf = io.BytesIO()
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(buf, format="PNG")
    img = decode_image(buf.getvalue())
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)


def test_transform_shapes_range_and_randomness() -> None:
    img = Image.open(io.BytesIO(image_bytes(7, size=(60, 30)))).convert("RGB")
    centre = ImageTransform(16)(img)
    assert centre.shape == (3, 16, 16) and centre.dtype == torch.float32
    assert -1.0 <= centre.min() and centre.max() <= 1.0
    rand = ImageTransform(16, random_crop=True, random_flip=True)
    outs = [rand(img, np.random.default_rng(i)) for i in range(6)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    assert torch.equal(rand(img, np.random.default_rng(1)), outs[1])


def test_counting_handler_and_tally(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from mmdiff.data.skips import SkipCounter, count_skipped

    def no_sleep(seconds: float) -> None:  # the handler must not back off (webdataset's warn-and-sleep)
        raise AssertionError(f"the skip handler slept {seconds} s")

    monkeypatch.setattr(time, "sleep", no_sleep)
    counter = SkipCounter("test")
    assert all(counter.handler(ValueError(f"bad {i}")) for i in range(20))
    assert counter.count == 20
    batch = lambda worker, skipped: {"worker": torch.tensor([worker] * 2), "skipped": torch.tensor([skipped] * 2)}
    assert count_skipped([batch(0, 1), batch(1, 0), batch(0, 3), batch(1, 2), {"image": None}]) == 5
