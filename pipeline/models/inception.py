"""Inception-v3 up to its 2048-d pool, the feature network of FID (Heusel et al., 2017).

Weights come from a file (torchvision's ``inception_v3_google`` state dict, or pytorch-fid's
``pt_inception-2015-12-05``) or are a seeded random network: for tests and the demo only, whose
numbers mean nothing.
"""
from __future__ import annotations

import warnings

POOL_DIM = 2048
INCEPTION_SIZE = 299


def inception(weights: str, seed: int = 0):
    """Inception-v3 up to its 2048-d pool, as a module taking uint8 images (N, 3, H, W).

    ``weights``: a path to torchvision's ``inception_v3_google`` state dict or pytorch-fid's
    ``pt_inception-2015-12-05`` (told apart by its 1008-class head; ``fid_blocks``), loaded with
    ``weights_only=True``; or ``"random"``: seeded random weights, with a warning that its FID
    means nothing beyond comparing runs scored by the same random network."""
    import torch
    from torchvision.models import inception_v3

    class InceptionPool(torch.nn.Module):
        num_features = POOL_DIM

        def __init__(self, net):
            super().__init__()
            self.net = net

        @torch.no_grad()
        def forward(self, images):
            x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
            x = torch.nn.functional.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                                                align_corners=False)
            return self.net(2.0 * x - 1.0)        # the [-1, 1] input Inception was trained on

    if weights == "random":
        warnings.warn("FID with a random Inception (--fid-weights random): the numbers compare runs scored "
                      "by this same network and mean nothing else", stacklevel=2)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
            for m in net.modules():      # He init: activations stay O(1) through the untrained BatchNorms
                if isinstance(m, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    else:
        net = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{weights}: not torchvision's Inception-v3 weights (not a state dict)")
        fc = state.get("fc.weight")
        if fc is not None and tuple(fc.shape) == (1008, POOL_DIM):    # pytorch-fid's file: the TF FID graph
            fid_blocks(net)
        state = {k: v for k, v in state.items() if not k.startswith(("AuxLogits.", "fc."))}
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise ValueError(f"{weights}: not torchvision's Inception-v3 weights (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    net.fc = torch.nn.Identity()
    return InceptionPool(net.eval()).eval()


def fid_blocks(net) -> None:
    """Turn torchvision's Inception-v3 into the network FID's reference weights were made for
    (the TensorFlow graph of Heusel et al., as pytorch-fid ports it, whose file
    ``pt_inception-2015-12-05`` has 1008 classes): its mixed blocks average-pool their pool branch
    without counting the padding, and the last one max-pools it. Only that branch differs, so
    each block keeps its layers and weights and recomputes that one branch."""
    import torch.nn.functional as F
    from torchvision.models.inception import InceptionA, InceptionC, InceptionE

    def block(base, pool):
        class FIDBlock(base):
            def _forward(self, x):
                outs = super()._forward(x)
                outs[-1] = self.branch_pool(pool(x))
                return outs
        FIDBlock.__name__ = f"FID{base.__name__}"
        return FIDBlock

    def avg(x):
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

    def mx(x):
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)

    kinds = {"A": block(InceptionA, avg), "C": block(InceptionC, avg), "E_1": block(InceptionE, avg),
             "E_2": block(InceptionE, mx)}
    for name, kind in (("Mixed_5b", "A"), ("Mixed_5c", "A"), ("Mixed_5d", "A"), ("Mixed_6b", "C"), ("Mixed_6c", "C"),
                       ("Mixed_6d", "C"), ("Mixed_6e", "C"), ("Mixed_7b", "E_1"), ("Mixed_7c", "E_2")):
        getattr(net, name).__class__ = kinds[kind]


__all__ = ["INCEPTION_SIZE", "POOL_DIM", "fid_blocks", "inception"]
