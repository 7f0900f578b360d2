"""Long documents: passages instead of silent truncation.

A late-interaction model reads at most ``document_length`` tokens of a document; PyLate
truncates the rest. :func:`encode_passages` keeps every token instead, in one of two ways:

* ``"chunk"``: a document's tokens are tokenised once and cut into windows of the model's
  document length (its special tokens and the document prefix included), overlapping by
  ``overlap`` tokens (default 1/8 of the window); every window is encoded on its own, exactly
  as PyLate would encode a text whose tokens are that window.
* ``"late"`` (late chunking): the document is encoded once, up to ``context`` tokens (default
  8,192, capped by the model's position limit; a longer document is cut into segments of that
  many tokens first, overlapping like windows), and its output token vectors are cut into the
  same windows afterwards: each window's vectors were computed with the whole segment in view.
  Every window also keeps the segment's special and prefix token vectors.
* ``"truncate"``: PyLate's behaviour (the first window only), chosen explicitly.

``"chunk"`` and ``"late"`` give the same windows (the same offsets and token counts): only the
vectors differ. A window is a *passage*; :class:`PassageIndex` indexes passages under keys
``"<doc id>\\x1f<window>"`` in any colengine index and answers per document (score = max over
the document's passages, :attr:`colengine.types.Hit.passage` = the best window).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from colengine.embeddings import PackedEmbeddings, as_packed
from colengine.errors import DuplicateIdError
from colengine.ids import AutoIdCounter, IdMap, as_id_list, auto_ids, pack_strings, unpack_strings
from colengine.index.base import as_query_batch, check_allowed, check_k
from colengine.storage import Bundle
from colengine.types import Hit, Passage

if TYPE_CHECKING:  # pragma: no cover
    from colengine.encoder import Encoder

__all__ = ["MODES", "DEFAULT_CONTEXT", "LongDocPolicy", "check_policy", "windows", "segments",
           "EncodedPassages", "encode_passages", "cached_encode_passages", "PassageIndex",
           "passage_key", "PASSAGES_FORMAT"]

log = logging.getLogger(__name__)

LongDocuments = Literal["chunk", "late", "truncate"]
MODES: tuple[str, ...] = ("chunk", "late", "truncate")
DEFAULT_CONTEXT = 8192
#: version of the passage map saved in an index bundle (``meta["passages"]["format"]``)
PASSAGES_FORMAT = 1
_SEP = "\x1f"


def passage_key(doc_id: str, window: int) -> str:
    """The inner index's id of a document's window: ``doc_id + "\\x1f" + str(window)``.

    Injective: the part after the last separator is the window number (digits only), so two
    (document, window) pairs never share a key, whatever characters the document ids hold.
    The saved passage map, not this string, is what maps a passage back to its document.

    >>> passage_key("a\\x1f1", 0) != passage_key("a", 10)
    True
    """
    return f"{doc_id}{_SEP}{int(window)}"


# -- policy ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LongDocPolicy:
    """How documents longer than the model's document length are indexed.

    ``overlap``: tokens shared by consecutive windows, an ``int`` (0 <= overlap < window) or a
    fraction of the window (a ``float`` in [0, 1)); ``None``: 1/8. ``context``: ``"late"``
    only, the most tokens encoded at once (``None``: 8,192), capped by the model's position
    limit. :meth:`resolve` fixes both against a model.
    """

    mode: str = "chunk"
    overlap: int | float | None = None
    context: int | None = None

    def resolve(self, encoder: "Encoder") -> "ResolvedPolicy":
        """The policy in tokens for ``encoder``'s model; a bad value is a ``ValueError`` here,
        before anything is encoded."""
        spec = _specials(encoder)
        window = encoder.document_length
        content = window - spec.n_extra
        if content < 1:
            raise ValueError(f"the model's document length {window} leaves no room for text "
                             f"after its {spec.n_extra} special/prefix tokens")
        ov = self.overlap
        if ov is None:
            ov_tok = window // 8
        elif isinstance(ov, float):
            ov_tok = int(round(ov * window))
        else:
            ov_tok = int(ov)
        if ov_tok >= content:
            raise ValueError(f"overlap {ov!r} ({ov_tok} tokens) must be smaller than the "
                             f"window's {content} text tokens (document length {window} minus "
                             f"{spec.n_extra} special/prefix tokens)")
        limit = position_limit(encoder)
        ctx = min(DEFAULT_CONTEXT if self.context is None else int(self.context), limit)
        if self.mode == "late" and ctx < window:
            raise ValueError(f"context {self.context} is shorter than the model's document "
                             f"length {window}: late chunking needs at least one window")
        return ResolvedPolicy(self.mode, window, content, ov_tok, max(ctx, window),
                              max(ctx, window) - spec.n_extra, limit)


@dataclasses.dataclass(frozen=True)
class ResolvedPolicy:
    """A :class:`LongDocPolicy` in tokens for one model (what an index records)."""

    mode: str
    window: int          # tokens per window, special and prefix tokens included
    content: int         # text tokens per window
    overlap: int         # text tokens shared by consecutive windows
    context: int         # late: tokens per encoded segment, special tokens included
    context_content: int  # late: text tokens per segment
    position_limit: int  # the model's limit the context was capped by

    @property
    def stride(self) -> int:
        return self.content - self.overlap

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_policy(long_documents: object = "chunk", overlap: object = None,
                 context: object = None) -> LongDocPolicy:
    """Check ``long_documents`` / ``overlap`` / ``context`` at the door (no model needed).

    >>> check_policy("late", 0.25, 4096)
    LongDocPolicy(mode='late', overlap=0.25, context=4096)
    >>> check_policy("split")
    Traceback (most recent call last):
    ValueError: long_documents must be one of ('chunk', 'late', 'truncate'), got 'split'
    """
    if long_documents not in MODES:
        raise ValueError(f"long_documents must be one of {MODES}, got {long_documents!r}")
    if overlap is not None:
        if isinstance(overlap, bool) or not isinstance(overlap, (int, float, np.integer, np.floating)):
            raise TypeError(f"overlap must be an int (tokens) or a float (share of the window), "
                            f"got {type(overlap).__name__}")
        if isinstance(overlap, (float, np.floating)):
            if not (0.0 <= float(overlap) < 1.0):
                raise ValueError(f"overlap as a share of the window must lie in [0, 1), got {overlap}")
            overlap = float(overlap)
        else:
            if overlap < 0:
                raise ValueError(f"overlap must be >= 0 tokens, got {overlap}")
            overlap = int(overlap)
    if context is not None:
        if isinstance(context, bool) or not isinstance(context, (int, np.integer)):
            raise TypeError(f"context must be an int (tokens), got {type(context).__name__}")
        if context <= 0:
            raise ValueError(f"context must be positive, got {context}")
        context = int(context)
    if long_documents != "late" and context is not None:
        raise ValueError(f"context is for long_documents='late', not {long_documents!r}")
    if long_documents == "truncate" and overlap is not None:
        raise ValueError("overlap is for long_documents='chunk' or 'late', not 'truncate'")
    return LongDocPolicy(str(long_documents), overlap, context)


def position_limit(encoder: "Encoder") -> int:
    """The most tokens the model reads at once: its tokenizer's ``model_max_length`` and its
    config's ``max_position_embeddings``, whichever is smaller (either may be absent)."""
    first = encoder.model[0]
    vals = []
    cfg = getattr(getattr(first, "auto_model", None), "config", None)
    if isinstance(getattr(cfg, "max_position_embeddings", None), int):
        vals.append(cfg.max_position_embeddings)
    tml = getattr(encoder.model.tokenizer, "model_max_length", None)
    if isinstance(tml, int) and 0 < tml < 10**7:
        vals.append(tml)
    return min(vals) if vals else encoder.document_length


