"""FID and CLIP score: closed forms, a reference implementation (torchmetrics), invariances."""
import numpy as np
import pytest
import torch

from pipeline.models.inception import inception
from training.evaluate import FeatureStats, clip_score, fid, frechet_distance


class SmallFeatures(torch.nn.Module):
    """A seeded feature extractor with few outputs: enough images for a well-conditioned covariance."""

    num_features = 12

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(12, 3 * 8 * 8, generator=g) / 14, requires_grad=False)

    def forward(self, images):
        x = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255.0, 8).flatten(1)
        return torch.tanh(x @ self.w.T) * 3


def _images(seed: int, n: int, shift: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, (n, 3, 32, 32))
    return np.clip(base + shift + rng.integers(0, 56, (n, 3, 1, 1)), 0, 255).astype(np.uint8)


def test_frechet_distance_of_two_gaussians_in_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    want = 1.0 + 0.0 + 4.0 + sum(a + b - 2 * np.sqrt(a * b) for a, b in zip(v1, v2, strict=True))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want, abs=1e-9)
    assert want == pytest.approx(11.0, abs=1e-12)


def test_running_statistics_equal_numpys():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 5))
    s = FeatureStats(5)
    for i in range(0, 300, 64):
        s.add(x[i:i + 64])
    mu, cov = s.mean_cov()
    np.testing.assert_allclose(mu, x.mean(0), atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False), atol=1e-12)
    with pytest.raises(ValueError, match="at least 2 images"):
        FeatureStats(3).mean_cov()


def test_fid_matches_torchmetrics_with_the_same_features_and_is_zero_on_itself():
    from torchmetrics.image.fid import FrechetInceptionDistance

    model = SmallFeatures()
    a, b = _images(0, 200), _images(1, 200, shift=30)
    ours = fid(model, a, b)
    ref = FrechetInceptionDistance(feature=SmallFeatures())
    ref.update(torch.from_numpy(a), real=True)
    ref.update(torch.from_numpy(b), real=False)
    theirs = float(ref.compute())
    assert ours > 0.1 and abs(ours - theirs) < 1e-3 * max(1.0, theirs)
    assert abs(fid(model, a, a)) < 1e-6
    assert fid(model, a, b) == pytest.approx(fid(model, b, a), rel=1e-9)  # symmetric
    assert fid(model, a[::-1].copy(), b) == pytest.approx(
        ours, rel=1e-6
    )  # order of images does not matter (float32 features)


def test_random_inception_is_seeded_and_loads_from_a_weights_file(tmp_path):
    with pytest.warns(UserWarning, match="mean nothing"):
        net = inception("random", seed=3)
    with pytest.warns(UserWarning):
        again = inception("random", seed=3)
    images = torch.from_numpy(_images(2, 2))
    f = net(images)
    # another instance with the same seed: equal weights, but kernels chosen by memory alignment may
    # sum in another order; float32 through Inception's ~95 layers: 1e-4 relative
    assert f.shape == (2, 2048)
    torch.testing.assert_close(again(images), f, rtol=1e-4, atol=1e-5)
    path = tmp_path / "inception.pth"
    torch.save({f"{k}": v for k, v in net.net.state_dict().items()}, path)   # torchvision's key names
    loaded = inception(str(path))
    torch.testing.assert_close(loaded(images), f, rtol=1e-4, atol=1e-5)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not torchvision's Inception-v3 weights"):
        inception(str(tmp_path / "other.pth"))


