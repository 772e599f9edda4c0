"""FID / KID / CLIP score: sanity on real digits, extractor naming, the Inception weights file, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmdiff.cli import main
from mmdiff.config import load_config
from mmdiff.data.reference import read_reference
from mmdiff.errors import CheckpointError
from mmdiff.eval.clip_score import clip_score
from mmdiff.eval.features import INCEPTION_URL, ClipFeatures, build_extractor
from mmdiff.eval.fid import frechet_distance, kernel_distance
from mmdiff.eval.generative import score_images
from mmdiff.models.clip import ClipEncoder

from interopkit import REPO, tiny_config

# make test (pytest-xdist): one worker runs this module, so its module fixtures (Inception weights and
# features) are built once
pytestmark = pytest.mark.xdist_group("image_metrics")


def tiny_clip(seed: int = 0) -> ClipEncoder:
    torch.manual_seed(seed)
    cfg = load_config(REPO / "configs/demo/text_to_image.yaml", ["model.clip.pretrained=null"])
    return ClipEncoder.from_config(cfg.model.clip)


@pytest.fixture(scope="module")
def digits(demo_shards: Path) -> torch.Tensor:
    images, _ = read_reference(str(demo_shards / "train-*.tar"), 32, 600)
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))]


@pytest.fixture(scope="module")
def extractor() -> ClipFeatures:
    return ClipFeatures(tiny_clip(), "custom")


def test_fid_small_for_real_split_large_for_noise(digits: torch.Tensor, extractor: ClipFeatures) -> None:
    a, b = digits[:300], digits[300:]
    noise = torch.rand(300, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    same, different = frechet_distance(a, b, extractor), frechet_distance(a, noise, extractor)
    print(f"FID[{extractor.name}] real/real-split {same:.4f}  real/noise {different:.4f}")
    assert 0 <= same < 0.05 * different
    kid_same, _ = kernel_distance(a, b, extractor, subsets=20, subset_size=100)
    kid_noise, _ = kernel_distance(a, noise, extractor, subsets=20, subset_size=100)
    print(f"KID[{extractor.name}] real/real-split {kid_same:.5f}  real/noise {kid_noise:.5f}")
    assert abs(kid_same) < 0.05 * kid_noise


def test_extractor_name_is_in_the_metric_key_and_tells_clips_apart(digits, extractor) -> None:
    other = ClipFeatures(tiny_clip(seed=1), "custom")
    assert extractor.name.startswith("clip_custom_") and other.name != extractor.name
    result = score_images(digits[:20], ["x"] * 20, ["fid"], reference=digits[20:40], extractor=extractor)
    assert result["extractor"] == extractor.name and f"fid_{extractor.name}" in result


def test_inception_without_weights_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "pt_inception.pth"
    with pytest.raises(CheckpointError) as err:
        build_extractor("inception", inception_weights=str(missing))
    assert str(missing) in str(err.value) and INCEPTION_URL in str(err.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        build_extractor("inception")


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init state dict in the layout of pt_inception-2015-12-05 (the real file is a download).

    torch-fidelity's network always loads weights in its constructor, so it is built here with the
    loader patched out; He-normal convolutions keep the 2048-d features from vanishing with depth.
    """
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    with mock.patch.object(fidelity, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None):
        net = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.manual_seed(0)
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_features_from_a_local_weights_file(inception_weights: Path, digits: torch.Tensor) -> None:
    extractor = build_extractor("inception", inception_weights=str(inception_weights))
    assert extractor.name == "inception_v3"
    features = extractor(digits[:4])
    assert features.shape == (4, 2048) and torch.isfinite(features).all()
    assert features.std(0).mean() > 0  # the images are told apart
    assert torch.equal(extractor(digits[:4]), features)  # eval mode: no batch-norm updates


