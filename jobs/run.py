"""Entry point that ``ray job submit`` runs: ``python -m jobs.run SPEC.yaml [--set k=v ...]``.

Inside a Ray job ``RAY_ADDRESS`` is set, so the run joins the cluster instead of starting one.
"""
from __future__ import annotations

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["curate", *sys.argv[1:]]))