# -- windows ---------------------------------------------------------------------------------
def windows(n: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Token windows ``[start, end)`` over ``n`` tokens: ``size`` long, each starting
    ``size - overlap`` after the previous one, the last one ending at ``n`` (possibly
    shorter). A text of at most ``size`` tokens is one window.

    >>> windows(10, 4, 1)
    [(0, 4), (3, 7), (6, 10)]
    >>> windows(3, 4, 1)
    [(0, 3)]
    """
    if size < 1 or not 0 <= overlap < size:
        raise ValueError(f"bad window size {size} / overlap {overlap}")
    out = []
    start = 0
    while True:
        end = min(start + size, n)
        out.append((start, end))
        if end >= n:
            return out
        start += size - overlap


def segments(wins: Sequence[tuple[int, int]], size: int, stride: int,
             context: int) -> list[tuple[int, int, int]]:
    """Late chunking: consecutive windows grouped into segments of at most ``context``
    tokens, as ``(first window, last window + 1, segment start)``; a segment spans its first
    window's start to its last window's end.

    >>> segments(windows(10, 4, 1), 4, 3, 7)
    [(0, 2, 0), (2, 3, 6)]
    """
    per = max(1, (context - size) // stride + 1)
    return [(j, min(j + per, len(wins)), wins[j][0]) for j in range(0, len(wins), per)]


# -- encoding --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Specials:
    lead: list[int]
    trail: list[int]
    prefix: int | None
    lower: bool

    @property
    def n_extra(self) -> int:
        return len(self.lead) + len(self.trail) + (self.prefix is not None)


def _specials(encoder: "Encoder") -> _Specials:
    """The token ids the tokenizer puts before / after a text, and the document prefix id."""
    m = encoder.model
    probe = "a b c"
    with_sp = list(encoder.tokenize(probe, add_special_tokens=True)["input_ids"])
    plain = list(encoder.tokenize(probe, add_special_tokens=False)["input_ids"])
    for i in range(len(with_sp) - len(plain) + 1):
        if with_sp[i:i + len(plain)] == plain:
            lead, trail = with_sp[:i], with_sp[i + len(plain):]
            break
    else:  # pragma: no cover - no tokenizer we know does this
        raise ValueError("cannot tell the tokenizer's special tokens from the text tokens")
    return _Specials(lead, trail, m.document_prefix_id, bool(getattr(m[0], "do_lower_case", False)))


def _sequence(sp: _Specials, ids: Sequence[int], start: int) -> tuple[list[int], list[int]]:
    """PyLate's input for text tokens ``ids`` (special tokens around, the prefix inserted
    after the first token), and each position's text-token index (-1: special / prefix)."""
    seq = sp.lead + list(ids) + sp.trail
    role = [-1] * len(sp.lead) + list(range(start, start + len(ids))) + [-1] * len(sp.trail)
    if sp.prefix is not None:
        seq = seq[:1] + [sp.prefix] + seq[1:]
        role = role[:1] + [-1] + role[1:]
    return seq, role


