"""The Ray Train worker, in rooms (the driver is ``pipeline/commands/train.py``):

* ``state.py``   the worker's state, one typed object set in ``build``;
* ``build.py``   every rank: accelerator, the family's components, optimizer, EMA, restored
  checkpoint, the rank's loader;
* ``step.py``    every rank: one optimizer step (the family's loss), the whole UNet for rank-0
  work, checkpoints (every rank reports; rank 0 attaches the checkpoint);
* ``rank0.py``   rank 0 only: metrics files, samples, the export, ``summary.json``;
* ``validation.py``  every rank: the held-out loss; rank 0 also samples and scores with CLIP;
* ``loop.py``    every rank: the loop that calls them in order.

A function in ``rank0.py`` is called on the main process only and makes no collective call; the
others are entered by every rank, in the same order.
"""
from training.worker.loop import train_loop

__all__ = ["train_loop"]
