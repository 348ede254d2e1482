"""Aesthetic head: LAION's layout and keys, .pth round trip, linear v1 head, thresholds, errors."""
import numpy as np
import pytest
import torch

from curation.aesthetic import (
    AestheticConfig,
    AestheticMLP,
    AestheticScore,
    head_from_state,
    load_head,
)
from pipeline.commands import curate_spec as specmod
from pipeline.contract.config import ConfigError


def emb_batch(n=4, dim=64, seed=0):
    rng = np.random.default_rng(seed)
    e = rng.normal(size=(n, dim)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    e[n - 1] = np.nan                                        # a row the clip stage did not embed
    return {"key": np.array([str(i) for i in range(n)], dtype=object), "clip_image_embedding": e,
            "status": np.array(["kept"] * n, dtype=object), "reject_reason": np.array([None] * n, dtype=object)}


def test_head_has_laions_keys_and_shapes():
    shapes = {k: tuple(v.shape) for k, v in AestheticMLP(768).state_dict().items()}
    assert shapes == {"layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024),
                      "layers.2.bias": (128,), "layers.4.weight": (64, 128), "layers.4.bias": (64,),
                      "layers.6.weight": (16, 64), "layers.6.bias": (16,), "layers.7.weight": (1, 16),
                      "layers.7.bias": (1,)}
    drop = [m.p for m in AestheticMLP(768).layers if isinstance(m, torch.nn.Dropout)]
    assert drop == [0.2, 0.2, 0.1]


def test_pth_round_trip_gives_identical_scores(tmp_path):
    torch.manual_seed(3)
    head = AestheticMLP(64, (32, 16, 8, 4))
    with torch.no_grad():
        head.layers[-1].bias.fill_(5.5)         # around the middle of LAION's 1-10 scale
    path = str(tmp_path / "head.pth")
    torch.save(head.state_dict(), path)
    out = AestheticScore(AestheticConfig(weights=path))(emb_batch())
    with torch.no_grad():
        want = head.eval()(torch.from_numpy(emb_batch()["clip_image_embedding"][:3])).squeeze(-1).numpy()
    assert out["aesthetic_score"][:3].tolist() == pytest.approx(want.tolist(), abs=1e-6)
    assert out["aesthetic_score"][3] is None
    assert all(4.5 < s < 6.5 for s in out["aesthetic_score"][:3])


def test_linear_v1_head_loads():
    lin = torch.nn.Linear(64, 1)
    head, dim = head_from_state(lin.state_dict())
    assert dim == 64 and isinstance(head, torch.nn.Linear)


def test_random_head_is_seeded_and_threshold_rejects():
    a, _ = load_head(AestheticConfig(seed=1), 64)
    b, _ = load_head(AestheticConfig(seed=1), 64)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    out = AestheticScore(AestheticConfig(min_score=10.0))(emb_batch())
    assert list(out["status"]) == ["rejected", "rejected", "rejected", "kept"]
    assert out["reject_reason"][0].startswith("aesthetic_score: ") and out["reject_reason"][0].endswith("< 10.0")


def test_head_and_clip_dimensions_must_match(tmp_path):
    path = str(tmp_path / "laion_shaped.pth")
    torch.save(AestheticMLP(768).state_dict(), path)
    spec = {"input": {"path": "/d"}, "output": {"path": "/o"},
            "stages": ["decode", "clip", {"name": "aesthetic", "weights": path}]}
    with pytest.raises(ConfigError, match="the head expects 768-d CLIP embeddings but the clip stage gives 64-d"):
        specmod.parse(spec)
    spec["stages"][2]["weights"] = str(tmp_path / "missing.pth")
    with pytest.raises(ConfigError, match=r"stages\[2\]\(aesthetic\).weights: file .*missing.pth' does not exist"):
        specmod.parse(spec)
    with pytest.raises(ConfigError, match="needs a 'clip' stage before it"):
        specmod.parse({"input": {"path": "/d"}, "output": {"path": "/o"}, "stages": ["decode", "aesthetic"]})


def test_head_is_not_checked_against_a_clip_size_known_only_after_download(tmp_path):
    path = str(tmp_path / "laion_shaped.pth")
    torch.save(AestheticMLP(768).state_dict(), path)
    spec = specmod.parse(
        {
            "input": {"path": "/d"},
            "output": {"path": "/o"},
            "stages": [
                "decode",
                {"name": "clip", "pretrained": "hf-hub:org/repo", "allow_download": True},
                {"name": "aesthetic", "weights": path},
            ],
        }
    )
    assert [s.name for s in spec.stages] == ["decode", "clip", "aesthetic"]
