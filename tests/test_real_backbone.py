"""The real default backbone (Gemma 3 270M from PyPI): it loads from the converted cache and embeds real documents."""

import numpy as np

from bsharedrag.backbone import DEFAULT_BACKBONE, embed, load_backbone


def test_default_backbone_embeds_real_documents(small_epqa, small_ecomeval):
    bb = load_backbone(DEFAULT_BACKBONE)
    assert bb.model.config.model_type == "gemma3_text" and bb.model.config.hidden_size == 640
    texts = small_epqa.passages()[:3] + small_ecomeval.passages()[:3]
    out = embed(bb, texts, ("last", "mean"), max_length=128)
    again = embed(bb, texts[::-1], ("last",), max_length=128)["last"][::-1]
    for p in ("last", "mean"):
        assert out[p].shape == (6, 640) and np.isfinite(out[p]).all()
        np.testing.assert_allclose(np.linalg.norm(out[p], axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(again, out["last"], atol=1e-4)
    sims = out["last"] @ out["last"].T
    assert sims[np.triu_indices(6, 1)].max() < 0.9999  # different documents, different vectors
