"""The reward-model judges of `winnow prefer` (pipeline/models/reward.py), each loaded through its real
loading code from tiny seeded weights written to a temp folder in the released layout:
ImageReward's state dict (and a Hugging Face cache laid out as the hub writes it), PickScore's
transformers CLIPModel folder, HPSv2's open_clip checkpoint. (That ImageReward's rebuild computes
what ImageReward's own BLIP code computes is checked by bench/imagereward_reference.py, which needs
the package's source.)"""
import json
import os
import pickle

import numpy as np
import pytest
import torch

from pipeline import cli
from pipeline.contract.config import ConfigError
from pipeline.models import reward

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "green", "cube", "on", "the", "table", "dog"]


def _images(n=3, size=40):
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size + 8 * k, 3), dtype=np.uint8)) for k in range(n)]


def _imagereward_state(seed=0, head_bias=None):
    """A tiny network in ImageReward.pt's layout: a 2-block ViT (32 px, 16 px patches, width 64), a
    2-layer BERT with cross-attention (width 64, BLIP's [DEC]/[ENC] after the vocabulary) and the
    released 5-layer head."""
    from timm.models.vision_transformer import VisionTransformer
    from transformers import BlipTextConfig, BlipTextModel

    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=1, num_classes=0,
                            global_pool="", qkv_bias=True)
    text = BlipTextModel(BlipTextConfig(vocab_size=len(WORDS) + 2, hidden_size=64, encoder_hidden_size=64,
                                        intermediate_size=128, num_attention_heads=1, num_hidden_layers=2,
                                        max_position_embeddings=40, bos_token_id=None, eos_token_id=None,
                                        sep_token_id=None, is_decoder=True), add_pooling_layer=False)
    nn = torch.nn
    head = nn.Sequential(nn.Linear(64, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    for m in (vit, text, head):
        for p in m.parameters():
            nn.init.normal_(p, std=0.2)
    if head_bias is not None:       # a head that ignores its input: every reward is (bias - mean) / sd
        for p in head.parameters():
            nn.init.zeros_(p)
        head[-1].bias.data.fill_(head_bias)
    return {**{"blip.visual_encoder." + k: v for k, v in vit.state_dict().items()},
            **{"blip.text_encoder." + k: v for k, v in text.state_dict().items()},
            **{"mlp.layers." + k: v for k, v in head.state_dict().items()},
            "blip.vision_proj.weight": torch.zeros(4, 64)}      # released but unused: ignored


def _bert_vocab(folder):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w") as fh:
        fh.write("\n".join(WORDS) + "\n")
    return str(folder)


def _hub_cache(cache, repo, files: dict):
    """A Hugging Face cache laid out as huggingface_hub writes it: refs/main names a snapshot."""
    base = cache / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text("0" * 40)
    for name, write in files.items():
        write(str(snap / name))
    return str(snap)


def test_imagereward_from_a_hub_cache_standardises_its_reward(tmp_path):
    state = _imagereward_state(head_bias=1.2)
    cache = tmp_path / "hub"
    _hub_cache(cache, "THUDM/ImageReward", {"ImageReward.pt": lambda p: torch.save(state, p)})
    _hub_cache(cache, "google-bert/bert-base-uncased", {"vocab.txt": lambda p: _bert_vocab(os.path.dirname(p))})
    spec = reward.JudgeSpec("imagereward", cache_dir=str(cache))
    files = reward.resolve(spec)
    assert files["weights"].endswith("ImageReward.pt") and files["tokenizer"].startswith(str(cache))
    judge = reward.load(spec)
    got = judge.scores(_images(), "a red cube on the table")
    # the head's weights are zero: the reward is the bias standardised by ImageReward's released mean and sd
    np.testing.assert_allclose(got, [(1.2 - 0.16717362830052426) / 1.0333394966054072] * 3, rtol=1e-6)


def test_imagereward_scores_are_the_saved_networks(tmp_path):
    state = _imagereward_state(seed=3)
    torch.save(state, tmp_path / "ImageReward.pt")
    judge = reward.load(reward.JudgeSpec("imagereward", str(tmp_path / "ImageReward.pt"),
                                         _bert_vocab(tmp_path / "bert")))
    images, prompt = _images(), "a green dog"
    got = judge.scores(images, prompt)
    # the same network built from the state in memory, the same inputs by hand: 32 px bicubic, CLIP's
    # mean and sd, the prompt as BERT ids padded to 35
    net, size = reward.build_imagereward(state)
    net.load_state_dict({k: state[k] for k in net.state_dict()})
    net.eval()
    from torchvision.transforms import functional as F

    x = torch.stack([F.normalize(F.to_tensor(F.center_crop(F.resize(im, size, F.InterpolationMode.BICUBIC), size)),
                                 reward.CLIP_MEAN, reward.CLIP_STD) for im in images])
    ids = torch.tensor([[2, 5, 7, 12, 3] + [0] * 30] * 3)
    with torch.no_grad():
        emb = net.blip.visual_encoder.forward_features(x)
        h = net.blip.text_encoder(input_ids=ids, attention_mask=(ids > 0).long(), encoder_hidden_states=emb,
                                  encoder_attention_mask=torch.ones(emb.shape[:-1], dtype=torch.long))
        want = (net.mlp.layers(h.last_hidden_state[:, 0])[:, 0] - reward.IMAGEREWARD_MEAN) / reward.IMAGEREWARD_STD
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)
    assert len(set(np.round(got, 6))) == 3                       # the images are told apart
    # a video's frames are scored one by one, in batches of 16
    assert judge.scores(images * 7, prompt).shape == (21,)


def test_imagereward_refuses_foreign_and_hostile_files(tmp_path):
    vocab = _bert_vocab(tmp_path / "bert")
    state = _imagereward_state()
    del state["mlp.layers.7.weight"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ConfigError, match="lacks ImageReward's tensor mlp.layers.7.weight"):
        reward.load(reward.JudgeSpec("imagereward", str(tmp_path / "partial.pt"), vocab))
    state = _imagereward_state()
    del state["blip.text_encoder.encoder.layer.1.output.dense.bias"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ConfigError, match="lacks 1 of ImageReward's tensors"):
        reward.load(reward.JudgeSpec("imagereward", str(tmp_path / "partial.pt"), vocab))
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="not ImageReward's state dict"):
        reward.load(reward.JudgeSpec("imagereward", str(tmp_path / "other.pt"), vocab))

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = {"blip.visual_encoder.patch_embed.proj.weight": Payload()}
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(ConfigError, match="not a readable ImageReward state dict"):
        reward.load(reward.JudgeSpec("imagereward", str(tmp_path / "evil.pt"), vocab))
    assert not marker.exists()                                   # nothing was unpickled


