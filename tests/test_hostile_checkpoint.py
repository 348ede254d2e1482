"""A checkpoint on shared storage is input: nothing in it is unpickled, a planted file is named."""
from __future__ import annotations

import os
import pickle

import pytest
import torch


class _Payload:
    """Unpickling this creates a folder: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _objects(seed: int):
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
                                norm_num_groups=32, cross_attention_dim=16)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    ema = EMAModel(unet.parameters(), decay=0.9, update_after_step=0, model_cls=UNet2DConditionModel,
                   model_config=unet.config)
    return unet, opt, sched, ema


def _train_step(unet, opt, sched, ema):
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(1))
    unet(x, torch.tensor([10]), ctx).sample.square().mean().backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    ema.step(unet.parameters())


def _states(unet, opt, sched, ema) -> dict:
    return {"unet": unet, "ema_unet": ema, "optimizer": opt, "lr_scheduler": sched}


@pytest.fixture()
def checkpoint(tmp_path):
    from training.checkpoint import save_checkpoint
    from training.schedule import Cursor

    unet, opt, sched, ema = _objects(0)
    for _ in range(3):
        _train_step(unet, opt, sched, ema)
    folder = str(tmp_path / "ckpt")
    os.makedirs(folder)
    save_checkpoint(folder, _states(unet, opt, sched, ema), 3, Cursor(1, [2, 3], [[4, 5]]), {"epoch": 1})
    return folder, (unet, opt, sched, ema)


def test_checkpoint_round_trip_is_exact_without_pickle(checkpoint):
    from training.checkpoint import restore_checkpoint

    folder, (unet, opt, sched, ema) = checkpoint
    assert sorted(os.listdir(folder)) == ["cursor.json", "ema_unet", "meta.json", "state.json", "state.safetensors",
                                          "unet"]
    unet2, opt2, sched2, ema2 = _objects(1)
    step, cursor = restore_checkpoint(folder, _states(unet2, opt2, sched2, ema2))
    assert step == 3 and cursor.to_dict() == {"epoch": 1, "carry": [2, 3], "segments": [[4, 5]]}
    for a, b in zip(unet.parameters(), unet2.parameters(), strict=True):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s2["param_groups"] == s1["param_groups"] and s2["param_groups"][0]["betas"] == (0.9, 0.99)
    for k in s1["state"]:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])
    assert sched2.state_dict() == sched.state_dict() and sched2.get_last_lr() == sched.get_last_lr()
    assert ema2.optimization_step == ema.optimization_step == 3
    for a, b in zip(ema.shadow_params, ema2.shadow_params, strict=True):
        assert torch.equal(a, b)
    # one more step from the restored state equals one more step from the live one
    _train_step(unet, opt, sched, ema)
    _train_step(unet2, opt2, sched2, ema2)
    for a, b in zip(unet.parameters(), unet2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_payload_planted_in_any_checkpoint_file_never_runs(checkpoint, tmp_path):
    import shutil

    from training.checkpoint import CheckpointError, restore_checkpoint

    folder, _ = checkpoint
    files = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)
    assert len(files) == 8
    read = {
        "state.json",
        "state.safetensors",
        "cursor.json",
        os.path.join("unet", "diffusion_pytorch_model.safetensors"),
        os.path.join("ema_unet", "config.json"),
        os.path.join("ema_unet", "diffusion_pytorch_model.safetensors"),
    }
    marker = str(tmp_path / "pwned")
    payload = pickle.dumps(_Payload(marker))
    outcomes = {}
    for rel in files + ["state.pt"]:           # state.pt: what older winnow wrote and loaded with pickle
        planted = str(tmp_path / "planted")
        shutil.rmtree(planted, ignore_errors=True)
        shutil.copytree(folder, planted)
        with open(os.path.join(planted, rel), "wb") as fh:
            fh.write(payload)
        unet, opt, sched, ema = _objects(2)
        try:
            restore_checkpoint(planted, _states(unet, opt, sched, ema))
            outcomes[rel] = "loaded"
        except CheckpointError as exc:
            assert os.path.join(planted, rel) in str(exc) and "not a valid checkpoint file" in str(exc), str(exc)
            outcomes[rel] = "refused"
        assert not os.path.exists(marker), f"unpickled {rel}"
    assert {rel for rel, o in outcomes.items() if o == "refused"} == read
    assert {rel for rel, o in outcomes.items() if o == "loaded"} == {"meta.json", "state.pt",
                                                                     os.path.join("unet", "config.json")}


@pytest.mark.parametrize("damage", ["truncated", "junk", "latin1", "empty"])
def test_every_file_a_resume_reads_refuses_each_kind_of_damage_by_name(checkpoint, tmp_path, damage):
    """Truncated, random bytes, text in another encoding, zero bytes: each file the resume reads
    stops it with a CheckpointError naming that file (never a UnicodeDecodeError or a JSON traceback)."""
    import shutil

    import numpy as np

    from training.checkpoint import CheckpointError, restore_checkpoint

    folder, _ = checkpoint
    read = [
        "state.json",
        "state.safetensors",
        "cursor.json",
        os.path.join("unet", "diffusion_pytorch_model.safetensors"),
        os.path.join("ema_unet", "config.json"),
        os.path.join("ema_unet", "diffusion_pytorch_model.safetensors"),
    ]
    for rel in read:
        planted = str(tmp_path / "damaged")
        shutil.rmtree(planted, ignore_errors=True)
        shutil.copytree(folder, planted)
        path = os.path.join(planted, rel)
        data = open(path, "rb").read()
        bad = {"truncated": data[: len(data) // 2],
               "junk": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
               "latin1": '{"step": "caf\u00e9"}'.encode("latin-1"),
               "empty": b""}[damage]
        with open(path, "wb") as fh:
            fh.write(bad)
        with pytest.raises(CheckpointError) as info:
            restore_checkpoint(planted, _states(*_objects(2)))
        assert str(info.value).startswith(path + ":"), (rel, str(info.value))
