"""Text -> token vectors, through a PyLate ColBERT model.

The encoder adds nothing to PyLate's semantics: queries get PyLate's prefix and mask-token
expansion to ``query_length`` tokens, documents get the prefix, truncation at
``document_length`` and the punctuation skiplist, all by calling ``ColBERT.encode``. What it
adds is what an engine needs around that: device choice, input checks, a truncation count,
a progress bar, and packed float16 output ready for an index.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from colengine.devices import resolve_device
from colengine.embeddings import PackedEmbeddings
from colengine.text import check_texts

if TYPE_CHECKING:  # pragma: no cover
    from pylate.models import ColBERT

__all__ = ["Encoder", "DEFAULT_MODEL", "load_colbert"]

DEFAULT_MODEL = "perplexity-ai/pplx-embed-v1-late-0.6b"
log = logging.getLogger(__name__)


def load_colbert(
    model: "str | os.PathLike | ColBERT", *, device: str | torch.device = "auto",
    trust_remote_code: bool | None = None, **kwargs,
) -> "ColBERT":
    """Load a PyLate ColBERT from an alias, hub name or local folder, or pass a built one
    through. ``trust_remote_code``: see :func:`colengine.models.resolve_model` (``None``:
    only the default model family and colengine's own code)."""
    from pylate.models import ColBERT

    if isinstance(model, ColBERT):
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a name, a folder or a pylate ColBERT, got {type(model).__name__}")
    from colengine.models import resolve_model

    dev = str(resolve_device(device))   # a bad device fails here, before the model loads
    res = resolve_model(model, trust_remote_code=trust_remote_code)
    if res.local_files_only:
        kwargs.setdefault("local_files_only", True)
    with _no_load_bars():
        return ColBERT(res.path, device=dev, trust_remote_code=res.trust_remote_code, **kwargs)


@contextlib.contextmanager
def _no_load_bars():
    """transformers' per-load "Loading weights" bar off while a model loads (restored after):
    loading is not the long work a user wants a bar for, and it repeats on every load."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


class Encoder:
    """Encode queries and documents into L2-normalised token vectors.

    Parameters
    ----------
    model:
        A hub name (default ``perplexity-ai/pplx-embed-v1-late-0.6b``), a local model folder,
        or an already built ``pylate.models.ColBERT``.
    device:
        ``"auto"`` (CUDA, then MPS, then CPU), or any torch device string.
    batch_size:
        Texts per forward pass.

    Example (the tiny offline model; any PyLate ColBERT folder works the same)::

        enc = Encoder("path/to/model")
        docs = enc.encode_documents(["a text", "another text"])   # PackedEmbeddings, fp16
        q = enc.encode_queries(["a question"])                    # float32 [1, 32, 128]
    """

    def __init__(
        self,
        model: "str | os.PathLike | ColBERT" = DEFAULT_MODEL,
        *,
        device: str | torch.device = "auto",
        batch_size: int = 32,
        trust_remote_code: bool | None = None,
        **model_kwargs,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.model = load_colbert(
            model, device=device, trust_remote_code=trust_remote_code, **model_kwargs
        )
        self.device = self.model.device
        self.batch_size = batch_size
        # the fast tokenizer fails ("Already borrowed") when two threads use it at once, and
        # PyLate's tokenize() sets the shared maximum length for queries or documents before
        # it tokenizes: tokenizing is one thread at a time, the forward pass is not (a query
        # never waits for a long document's forward pass in another thread, which under load
        # made query encoding 6x slower at the 90th percentile: 158 against 26 ms)
        self._lock = threading.Lock()
        self.model.tokenize = self._locked(self.model.tokenize)
        if isinstance(model, (str, os.PathLike)):
            name = os.fspath(model)
            # a folder is remembered by its absolute path so a saved index finds it again
            self.name = str(Path(name).resolve()) if Path(name).exists() else name
        else:
            self.name = "pylate-colbert (passed as an object)"

    def _locked(self, fn):
        """``fn`` called under this encoder's lock."""
        def call(*args: Any, **kwargs: Any):
            with self._lock:
                return fn(*args, **kwargs)
        return call

    # -- properties ------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.model[-1].out_features)

    @property
    def query_length(self) -> int:
        return int(self.model.query_length)

    @property
    def document_length(self) -> int:
        return int(self.model.document_length)

    def describe(self) -> dict[str, object]:
        """JSON-able facts an index stores about the model that built it."""
        return {
            "name": str(self.name),
            "dim": self.dim,
            "query_length": self.query_length,
            "document_length": self.document_length,
            "query_prefix": self.model.query_prefix,
            "document_prefix": self.model.document_prefix,
            "attend_to_expansion_tokens": bool(self.model.attend_to_expansion_tokens),
        }

    # -- encoding --------------------------------------------------------------------
    def tokenize(self, texts: str | list[str], **kwargs: Any):
        """The model's tokenizer on ``texts`` (its keyword arguments passed on), under this
        encoder's lock: the fast tokenizer fails ("Already borrowed") when another thread
        uses it at the same time, so every tokenizer call in colengine goes through here."""
        with self._lock:
            return self.model.tokenizer(texts, **kwargs)

    def count_truncated(self, texts: Sequence[str], *, is_query: bool = False) -> int:
        """How many ``texts`` exceed the document (or query) length, prefix included, and
        get cut."""
        if is_query:
            limit = self.query_length - (1 if self.model.query_prefix_id is not None else 0)
        else:
            limit = self.document_length - (1 if self.model.document_prefix_id is not None else 0)
        n = 0
        for start in range(0, len(texts), 1024):
            enc = self.tokenize(list(texts[start:start + 1024]), add_special_tokens=True,
                                truncation=False, verbose=False)["input_ids"]
            n += sum(len(ids) > limit for ids in enc)
        return n

    def _encode(self, texts: list[str], *, is_query: bool, batch_size: int,
                show_progress: bool, desc: str) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        with tqdm(total=len(texts), desc=desc, unit="text", disable=not show_progress) as bar:
            for start in range(0, len(texts), batch_size):
                chunk = texts[start:start + batch_size]
                embs = self.model.encode(
                    chunk, is_query=is_query, batch_size=batch_size,
                    show_progress_bar=False, convert_to_numpy=False, convert_to_tensor=False,
                )
                out.extend(e.detach() for e in embs)
                bar.update(len(chunk))
        return out

    def encode_documents(
        self,
        texts: Sequence[str],
        *,
        batch_size: int | None = None,
        show_progress: bool = True,
        dtype: Literal["float16", "float32"] = "float16",
    ) -> PackedEmbeddings:
        """Documents -> :class:`PackedEmbeddings` (tokens ``[T, dim]`` in ``dtype``, offsets).

        Tokens are PyLate's: prefix, truncation at ``document_length``, skiplist removed,
        L2-normalised. Truncated documents are counted and reported in one warning.
        """
        texts = check_texts(texts, "documents")
        if not texts:
            raise ValueError("no documents to encode (empty corpus)")
        n_cut = self.count_truncated(texts)
        if n_cut:
            warnings.warn(
                f"{n_cut} of {len(texts)} documents are longer than the model's limit of "
                f"{self.document_length} tokens and were truncated",
                stacklevel=2,
            )
        embs = self._encode(texts, is_query=False, batch_size=batch_size or self.batch_size,
                            show_progress=show_progress, desc="encoding documents")
        np_dtype = np.float16 if dtype == "float16" else np.float32
        mats = []
        for i, e in enumerate(embs):
            m = e.float().cpu().numpy()
            if m.shape[0] == 0:
                # Every token was in the skiplist (e.g. "..."): keep the document findable-free
                # rather than crash; it scores -inf against every query.
                log.warning("document %d has no token left after the skiplist", i)
            mats.append(m.astype(np_dtype, copy=False))
        return PackedEmbeddings.from_list(mats, dtype=np_dtype)

    def encode_queries(
        self,
        texts: Sequence[str] | str,
        *,
        batch_size: int | None = None,
        show_progress: bool = False,
    ) -> torch.Tensor:
        """Queries -> float32 tensor ``[B, query_length, dim]`` on the CPU.

        A single string gives ``[1, query_length, dim]``. With query expansion every query
        has exactly ``query_length`` tokens (PyLate pads with the mask token).
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = check_texts(texts, "queries")
        if not texts:
            raise ValueError("no queries to encode")
        n_cut = self.count_truncated(texts, is_query=True)
        if n_cut:
            warnings.warn(
                f"{n_cut} of {len(texts)} queries are longer than the model's query length of "
                f"{self.query_length} tokens and were truncated", stacklevel=2)
        embs = self._encode(texts, is_query=True, batch_size=batch_size or self.batch_size,
                            show_progress=show_progress, desc="encoding queries")
        lq = max(e.shape[0] for e in embs)
        out = torch.zeros(len(embs), lq, self.dim, dtype=torch.float32)
        for i, e in enumerate(embs):
            out[i, : e.shape[0]] = e.float().cpu()
        return out