def test_missing_weights_fail_naming_the_fix(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for name, repo in (("imagereward", "THUDM/ImageReward"), ("pickscore", "yuvalkirstain/PickScore_v1"),
                       ("hpsv2", "xswu/HPSv2")):
        with pytest.raises(ConfigError) as e:
            reward.resolve(reward.JudgeSpec(name))
        assert repo in str(e.value) and "hf download " + repo in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="does not exist"):
        reward.resolve(reward.JudgeSpec("hpsv2", str(tmp_path / "HPS_v2.1_compressed.pt")))
    with pytest.raises(ConfigError, match="has no config.json"):
        reward.resolve(reward.JudgeSpec("pickscore", str(tmp_path)))
    # the CLI fails before any model is built, with the message and exit code 2
    runs = _runs(tmp_path)
    assert cli.main(["prefer", "--runs", *runs, "--out", str(tmp_path / "o"), "--judge", "imagereward",
                     "--votes", "3"]) == 2
    assert not (tmp_path / "o").exists()


def _pickscore_folder(folder, seed=0):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from pipeline.models.tokenizer import offline_clip_tokenizer

    offline_clip_tokenizer(str(folder))
    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=77),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    model = CLIPModel(cfg)
    model.logit_scale.data.fill_(np.log(50.0))
    model.save_pretrained(str(folder))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return model