def test_inception_weights_are_read_once_and_safely(inception_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch-fidelity's own ``torch.load(weights_only=False)`` (or its download) never runs."""
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    loads = []
    safe_load = torch.load

    def only_safe_loads(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        if kwargs.get("weights_only") is not True:
            raise AssertionError("an unsafe torch.load of the Inception weights")
        return safe_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", only_safe_loads)
    monkeypatch.setattr(fidelity, "load_state_dict_from_url", lambda *a, **k: pytest.fail("a download"))
    extractor = build_extractor("inception", inception_weights=str(inception_weights))
    assert loads == [True]
    want = torch.load(inception_weights, weights_only=True)
    got = extractor.net.state_dict()
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def _fidelity_fid(a: torch.Tensor, b: torch.Tensor) -> float:
    """torch-fidelity's own FID (statistics in float64, as in TTUR) of two feature sets."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    stats = [fid_features_to_statistics(x.double()) for x in (a, b)]
    return fid_statistics_to_metric(*stats, verbose=False)[KEY_METRIC_FID]


class _Remembering(torch.nn.Module):
    """``extractor``, answering a batch it has already seen (equal, element for element) with the
    features it gave then: Inception at 299 px is most of these tests' time, and a batch that
    reaches it changed (scaled, cast) is still computed afresh."""

    def __init__(self, extractor: torch.nn.Module) -> None:
        super().__init__()
        self.extractor, self.num_features = extractor, extractor.num_features
        self.seen: list = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        for seen, features in self.seen:
            if seen.shape == images.shape and seen.dtype == images.dtype and torch.equal(seen, images):
                return features.clone()
        features = self.extractor(images)
        self.seen.append((images.clone(), features.clone()))
        return features


@pytest.fixture(scope="module")
def inception_set(inception_weights: Path, digits: torch.Tensor):
    """The Inception extractor (remembering), two disjoint sets of 20 digits, their features, and
    torch-fidelity's FID of those features."""
    extractor = _Remembering(build_extractor("inception", inception_weights=str(inception_weights)))
    a, b = digits[:20], digits[20:40]
    with torch.no_grad():
        fa, fb = extractor(a), extractor(b)
    return extractor, a, b, _fidelity_fid(fa, fb)


def test_inception_fid_of_a_set_with_itself_is_zero(inception_set) -> None:
    # 20 samples in 2048-d: ~2000 zero eigenvalues of Σ², each off by rounding, whose square
    # roots add up (measured: 2e-5 of FID(a, b) with 40 samples).
    extractor, a, _, theirs = inception_set
    assert frechet_distance(a, a, extractor) == pytest.approx(0, abs=1e-3 * theirs)


def test_inception_fid_equals_torch_fidelitys_on_the_same_features(inception_set) -> None:
    extractor, a, b, theirs = inception_set
    ours = frechet_distance(a, b, extractor)
    print(f"FID[inception, random weights] ours {ours:.6g}, torch-fidelity {theirs:.6g}")
    # float32 features, float64 statistics in both; a covariance with N instead of N - 1 would be 5% off
    assert theirs > 0 and ours == pytest.approx(theirs, rel=1e-3)


def _write_bad(path: Path, kind: str, good: Path) -> None:
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[:4096])
    elif kind == "not_tensors":
        torch.save([torch.zeros(1)], path)
    elif kind == "pickled_object":
        torch.save({"net": Path("x")}, path)
    else:  # another network's state dict
        torch.save(torch.nn.Linear(2, 2).state_dict(), path)


@pytest.mark.parametrize("kind, message", [
    ("truncated", "is not a readable PyTorch checkpoint"),
    ("not_tensors", "holds a list, not a state dict of tensors"),
    ("pickled_object", "was refused for safety"),
    ("other_network", "does not fit the FID Inception v3: .* missing key.* 2 unexpected key"),
])
def test_a_bad_inception_weights_file_is_one_clear_error(tmp_path: Path, inception_weights: Path, kind: str,
                                                         message: str) -> None:
    bad = tmp_path / f"{kind}.pth"
    _write_bad(bad, kind, inception_weights)
    with pytest.raises(CheckpointError, match=message) as err:
        build_extractor("inception", inception_weights=str(bad))
    text = str(err.value)
    assert str(bad) in text and "\n" not in text


def test_clip_score_formula() -> None:
    images = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, 8, 8)  # image i is filled with i
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    text = {"a": [2.0, 0.0], "b": [1.0, 0.0], "c": [-0.6, -0.8]}  # cos 1, 0, -1 (clamped to 0)
    score = clip_score(images, ["a", "b", "c"], lambda x: emb[x[:, 0, 0, 0].long()],
                       lambda p: torch.tensor([text[q] for q in p]), batch_size=2)
    assert score == pytest.approx(100 / 3)


def test_eval_cli_writes_json_and_wandb_run(tiny_ckpt: Path, demo_shards: Path, tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit one\na handwritten digit two\n")
    common = ["--n", "6", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "eval"), "--batch-size", "3"]
    assert main(["eval", "clipscore", str(tiny_ckpt), "--prompts", str(prompts), *common]) == 0
    assert main(["eval", "fid", str(tiny_ckpt), "--reference", str(demo_shards / "val-*.tar"), *common]) == 0
    score = json.loads((tmp_path / "eval" / "clipscore.json").read_text())
    fid = json.loads((tmp_path / "eval" / "fid.json").read_text())
    assert 0 <= score["clipscore"] <= 100 and score["n_images"] == 6
    assert fid["extractor"].startswith("clip_custom_") and fid[f"fid_{fid['extractor']}"] > 0
    runs = sorted((tmp_path / "eval" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    from wandb_offline import read_run

    meta = read_run(runs[0])["run"]
    assert (meta["job_type"], meta["group"]) == ("eval", tiny_config().name)  # the training run's group
    missing = tmp_path / "inception.pth"
    assert main(["eval", "fid", str(tiny_ckpt), "--reference", str(demo_shards / "val-*.tar"), "--extractor",
                 "inception", "--inception-weights", str(missing), "--no-wandb", *common]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0]


def test_eval_cli_fid_with_the_inception_extractor(tiny_ckpt: Path, demo_shards: Path, inception_weights: Path,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "eval"
    assert main(["eval", "fid", str(tiny_ckpt), "--reference", str(demo_shards / "val-*.tar"), "--extractor",
                 "inception", "--inception-weights", str(inception_weights), "--no-wandb", "--n", "4",
                 "--steps", "2", "--device", "cpu", "--out", str(out), "--batch-size", "4"]) == 0
    result = json.loads((out / "fid.json").read_text())
    assert result["extractor"] == "inception_v3" and result["fid_inception_v3"] > 0
