"""winnow's LPIPS (training/evaluate.py, ``Lpips``) against the ``lpips`` package's own model.

    pip download lpips==0.1.4 --no-deps -d /tmp/lp && unzip -q /tmp/lp/*.whl -d /tmp/lp/src
    python bench/lpips_reference.py --reference /tmp/lp/src

The package's ``LPIPS(net="alex")`` is built with its released linear layers (``weights/v0.1/
alex.pth``, shipped in the wheel) on an AlexNet trunk with seeded random weights (ImageNet's
cannot be downloaded here); the trunk is saved in torchvision's key layout and both files are
loaded by winnow's ``Lpips``. Prints the distances of image pairs from both, and the largest
absolute difference (float32).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, help="the unpacked lpips wheel (holds lpips/)")
    ap.add_argument("--pairs", type=int, default=8)
    args = ap.parse_args(argv)
    import numpy as np
    import torch

    from training.evaluate import Lpips

    sys.path.insert(0, args.reference)
    import lpips

    torch.manual_seed(0)
    ref = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).eval()
    linear = os.path.join(args.reference, "lpips", "weights", "v0.1", "alex.pth")
    folder = tempfile.mkdtemp(prefix="winnow-lpips-")
    try:
        trunk = {}
        for sl in (ref.net.slice1, ref.net.slice2, ref.net.slice3, ref.net.slice4, ref.net.slice5):
            trunk.update({"features." + n: p.detach().clone() for n, p in sl.named_parameters()})
        torch.save(trunk, os.path.join(folder, "alexnet.pth"))
        ours = Lpips(os.path.join(folder, "alexnet.pth"), linear)
        rng = np.random.default_rng(0)
        worst = 0.0
        for k in range(args.pairs):
            h, w = int(rng.integers(32, 200)), int(rng.integers(32, 200))
            a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            b = np.clip(a.astype(int) + rng.integers(-80, 80, a.shape), 0, 255).astype(np.uint8)
            ta, tb = (torch.from_numpy(v.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None] for v in (a, b))
            with torch.no_grad():
                r = float(ref(ta, tb))
            o = ours(a, b)
            worst = max(worst, abs(r - o))
            print(f"pair {k} ({w}x{h}): lpips {r:.8f}  winnow {o:.8f}")
        print(f"largest |difference| {worst:.2e}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