def test_pickscore_is_the_logit_scale_times_the_cosine(tmp_path):
    from transformers import CLIPProcessor

    model = _pickscore_folder(tmp_path / "pick").eval()
    judge = reward.load(reward.JudgeSpec("pickscore", str(tmp_path / "pick")))
    images = _images()
    got = judge.scores(images, "a red cube")
    # transformers' own forward: logits_per_image = exp(logit_scale) * cos
    proc = CLIPProcessor.from_pretrained(str(tmp_path / "pick"))
    with torch.no_grad():
        want = model(**proc(images=images, text=["a red cube"], return_tensors="pt", padding=True)).logits_per_image
    np.testing.assert_allclose(got, want[:, 0].numpy(), rtol=1e-5, atol=1e-5)
    assert np.all(np.abs(got) <= 50.0 + 1e-4)


def test_hpsv2_loads_an_open_clip_checkpoint_and_scores_the_cosine(tmp_path):
    from pipeline.models.clip import TINY_CLIP, ClipModel, resolve_weights

    trained = ClipModel(TINY_CLIP, None, seed=7)                 # "fine-tuned": not the seed-0 weights
    state = {"module." + k: v.half() for k, v in trained.model.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "HPS_v2.1_compressed.pt")   # as HPSv2 releases it
    judge = reward.load(reward.JudgeSpec("hpsv2", str(tmp_path), model=TINY_CLIP))
    assert not judge.random and judge.name == "hpsv2"
    images = _images()
    got = judge.scores(images, "a dog")
    ref = ClipModel(TINY_CLIP, str(tmp_path / "HPS_v2.1_compressed.pt"))
    assert resolve_weights(TINY_CLIP, str(tmp_path / "HPS_v2.1_compressed.pt")).checkpoint.endswith("compressed.pt")
    want = ref.embed_images([ref.prepare(im) for im in images]) @ ref.embed_texts(["a dog"])[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    seed0 = reward.load(reward.JudgeSpec("clip")).scores(images, "a dog")
    assert np.abs(got - seed0).max() > 1e-3                      # the checkpoint's weights, not the seeded ones


def _runs(tmp_path):
    from PIL import Image

    runs = []
    for c in range(3):
        folder = tmp_path / f"run{c}"
        folder.mkdir()
        lines = []
        for k, prompt in enumerate(["a red cube", "a green dog"]):
            Image.new("RGB", (40, 40), (60 * c, 90 * k, 30)).save(folder / f"{k}.png")
            lines.append(json.dumps({"file": f"{k}.png", "prompt": prompt, "seed": k}))
        (folder / "prompts.jsonl").write_text("\n".join(lines) + "\n")
        runs.append(str(folder))
    return runs


def test_a_reward_judge_votes_through_the_command(tmp_path, capfd):
    _pickscore_folder(tmp_path / "pick")
    runs, out = _runs(tmp_path), tmp_path / "votes"
    args = ["prefer", "--runs", *runs, "--out", str(out), "--judge", "pickscore", "--votes", "9",
            "--judge-weights", str(tmp_path / "pick"), "--replicates", "200"]
    assert cli.main(args) == 0
    assert "the judge cast 9 votes" in capfd.readouterr().out
    votes = [json.loads(x) for x in (out / "votes.jsonl").read_text().splitlines()]
    assert len(votes) == 9 and {v["voter"] for v in votes} == {"judge:pickscore"}
    judge = reward.load(reward.JudgeSpec("pickscore", str(tmp_path / "pick")))
    from PIL import Image

    for v in votes:
        k = ["a red cube", "a green dog"].index(v["prompt"])
        a, b = (float(judge.scores([Image.open(os.path.join(runs[int(v[s][-1])], f"{k}.png"))], v["prompt"])[0])
                for s in ("left", "right"))
        assert v["choice"] == ("left" if a > b else "right" if b > a else "tie")
    # options that would do nothing are refused
    assert cli.main([*args[:-2], "--judge-model", "ViT-H-14"]) == 2
    assert cli.main(["prefer", "--runs", *runs, "--out", str(out), "--judge", "hpsv2", "--votes", "2",
                     "--judge-processor", str(tmp_path)]) == 2
    assert "has no processor" in capfd.readouterr().err
