"""CLIP's BPE tokenizer as a transformers tokenizer, built from open_clip's bundled vocabulary with
no download: the tiny training families and the tiny captioner presets use it."""
from __future__ import annotations

import gzip
import json
import os


def clip_tokenizer_files(folder: str) -> str:
    """Write CLIP's vocab.json / merges.txt (from open_clip's bundled BPE file) into ``folder``.

    The vocabulary is CLIP's construction (Radford et al., 2021): the 256 byte symbols, the same
    with the end-of-word marker, one token per merge, then the two special tokens -- 49,408 ids.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as fh:
        merges = fh.read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as fh:
        json.dump({tok: i for i, tok in enumerate(vocab)}, fh, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def offline_clip_tokenizer(folder: str, pad_token: str = "<|endoftext|>"):
    """A transformers ``CLIPTokenizer`` with CLIP's ids, built without a download."""
    from transformers import CLIPTokenizer

    clip_tokenizer_files(folder)
    # transformers 5 builds a 2-token vocabulary from CLIPTokenizer(vocab_file=...): go through
    # from_pretrained on the folder instead, then save it complete.
    tok = CLIPTokenizer.from_pretrained(folder, pad_token=pad_token, model_max_length=77)
    tok.save_pretrained(folder)
    return tok



__all__ = ["clip_tokenizer_files", "offline_clip_tokenizer"]