def test_clip_score_is_hessels_clipped_cosine_times_100():
    img = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-1.0, 0.0]])
    txt = np.array([[3.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    mean, per = clip_score(img, txt)
    np.testing.assert_allclose(per, [100.0, 0.0, 100 / np.sqrt(2), 0.0], atol=1e-9)   # opposite: clipped to 0
    assert mean == pytest.approx((100 + 100 / np.sqrt(2)) / 4)
    with pytest.raises(ValueError, match="differ in shape"):
        clip_score(img, txt[:2])


def test_winnow_eval_scores_two_folders_and_counts_what_it_skips(tmp_path, capsys):
    import json
    import os

    from PIL import Image

    from pipeline import cli

    rng = np.random.default_rng(0)
    for folder, shift in (("a", 0), ("b", 60)):
        (tmp_path / folder).mkdir()
        for i in range(6):
            arr = np.clip(rng.integers(0, 190, (48, 64, 3)) + shift, 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / folder / f"{i}.png")
    (tmp_path / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    (tmp_path / "a" / "caption.txt").write_text("a sidecar, not an image")
    os.mkfifo(tmp_path / "a" / "pipe.png")                      # must not hang the reader
    code = cli.main(["eval", "--images", str(tmp_path / "a"), "--reference", str(tmp_path / "b"),
                     "--fid-weights", "random", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    got = json.loads(out[-1])
    assert code == 0
    assert got["counts"] == {"images": {"scored": 6, "skipped": {"decode_error": 1, "not_a_regular_file": 1}},
                             "reference": {"scored": 6, "skipped": {}}}
    assert got["fid"] > 1.0 and got["fid_weights"] == "random" and got["seed"] == 0
    assert any("mean nothing" in w for w in got["warnings"])
    assert [w for w in got["warnings"] if w.startswith("FID from 6 images: the 2048-d covariances have rank at most 5")]
    code = cli.main(["eval", "--images", str(tmp_path / "b"), "--reference", str(tmp_path / "b"),
                     "--fid-weights", "random", "--json"])
    assert abs(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fid"]) < 1e-3   # a set against itself


def test_winnow_eval_refuses_before_loading_anything(tmp_path, capsys):
    from pipeline import cli

    (tmp_path / "a").mkdir()
    assert cli.main(["eval", "--images", str(tmp_path / "a"), "--reference", str(tmp_path / "nope"),
                     "--fid-weights", "random"]) == 2
    assert "--reference: " in capsys.readouterr().err
    assert cli.main(["eval", "--images", str(tmp_path / "a"), "--reference", str(tmp_path / "a"),
                     "--fid-weights", str(tmp_path / "missing.pth")]) == 2
    assert "inception_v3_google" in capsys.readouterr().err


def test_data_space_and_covariance_space_agree_and_small_sets_stay_exact():
    from training.evaluate import fid_of

    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(300, 6)), rng.normal(0.5, 1.5, size=(250, 6))
    exact, big = (FeatureStats(6), FeatureStats(6)), (FeatureStats(6, keep=0), FeatureStats(6, keep=0))
    exact[0].add(x), exact[1].add(y), big[0].add(x), big[1].add(y)
    assert big[0].centered() is None                                      # too many rows kept: covariance path
    assert fid_of(*exact) == pytest.approx(fid_of(*big), rel=1e-9)
    # 5 rows in 64 dimensions: singular covariances; a set against itself is 0, not noise
    few = FeatureStats(64)
    few.add(rng.normal(size=(5, 64)) * 1e3)
    assert abs(fid_of(few, few)) < 1e-6 * (few.centered() ** 2).sum()


def test_pytorch_fid_weights_get_the_fid_blocks(tmp_path):
    """pytorch-fid's weight file (1008-class head) loads into the TF graph's pooling: average pools
    that do not count padding, a max pool in the last block; the features change accordingly."""
    import torch.nn.functional as F

    with pytest.warns(UserWarning):
        net = inception("random", seed=5)
    state = dict(net.net.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    torch.save(state, tmp_path / "pt_inception.pth")
    fid_net = inception(str(tmp_path / "pt_inception.pth"))
    blocks = {n: type(getattr(fid_net.net, n)).__name__ for n in ("Mixed_5b", "Mixed_6e", "Mixed_7b", "Mixed_7c")}
    assert blocks == {"Mixed_5b": "FIDInceptionA", "Mixed_6e": "FIDInceptionC", "Mixed_7b": "FIDInceptionE",
                      "Mixed_7c": "FIDInceptionE"}
    x = torch.randn(1, 2048, 8, 8)
    last = fid_net.net.Mixed_7c
    assert torch.allclose(last._forward(x)[-1], last.branch_pool(F.max_pool2d(x, 3, 1, 1)))
    x = torch.randn(1, 768, 17, 17)
    mid = fid_net.net.Mixed_6e
    assert torch.allclose(mid._forward(x)[-1], mid.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)))
    images = torch.from_numpy(_images(3, 2))
    assert not torch.allclose(fid_net(images), net(images))      # same weights, the TF graph's pooling
