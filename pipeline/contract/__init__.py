"""What ``curation/``, ``video/`` and ``training/`` may import of ``pipeline/``: the stage protocol and
column names (``stage``), typed configs (``config``), the run folder (``layout``), the input policy
(``inputs``) and the one tar reader/writer (``tar``). Nothing here imports the engine or a stage."""
