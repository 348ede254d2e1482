"""Validation (``train.eval_every``): every rank computes its share of the held-out loss (the
family's ``validation_loss``), reduced across ranks; rank 0 also makes the run's samples and scores
them with CLIP (``training.evaluate.ClipScorer``). Logged as val/ in TensorBoard and metrics.jsonl."""
from __future__ import annotations

import io

import numpy as np

from pipeline.contract import storage
from pipeline.contract.layout import read_table
from pipeline.contract.media import gif_frames, open_image
from training.worker.rank0 import samples
from training.worker.state import Worker
from training.worker.step import full_unet


class Validation:
    """The held-out set as batches (one bucket per batch, none dropped), this rank's share of them."""

    def __init__(self, w: Worker, path: str):
        loader, sizes = w.family.validation_loader(w.spec, w.config, read_table(path))
        loader.random_crop = False                                   # centre crops: the same pixels every pass
        self.loader = loader
        batches = []
        for b, size in enumerate(sizes):
            ids = [int(i) for i in np.flatnonzero(np.asarray(loader.bucket_of) == b)]
            batches += [ids[k:k + size] for k in range(0, len(ids), size)]
        self.samples = sum(len(b) for b in batches)
        self.batches = list(enumerate(batches))[w.rank::w.world]

    def loss(self, w: Worker) -> float:
        """Mean held-out loss, the same on every rank (NaN when nothing is held out)."""
        import torch

        from training.schedule import Cursor, seeded_rng

        sums = torch.zeros(2, dtype=torch.float64, device=w.acc.device)
        unet = w.raw_unet
        was_training = unet.training
        unet.eval()
        with torch.no_grad():
            for k, ids in self.batches:
                batch = self.loader._assemble(Cursor(), ids, [self.loader._sample(i, 0) for i in ids])
                g = torch.Generator("cpu").manual_seed(
                    int(seeded_rng(w.spec.train.seed, "validation", k).integers(0, 2**62)))
                per = w.family.validation_loss(w.ctx, batch, g, unet)
                sums += torch.stack([per.double().sum(), torch.tensor(float(per.numel()), dtype=torch.float64,
                                                                      device=per.device)]).to(sums.device)
        unet.train(was_training)
        total = w.acc.reduce(sums, "sum")
        return float(total[0] / total[1]) if float(total[1]) else float("nan")

    def close(self) -> None:
        self.loader.close()


def _read_back(path: str):
    """A sample as written (a GIF's palette included), from the output's store or disk."""
    return io.BytesIO(storage.read_bytes(path)) if storage.is_url(path) else path


def validate(w: Worker, step: int, validation: Validation, scorer: list) -> None:
    """Every rank: the held-out loss; rank 0 also samples and scores the samples with CLIP against
    the sample prompts (else the first training caption): a video by its per-frame CLIP score and
    frame consistency. ``scorer`` holds the CLIP model once made."""
    values = {"val_loss": validation.loss(w), "val_samples": validation.samples}
    spec = w.spec
    with full_unet(w) as unet:
        if w.acc.is_main_process:
            paths = samples(w, step, unet)
            if paths:
                from training.evaluate import ClipScorer

                if not scorer:
                    scorer.append(ClipScorer(spec.train.eval_clip_model, spec.train.eval_clip_pretrained,
                                             spec.train.seed))
                prompts = list(spec.train.sample_prompts) or [w.loader.captions[0]]
                if paths[0].endswith(".gif"):
                    frames = gif_frames(_read_back(paths[0]))
                    values["val_clip_score"], values["val_frame_consistency"], _ = scorer[0].video(frames, prompts[0])
                else:
                    images = []
                    for p in paths:
                        with open_image(_read_back(p)) as im:
                            images.append(im.convert("RGB"))
                    values["val_clip_score"], _ = scorer[0].score(images, prompts)
    w.acc.wait_for_everyone()
    w.raw_unet.train()
    w.metrics.log(step, values, "val")


__all__ = ["Validation", "validate"]
