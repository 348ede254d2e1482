"""Registered stages: YAML names a stage by these names, never by an import path."""
from __future__ import annotations

from curation.aesthetic import AestheticScore
from curation.caption import CaptionImages
from curation.clip import ClipEmbed
from curation.decode import DecodeImages
from curation.metadata_filter import MetadataFilter
from curation.ocr import OcrText
from curation.phash import PHashDedup
from curation.semantic_dedup import SemanticDedup
from pipeline.contract.stage import Stage
from video.clips import SplitClips
from video.motion import MotionScore

STAGES: dict[str, type[Stage]] = {cls.name: cls for cls in (MetadataFilter, DecodeImages, PHashDedup, ClipEmbed,
                                                            AestheticScore, OcrText, SemanticDedup, SplitClips,
                                                            MotionScore, CaptionImages)}


def get(name: str) -> type[Stage]:
    try:
        return STAGES[name]
    except KeyError:
        import difflib
        hint = difflib.get_close_matches(name, list(STAGES), n=1)
        extra = f" Did you mean {hint[0]!r}?" if hint else ""
        raise KeyError(f"unknown stage {name!r}.{extra} Registered stages: {', '.join(sorted(STAGES))}") from None
