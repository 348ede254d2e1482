"""The model floor: loading and running the pretrained models that curation, training and the
commands share (CLIP, Inception, OCR), as small classes with no Ray and no side effects on the
environment. Curation stages and training's evaluation are thin users of them; this package
imports nothing of winnow but ``pipeline/contract``."""
