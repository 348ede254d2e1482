import numpy as np

from curation.metadata_filter import MetadataFilter, MetadataFilterConfig, Rule


def batch(**cols):
    return {k: np.array(v, dtype=object) for k, v in cols.items()}


def test_sd1_recipe_on_laion_columns():
    cfg = MetadataFilterConfig(min_side=512, max_aspect_ratio=3.0, rules=[
        Rule("AESTHETIC_SCORE", ">=", 5), Rule("pwatermark", "<", 0.5)])
    b = batch(WIDTH=[1024, 400, 2048, 800, 800, 800, None],
              HEIGHT=[768, 900, 512, 600, 600, 600, None],
              AESTHETIC_SCORE=[5.5, 6.0, 6.0, 4.9, 5.0, 6.0, 6.0],
              pwatermark=[0.1, 0.1, 0.1, 0.1, 0.7, None, 0.1])
    out = MetadataFilter(cfg)(b)
    assert out["status"].tolist() == ["kept", "rejected", "rejected", "rejected", "rejected", "rejected", "kept"]
    assert out["reject_reason"].tolist() == [
        None, "too_small: shorter side 400 < 512", "aspect_ratio: 4.00 > 3",
        "metadata: AESTHETIC_SCORE >= 5 failed (4.9)", "metadata: pwatermark < 0.5 failed (0.7)",
        "metadata: pwatermark missing", None]


def test_decoded_size_wins_and_missing_keep():
    cfg = MetadataFilterConfig(min_width=300, rules=[Rule("punsafe", "<", 0.1, missing="keep")],
                               unknown_size="reject")
    b = batch(width=[320, 200, None], height=[100, 500, None], WIDTH=[100, 900, None], HEIGHT=[100, 900, None],
              punsafe=[None, 0.0, 0.0])
    out = MetadataFilter(cfg)(b)
    assert out["reject_reason"].tolist() == [None, "too_small: width 200 < 300", "size_unknown"]


def test_equality_rule_on_strings():
    cfg = MetadataFilterConfig(rules=[Rule("language", "==", "en")])
    out = MetadataFilter(cfg)(batch(language=["en", "de"]))
    assert out["status"].tolist() == ["kept", "rejected"]
