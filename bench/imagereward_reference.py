"""winnow's ImageReward network (pipeline/models/reward.py) against ImageReward's own BLIP code.

    pip download image-reward==1.5 --no-deps -d /tmp/ir && unzip -q /tmp/ir/*.whl -d /tmp/ir/src
    python bench/imagereward_reference.py --reference /tmp/ir/src

The ``image-reward`` package pins timm 0.6 and imports transformers 4 and fairscale names that
winnow's stack lacks, so it cannot be installed beside winnow. This script loads its ``vit.py`` and
``med.py`` from the unpacked wheel (with the few missing imports shimmed: they only concern
checkpointing and pruning), builds a small BLIP (ViT 64 px, 2 blocks; BERT 2 layers with
cross-attention) and the released MLP head with random weights, saves them in ImageReward.pt's key
layout, and compares the reward of winnow's rebuild against the reference, with a padded prompt.
Prints the largest absolute differences (float32).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _shim() -> None:
    import transformers
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu

    for name in ("fairscale", "fairscale.nn", "fairscale.nn.checkpoint",
                 "fairscale.nn.checkpoint.checkpoint_activations"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["fairscale.nn.checkpoint.checkpoint_activations"].checkpoint_wrapper = lambda m, **k: m
    for name in ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer"):
        if not hasattr(mu, name):
            setattr(mu, name, getattr(pu, name, lambda *a, **k: None))
    try:
        import transformers.file_utils as fu
    except ImportError:
        fu = sys.modules["transformers.file_utils"] = types.ModuleType("transformers.file_utils")
    for name in ("add_start_docstrings", "add_start_docstrings_to_model_forward", "replace_return_docstrings"):
        if not hasattr(fu, name):
            setattr(fu, name, lambda *a, **k: (lambda f: f))
    if not hasattr(fu, "ModelOutput"):
        fu.ModelOutput = transformers.utils.ModelOutput


def _module(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, help="the unpacked image_reward wheel (holds ImageReward/)")
    args = ap.parse_args(argv)
    import torch

    from pipeline.models.reward import IMAGEREWARD_MEAN, IMAGEREWARD_STD, build_imagereward

    _shim()
    blip = os.path.join(args.reference, "ImageReward", "models", "BLIP")
    vit, med = _module("ir_vit", os.path.join(blip, "vit.py")), _module("ir_med", os.path.join(blip, "med.py"))
    # transformers 5 dropped these PreTrainedModel helpers that med.py's BertModel calls
    med.BertModel.init_weights = lambda self: None
    med.BertModel.get_head_mask = lambda self, h, n: [None] * n
    med.BertModel.invert_attention_mask = (
        lambda self, m: (1.0 - m[:, None, None, :].float()) * torch.finfo(torch.float32).min)
    torch.manual_seed(0)
    v = vit.VisionTransformer(img_size=64, patch_size=16, embed_dim=128, depth=2, num_heads=2)
    cfg = med.BertConfig(vocab_size=120, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=256, max_position_embeddings=40, hidden_act="gelu", layer_norm_eps=1e-12,
                         pad_token_id=0)
    cfg.encoder_width, cfg.add_cross_attention = 128, True
    text = med.BertModel(config=cfg, add_pooling_layer=False)
    nn = torch.nn
    head = nn.Sequential(nn.Linear(128, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    for m in (v, text, head):
        for p in m.parameters():
            nn.init.normal_(p, std=0.05)    # every tensor away from its init, so each one matters
        m.eval()
    state = {**{"blip.visual_encoder." + k: t for k, t in v.state_dict().items()},
             **{"blip.text_encoder." + k: t for k, t in text.state_dict().items()},
             **{"mlp.layers." + k: t for k, t in head.state_dict().items()}}
    net, size = build_imagereward(state, {"num_attention_heads": 2})
    own = net.state_dict()
    print(f"reference tensors {len(state)}; winnow's {len(own)}; missing {[k for k in own if k not in state]}; "
          f"unused {[k for k in state if k not in own]}")
    net.load_state_dict({k: state[k] for k in own})
    net.eval()
    x = torch.randn(3, 3, size, size)
    ids = torch.randint(1, 120, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0
    with torch.no_grad():
        e_ref, e_own = v(x), net.blip.visual_encoder.forward_features(x)
        ones = torch.ones(e_ref.shape[:-1], dtype=torch.long)
        h_ref = text(ids, attention_mask=mask, encoder_hidden_states=e_ref, encoder_attention_mask=ones,
                     return_dict=True).last_hidden_state[:, 0]
        h_own = net.blip.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=e_own,
                                      encoder_attention_mask=ones).last_hidden_state[:, 0]
        r_ref = (head(h_ref)[:, 0] - IMAGEREWARD_MEAN) / IMAGEREWARD_STD
        r_own = (net.mlp.layers(h_own)[:, 0] - IMAGEREWARD_MEAN) / IMAGEREWARD_STD
    print(f"image tokens  max |diff| {(e_ref - e_own).abs().max().item():.2e}")
    print(f"[CLS] state   max |diff| {(h_ref - h_own).abs().max().item():.2e}")
    print(f"reward        max |diff| {(r_ref - r_own).abs().max().item():.2e}  "
          f"(reference {[round(float(r), 6) for r in r_ref]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