def _text_ids(encoder: "Encoder", texts: Sequence[str], sp: _Specials) -> list[list[int]]:
    """Each text's token ids, no special tokens, nothing cut (sentence-transformers' own
    preprocessing: stripped, lower-cased when the model says so)."""
    out: list[list[int]] = []
    for a in range(0, len(texts), 1024):
        batch = [str(t).strip() for t in texts[a:a + 1024]]
        if sp.lower:
            batch = [t.lower() for t in batch]
        out.extend(list(x) for x in encoder.tokenize(batch, add_special_tokens=False,
                                                     truncation=False, verbose=False)["input_ids"])
    return out


def _forward(encoder: "Encoder", seqs: list[list[int]], *, budget: int, show: bool, desc: str):
    """Run the model on token-id sequences (longest first, right-padded batches of at most
    ``budget`` tokens); yields ``(i, vectors, keep)`` per sequence ``i`` as its batch is done:
    its L2-normalised float32 token vectors ``[L, d]`` and PyLate's keep mask (skiplist)."""
    m = encoder.model
    tok = m.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    types = "token_type_ids" in encoder.tokenize("a")
    skip = set(int(s) for s in m.skiplist)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    m.eval()
    with tqdm(total=len(seqs), desc=desc, unit="seq", disable=not show) as bar:
        a = 0
        while a < len(order):
            longest = max(1, len(seqs[order[a]]))
            n = max(1, min(encoder.batch_size, budget // longest))
            idx = order[a:a + n]
            a += n
            ids = torch.full((len(idx), longest), pad, dtype=torch.long)
            att = torch.zeros((len(idx), longest), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, :len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
                att[r, :len(seqs[i])] = 1
            feats = {"input_ids": ids.to(m.device), "attention_mask": att.to(m.device)}
            if types:
                feats["token_type_ids"] = torch.zeros_like(feats["input_ids"])
            with encoder._lock, torch.inference_mode():
                emb = m.forward(feats)["token_embeddings"]
            emb = torch.nn.functional.normalize(emb.float(), p=2, dim=-1).cpu().numpy()
            for r, i in enumerate(idx):
                L = len(seqs[i])
                yield i, emb[r, :L], np.fromiter((t not in skip for t in seqs[i]), dtype=bool,
                                                 count=L)
            bar.update(len(idx))


@dataclasses.dataclass
class EncodedPassages:
    """Passages of ``n_texts`` texts: ``docs`` (one packed entry per passage, float16) and,
    per passage, its text's index ``doc``, its window number ``window`` and its text-token
    span ``[start, end)``. ``report``: what happened (documents, long ones, passages,
    tokens), for the user and the index manifest."""

    docs: PackedEmbeddings
    doc: np.ndarray
    window: np.ndarray
    start: np.ndarray
    end: np.ndarray
    n_texts: int
    report: dict[str, Any]

    def __post_init__(self) -> None:
        p = len(self.docs)
        for name in ("doc", "window", "start", "end"):
            a = np.asarray(getattr(self, name), dtype=np.int64)
            if a.shape != (p,):
                raise ValueError(f"passage {name} has shape {a.shape}, expected ({p},)")
            setattr(self, name, a)
        if p and (int(self.doc.min()) < 0 or int(self.doc.max()) >= self.n_texts
                  or bool((np.diff(self.doc) < 0).any())):
            raise ValueError("passage documents must be sorted indexes into the texts")
        if p and bool((self.start > self.end).any() or (self.start < 0).any()):
            raise ValueError("passage token spans must have 0 <= start <= end")

    def __len__(self) -> int:
        return self.n_texts

    @staticmethod
    def concat(parts: Sequence["EncodedPassages"]) -> "EncodedPassages":
        """The passages of several batches of texts, as one batch (texts in order).

        >>> one = EncodedPassages(PackedEmbeddings.from_list([np.ones((2, 4))]), [0], [0], [0], [5], 1, {})
        >>> both = EncodedPassages.concat([one, one])
        >>> both.n_texts, both.doc.tolist(), both.docs.n_tokens
        (2, [0, 1], 4)
        """
        base = np.cumsum([0] + [p.n_texts for p in parts[:-1]])
        return EncodedPassages(
            PackedEmbeddings.concat([p.docs for p in parts]),
            np.concatenate([p.doc + b for p, b in zip(parts, base)]),
            np.concatenate([p.window for p in parts]), np.concatenate([p.start for p in parts]),
            np.concatenate([p.end for p in parts]), int(sum(p.n_texts for p in parts)),
            {"batches": len(parts)})

    def keys(self, ids: Sequence[str]) -> list[str]:
        """The inner index's passage ids, given the texts' document ids."""
        return [passage_key(ids[d], w) for d, w in zip(self.doc.tolist(), self.window.tolist())]

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"tokens": self.docs.tokens, "offsets": self.docs.offsets, "doc": self.doc,
                "window": self.window, "start": self.start, "end": self.end}


def encode_passages(encoder: "Encoder", texts: Sequence[str], policy: LongDocPolicy, *,
                    show_progress: bool = True) -> EncodedPassages:
    """Encode ``texts`` as passages (``policy.mode`` ``"chunk"`` or ``"late"``); nothing is
    cut. The report is logged at INFO."""
    from colengine.text import check_texts

    texts = check_texts(texts, "documents")
    if not texts:
        raise ValueError("no documents to encode (empty corpus)")
    if policy.mode not in ("chunk", "late"):
        raise ValueError(f"encode_passages is for 'chunk' or 'late', not {policy.mode!r}")
    rp = policy.resolve(encoder)
    sp = _specials(encoder)
    ids = _text_ids(encoder, texts, sp)
    wins = [windows(len(x), rp.content, rp.overlap) for x in ids]
    budget = encoder.batch_size * encoder.document_length
    # one model input per window ("chunk") or per segment of windows ("late"); each
    # window's vectors are the input's special / prefix tokens and the window's text tokens
    seqs: list[list[int]] = []
    plan: list[tuple[int, int, int, np.ndarray]] = []   # (text, first window, end, roles)
    for d, (x, ws) in enumerate(zip(ids, wins)):
        segs = ([(j, j + 1, ws[j][0]) for j in range(len(ws))] if rp.mode == "chunk"
                else segments(ws, rp.content, rp.stride, rp.context_content))
        for j0, j1, s0 in segs:
            seq, role = _sequence(sp, x[s0:ws[j1 - 1][1]], s0)
            seqs.append(seq)
            plan.append((d, j0, j1, np.asarray(role, dtype=np.int64)))
    first = np.concatenate([[0], np.cumsum([j1 - j0 for _, j0, j1, _ in plan])])
    n_pass = int(first[-1])
    doc = np.repeat([p[0] for p in plan], np.diff(first))
    win = np.concatenate([np.arange(j0, j1) for _, j0, j1, _ in plan])
    start = np.array([wins[d][j][0] for d, j in zip(doc.tolist(), win.tolist())], dtype=np.int64)
    end = np.array([wins[d][j][1] for d, j in zip(doc.tolist(), win.tolist())], dtype=np.int64)
    mats: list[Any] = [None] * n_pass
    for i, emb, keep in _forward(
            encoder, seqs, budget=budget if rp.mode == "chunk" else max(budget, rp.context),
            show=show_progress,
            desc="encoding passages" if rp.mode == "chunk" else "encoding documents (late)"):
        d, j0, j1, role = plan[i]
        for j in range(j0, j1):
            s, e = wins[d][j]
            sel = keep & ((role < 0) | ((role >= s) & (role < e)))
            mats[int(first[i]) + j - j0] = emb[sel].astype(np.float16)
    n_seg = len(seqs)
    for i, mat in enumerate(mats):
        if mat.shape[0] == 0:
            log.warning("passage %d (document %d) has no token left after the skiplist", i, doc[i])
    docs = PackedEmbeddings.from_list(mats, dtype=np.float16)
    n_long = sum(len(ws) > 1 for ws in wins)
    report = {
        "mode": rp.mode, "documents": len(texts), "long_documents": int(n_long),
        "passages": len(mats), "text_tokens": int(sum(len(x) for x in ids)),
        "vectors": docs.n_tokens, "segments": int(n_seg), "truncated": 0,
        "window": rp.window, "overlap": rp.overlap,
        **({"context": rp.context} if rp.mode == "late" else {}),
    }
    log.info("%d documents -> %d passages (%d documents longer than one window of %d tokens; "
             "nothing truncated)", len(texts), len(mats), n_long, rp.window)
    return EncodedPassages(docs, doc, win, start, end, len(texts), report)


def cached_encode_passages(encoder: "Encoder", texts: Sequence[str], policy: LongDocPolicy, *,
                           cache_dir: str | os.PathLike, show_progress: bool = True
                           ) -> EncodedPassages:
    """:func:`encode_passages`, read from / written to ``cache_dir`` (keyed by model, texts
    and the resolved policy; ordinary checksummed bundles, no pickles)."""
    import hashlib
    import json

    from colengine.cache import model_fingerprint, texts_fingerprint
    from colengine.storage import is_index, load_bundle, save_bundle

    rp = policy.resolve(encoder)
    pol = hashlib.blake2b(json.dumps(rp.describe(), sort_keys=True).encode(), digest_size=6)
    path = (Path(cache_dir) / "passages"
            / f"{model_fingerprint(encoder)}-{texts_fingerprint(texts)}-{pol.hexdigest()}")
    if is_index(path):
        b = load_bundle(path, kind="encoded-passages", mmap=True, verify=False)
        a = b.arrays
        return EncodedPassages(PackedEmbeddings(a["tokens"], np.asarray(a["offsets"])),
                               a["doc"], a["window"], a["start"], a["end"],
                               int(b.meta["n_texts"]), dict(b.meta["report"]))
    enc = encode_passages(encoder, texts, policy, show_progress=show_progress)
    save_bundle(path, Bundle("encoded-passages", {"n_texts": enc.n_texts, "report": enc.report,
                                                  "policy": rp.describe()}, enc.to_arrays()))
    return enc


# -- the index -------------------------------------------------------------------------------
@dataclasses.dataclass
class PreparedPassages:
    """An add prepared by :meth:`PassageIndex.prepare_add`."""

    ids: list[str]
    enc: EncodedPassages
    inner: Any            # the inner index's own preparation (None: it adds in one step)
    keys: list[str]
    counter: int | None


class PassageIndex:
    """Documents stored as passages in an inner index (any colengine index kind).

    :attr:`ids` are the documents' ids; the inner index holds one entry per passage under
    :func:`passage_key`. The passage table (document position, window, text-token span) is
    aligned with the inner index's id positions and saved beside it (:meth:`passage_bundle`);
    it is checked against the inner ids whenever it is loaded. ``search`` returns documents,
    scored by their best passage (:attr:`Hit.passage` says which), and asks the inner index
    for more passages until ``k`` distinct documents are found (or none are left);
    ``score``, ``add``, ``delete`` and filters (``allowed`` over document positions) work
    per document.
    """

    def __init__(self, inner: Any, ids: Sequence[str], doc: np.ndarray, window: np.ndarray,
                 start: np.ndarray, end: np.ndarray, meta: dict[str, Any]) -> None:
        self.inner = inner
        self.ids = IdMap(ids)
        self._doc = np.asarray(doc, dtype=np.int64)
        self._win = np.asarray(window, dtype=np.int64)
        self._start = np.asarray(start, dtype=np.int64)
        self._end = np.asarray(end, dtype=np.int64)
        self.meta = dict(meta)
        self.meta.setdefault("next_auto_id", len(self.ids))
        self._groups: tuple[np.ndarray, np.ndarray] | None = None
        self._check()

    # -- construction ----------------------------------------------------------------
    @classmethod
    def build(cls, kind_cls: Any, enc: EncodedPassages, ids: Sequence[str],
              policy: ResolvedPolicy, **index_kwargs: Any) -> "PassageIndex":
        """Build the inner index (``kind_cls.build``) over ``enc``'s passages."""
        ids = list(ids)
        if len(ids) != enc.n_texts:
            raise ValueError(f"got {len(ids)} ids for {enc.n_texts} documents")
        inner = kind_cls.build(enc.docs, enc.keys(ids), **index_kwargs)
        return cls(inner, ids, enc.doc, enc.window, enc.start, enc.end,
                   {"policy": policy.describe(), "report": enc.report})

    def _check(self) -> None:
        n = len(self.inner.ids)
        for name in ("_doc", "_win", "_start", "_end"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"passage table column {name[1:]} has "
                                 f"{getattr(self, name).shape[0]} rows for {n} passages")
        if n and (int(self._doc.min()) < 0 or int(self._doc.max()) >= len(self.ids)):
            raise ValueError("passage table points at a document that does not exist")
        if bool((self._start > self._end).any()) or bool((self._start < 0).any()):
            raise ValueError("passage table holds a token span with start > end or start < 0")
        if n and np.bincount(self._doc, minlength=len(self.ids)).min() == 0:
            raise ValueError("a document has no passage")
        keys = self.inner.ids
        for i, (d, w) in enumerate(zip(self._doc.tolist(), self._win.tolist())):
            if keys[i] != passage_key(self.ids[d], w):
                raise ValueError(f"passage {i}: the index holds {keys[i]!r} where the passage "
                                 f"table says document {self.ids[d]!r} window {w}")

    @property
    def kind(self) -> str:
        return self.inner.kind

    @property
    def dim(self) -> int:
        return self.inner.dim

    @property
    def n_passages(self) -> int:
        return int(self._doc.shape[0])

    @property
    def policy(self) -> dict[str, Any]:
        return dict(self.meta.get("policy", {}))

    def __len__(self) -> int:
        return len(self.ids)

    def __getattr__(self, name: str) -> Any:
        # the inner index's own tools (tune, knobs, compact, ...) act on passages
        if name.startswith("_") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    #: the persistent counter of automatic document ids (saved with the index)
    next_auto_id = AutoIdCounter(lambda index: len(index.ids))

    def _passages_of(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(passage positions, the index into ``positions`` each belongs to)."""
        if self._groups is None:
            order = np.argsort(self._doc, kind="stable")
            starts = np.zeros(len(self.ids) + 1, dtype=np.int64)
            np.cumsum(np.bincount(self._doc, minlength=len(self.ids)), out=starts[1:])
            self._groups = (order, starts)
        order, starts = self._groups
        lens = starts[positions + 1] - starts[positions]
        owner = np.repeat(np.arange(positions.shape[0]), lens)
        idx = np.repeat(starts[positions] - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) \
            + np.arange(int(lens.sum()))
        return order[idx], owner

    def passage(self, row: int) -> Passage:
        """Window ``row`` of the passage table as a :class:`Passage`."""
        return Passage(int(self._win[row]), int(self._start[row]), int(self._end[row]))

    # -- search ----------------------------------------------------------------------
    def search(self, query_embeddings: torch.Tensor | np.ndarray, k: int = 10, *,
               query_lengths: torch.Tensor | None = None, allowed: np.ndarray | None = None,
               **knobs: Any) -> list[list[Hit]]:
        """Top-``k`` documents per query, each scored by its best passage."""
        check_k(k)
        q, ql = as_query_batch(query_embeddings, self.dim, query_lengths)
        p_allowed = None
        n_docs, n_pass = len(self.ids), self.n_passages
        if allowed is not None:
            keep = np.zeros(n_docs, dtype=bool)
            keep[check_allowed(allowed, n_docs)] = True
            p_allowed = keep[self._doc]
            n_docs, n_pass = int(keep.sum()), int(p_allowed.sum())
        want = min(k, n_docs)
        out: list[list[Hit]] = [[] for _ in range(q.shape[0])]
        if want == 0:
            return out
        kp = min(n_pass, max(k, math.ceil(2 * k * n_pass / max(1, n_docs))))
        todo = list(range(q.shape[0]))
        extra = {} if p_allowed is None else {"allowed": p_allowed}
        while todo:
            sel = torch.tensor(todo)
            res = self.inner.search(q[sel], kp, query_lengths=ql[sel], **extra, **knobs)
            again = []
            for i, hits in zip(todo, res):
                docs = self._to_documents(hits, k)
                if len(docs) >= want or len(hits) < kp or kp >= n_pass:
                    out[i] = docs
                else:
                    again.append(i)
            todo = again
            kp = min(n_pass, 2 * kp)
        return out

    def _to_documents(self, hits: list[Hit], k: int) -> list[Hit]:
        if not hits:
            return []
        rows = self.inner.ids.positions([h.doc_id for h in hits]).tolist()
        seen: set[int] = set()
        out: list[Hit] = []
        for h, r in zip(hits, rows):
            d = int(self._doc[r])
            if d in seen:
                continue
            seen.add(d)
            out.append(Hit(self.ids[d], h.score, passage=self.passage(r)))
            if len(out) == k:
                break
        return out

    def score(self, query_embeddings: torch.Tensor | np.ndarray, ids: Sequence[str],
              query_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Exact MaxSim of each query against documents ``ids`` (max over their passages):
        float32 ``[B, len(ids)]``."""
        pos = self.ids.positions(as_id_list(ids, "ids"))
        rows, owner = self._passages_of(pos)
        keys = [self.inner.ids[int(r)] for r in rows]
        s = self.inner.score(query_embeddings, keys, query_lengths)
        out = torch.full((s.shape[0], pos.shape[0]), float("-inf"), dtype=torch.float32)
        idx = torch.from_numpy(owner).unsqueeze(0).expand(s.shape[0], -1)
        return out.scatter_reduce_(1, idx, s.float(), reduce="amax")

    def embeddings_of(self, ids: Sequence[str]) -> list[np.ndarray]:
        """Each document's passages' stored vectors, back to back."""
        out = []
        for p in self.ids.positions(as_id_list(ids, "ids")).tolist():
            rows, _ = self._passages_of(np.asarray([p]))
            mats = self.inner.embeddings_of([self.inner.ids[int(r)] for r in rows])
            out.append(np.concatenate(mats, axis=0))
        return out

    # -- mutation --------------------------------------------------------------------
    def add(self, enc: EncodedPassages, ids: Sequence[str] | None = None) -> list[str]:
        return self.commit_add(self.prepare_add(enc, ids))

    def prepare_add(self, enc: EncodedPassages, ids: Sequence[str] | None = None
                    ) -> PreparedPassages:
        if not isinstance(enc, EncodedPassages):
            raise TypeError("this index stores passages: add EncodedPassages "
                            "(Retriever.encode_documents), not plain document embeddings")
        counter = None
        if ids is None:
            ids, counter = auto_ids(self.next_auto_id, enc.n_texts, self.ids)
        ids = IdMap.check_new(ids, self.ids)
        if len(ids) != enc.n_texts:
            raise ValueError(f"got {len(ids)} ids for {enc.n_texts} documents")
        keys = enc.keys(ids)
        prep = getattr(self.inner, "prepare_add", None)
        inner = prep(as_packed(enc.docs, dim=self.dim), keys) if prep is not None else None
        return PreparedPassages(ids, enc, inner, keys, counter)

    def commit_add(self, p: PreparedPassages) -> list[str]:
        if p.inner is not None:
            self.inner.commit_add(p.inner)
        else:
            self.inner.add(p.enc.docs, p.keys)
        base = len(self.ids)
        self.ids.extend(p.ids)
        self._doc = np.concatenate([self._doc, base + p.enc.doc])
        self._win = np.concatenate([self._win, p.enc.window])
        self._start = np.concatenate([self._start, p.enc.start])
        self._end = np.concatenate([self._end, p.enc.end])
        self._groups = None
        if p.counter is not None:
            self.next_auto_id = p.counter
        return p.ids

    def delete(self, ids: Sequence[str]) -> None:
        """Remove documents (all their passages) by id; all must exist, none twice."""
        ids = as_id_list(ids)
        if len(set(ids)) != len(ids):
            raise DuplicateIdError("delete got the same document id twice")
        pos = self.ids.positions(ids)
        if pos.size and pos.size >= len(self.ids):
            raise ValueError("deleting every document would leave an empty index")
        if not pos.size:
            return
        rows, _ = self._passages_of(pos)
        self.inner.delete([self.inner.ids[int(r)] for r in rows])
        keep_doc = np.ones(len(self.ids), dtype=bool)
        keep_doc[pos] = False
        keep = keep_doc[self._doc]
        new_pos = np.cumsum(keep_doc) - 1
        self.ids = self.ids.keep(keep_doc)
        self._doc = new_pos[self._doc[keep]]
        self._win, self._start, self._end = self._win[keep], self._start[keep], self._end[keep]
        self._groups = None
        if len(self.inner) != self._doc.shape[0]:  # pragma: no cover - an inner-index bug
            raise RuntimeError("passage table and index disagree after a delete")

    # -- persistence and facts -------------------------------------------------------
    def to_bundle(self) -> Bundle:
        """The inner index's bundle (the passage map is :meth:`passage_bundle`)."""
        return self.inner.to_bundle()

    def passage_bundle(self) -> Bundle:
        """The passage map: document ids, and per passage its document position, window and
        text-token span (int64 ``.npy``), versioned (``format``)."""
        data, off = pack_strings(self.ids.ids)
        return Bundle("passages", {"format": PASSAGES_FORMAT, **self.meta},
                      {"doc_ids_utf8": data, "doc_ids_offsets": off, "doc": self._doc,
                       "window": self._win, "start": self._start, "end": self._end})

    @classmethod
    def from_bundle(cls, inner: Any, bundle: Bundle) -> "PassageIndex":
        """Wrap a loaded inner index with its saved passage map (checked against it)."""
        meta = dict(bundle.meta)
        fmt = meta.pop("format", None)
        if fmt != PASSAGES_FORMAT:
            raise ValueError(f"passage map format {fmt!r} is not one this colengine reads "
                             f"({PASSAGES_FORMAT})")
        a = bundle.arrays
        ids = unpack_strings(a["doc_ids_utf8"], a["doc_ids_offsets"])
        return cls(inner, ids, np.asarray(a["doc"]), np.asarray(a["window"]),
                   np.asarray(a["start"]), np.asarray(a["end"]), meta)

    def stats(self) -> dict[str, Any]:
        s = dict(self.inner.stats())
        s["passages"] = self.n_passages
        s["documents"] = len(self.ids)
        s["long_documents"] = self.policy.get("mode")
        s["documents_split"] = int((np.bincount(self._doc, minlength=len(self.ids)) > 1).sum())
        length = np.zeros(len(self.ids), dtype=np.int64)
        np.maximum.at(length, self._doc, self._end)
        s["text_tokens"] = int(length.sum())
        return s


class PassageChunks:
    """``(passage keys, PackedEmbeddings)`` chunks of a corpus for a streamed PLAID build
    (:meth:`PlaidIndex.build_from_iterator`), encoded ``chunk_size`` texts at a time and
    spooled under ``spool_dir`` (:func:`cached_encode_passages`); re-iterable. After a pass,
    :meth:`table` is the passage table of the whole corpus."""

    def __init__(self, encoder: "Encoder", texts: Sequence[str], ids: Sequence[str],
                 policy: LongDocPolicy, *, chunk_size: int, spool_dir: str | os.PathLike) -> None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.encoder, self.texts, self.ids, self.policy = encoder, texts, list(ids), policy
        self.chunk_size, self.spool = chunk_size, Path(spool_dir)
        self._parts: dict[int, EncodedPassages] = {}

    def __len__(self) -> int:
        return -(-len(self.texts) // self.chunk_size)

    def __iter__(self):
        for a in range(0, len(self.texts), self.chunk_size):
            enc = cached_encode_passages(self.encoder, self.texts[a:a + self.chunk_size],
                                         self.policy, cache_dir=self.spool, show_progress=False)
            self._parts[a] = enc
            yield enc.keys(self.ids[a:a + self.chunk_size]), enc.docs

    def table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """(doc, window, start, end, report) over every chunk read so far, in order."""
        parts = [(a, self._parts[a]) for a in sorted(self._parts)]
        if len(parts) != len(self):
            raise RuntimeError("the passage table needs a full pass over the chunks")
        cat = lambda f: np.concatenate([f(a, e) for a, e in parts])  # noqa: E731
        report = dict(parts[0][1].report)
        for key in ("documents", "long_documents", "passages", "text_tokens", "vectors",
                    "segments"):
            report[key] = int(sum(e.report[key] for _, e in parts))
        return (cat(lambda a, e: e.doc + a), cat(lambda a, e: e.window),
                cat(lambda a, e: e.start), cat(lambda a, e: e.end), report)
