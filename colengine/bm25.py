"""BM25 first stage on top of ``bm25s``, with a tokenizer that works across scripts.

Tokenisation (an :class:`Analyzer`) follows Lucene's analyzers, which the BEIR BM25 baselines
(Anserini) use, closely enough to land on their numbers:

* Unicode NFKC, lower-casing, Arabic orthographic normalisation (harakat and tatweel removed;
  alef variants, alef maqsura and teh marbuta folded, as Lucene's ``ArabicNormalizer`` does);
* words are runs of letters, combining marks and digits (``\\p{L}\\p{M}\\p{N}``; so Arabic,
  Devanagari or Thai words are not broken at their vowel signs as ``\\w+`` does), with decimal
  numbers (``3.5``) and apostrophes (``don't``) kept inside a word; English drops a trailing
  possessive ``'s``;
* scripts written without spaces (Han, Hiragana, Katakana; Thai, Lao, Khmer, Myanmar) are cut
  into overlapping character bigrams (a single character stays a unigram), like Lucene's
  ``CJKBigramFilter``; every other word goes through the language's stopword list and then its
  Snowball stemmer (PyStemmer). English uses the original Porter stemmer and Lucene's 33
  English stopwords, as Anserini does.

Scoring is bm25s's (``method="lucene"``, ``k1=0.9``, ``b=0.4`` by default: Anserini's BEIR
settings). bm25s has no incremental add, so :class:`BM25Index` keeps every document's term ids
as numpy arrays and rebuilds the score matrix on ``add``/``delete``, vectorised
(:func:`score_matrix`: a few bytes per document-term pair, no Python list per document). Its state saves to a
:class:`colengine.storage.Bundle` of plain arrays plus JSON (no pickles).
"""

from __future__ import annotations

import unicodedata
from array import array
from collections.abc import Sequence
from typing import Any

import numpy as np
import regex
from tqdm.auto import tqdm

from colengine.csr import distinct_pairs
from colengine.errors import IndexFormatError
from colengine.ids import IdMap, check_offsets, pack_strings, unpack_strings
from colengine.text import check_texts
from colengine.storage import Bundle
from colengine.types import Hit

__all__ = ["Analyzer", "BM25Index", "tokenize", "guess_language", "score_matrix", "LANGUAGES",
           "ANALYZER_VERSION"]

ANALYZER_VERSION = 1

# Arabic stopwords (function words, pronouns, common particles), written already normalised
# (see _normalize_arabic) so they match normalised tokens. Lucene's list is longer; these are
# the frequent ones.
_STOPWORDS_AR = tuple("""
في من على الى إلى عن مع ان أن إن انه انها هو هي هم هن انا أنا نحن انت أنت انتم هذا هذه ذلك
تلك هؤلاء اولئك الذي التي الذين اللذان اللتان اللواتي اللاتي ما ماذا متى اين أين كيف كم لماذا
هل لم لن لا قد كان كانت يكون تكون كانوا ليس ليست او أو ام أم ثم بل لكن لكن حتى اذا إذا اذ
إذ كل بعض غير بين عند عندما حين حيث قبل بعد فوق تحت امام خلف دون منذ مثل ايضا أيضا فقط
كما لقد وقد وهو وهي وفي ومن وعلى والى وان وأن وكان وكانت ولا ولم به بها له لها لهم فيه فيها
منه منها عليه عليها اليه اليها عنه عنها التى الى هناك هنا وهذا وهذه تم يتم او و ف ب ل ك
""".split())

# language code -> (PyStemmer algorithm or None, stopwords: "bm25s:<code>", "ar" or None)
LANGUAGES: dict[str, tuple[str | None, str | None]] = {
    "en": ("porter", "bm25s:en"),
    "ar": ("arabic", "ar"),
    "de": ("german", "bm25s:de"),
    "nl": ("dutch", "bm25s:nl"),
    "fr": ("french", "bm25s:fr"),
    "es": ("spanish", "bm25s:es"),
    "pt": ("portuguese", "bm25s:pt"),
    "it": ("italian", "bm25s:it"),
    "ru": ("russian", "bm25s:ru"),
    "sv": ("swedish", "bm25s:sv"),
    "no": ("norwegian", "bm25s:no"),
    "da": ("danish", "bm25s:da"),
    "tr": ("turkish", "bm25s:tr"),
    "fi": ("finnish", None),
    "hu": ("hungarian", None),
    "ro": ("romanian", None),
    "el": ("greek", None),
    "hi": ("hindi", None),
    "ne": ("nepali", None),
    "fa": ("persian", None),
    "id": ("indonesian", None),
    "ta": ("tamil", None),
    "ca": ("catalan", None),
    "cs": ("czech", None),
    "pl": ("polish", None),
    "lt": ("lithuanian", None),
    "ko": (None, "bm25s:ko"),
    # no stemmer: words as they are; CJK / Thai are bigrammed whatever the language says
    "zh": (None, None),
    "ja": (None, None),
    "th": (None, None),
    "bn": (None, None),
    "te": (None, None),
    "sw": (None, None),
    "yo": (None, None),
    "none": (None, None),
}
_LANGUAGE_NAMES = {
    "english": "en", "arabic": "ar", "german": "de", "dutch": "nl", "french": "fr",
    "spanish": "es", "portuguese": "pt", "italian": "it", "russian": "ru", "swedish": "sv",
    "norwegian": "no", "danish": "da", "turkish": "tr", "finnish": "fi", "hungarian": "hu",
    "romanian": "ro", "greek": "el", "hindi": "hi", "nepali": "ne", "persian": "fa",
    "indonesian": "id", "tamil": "ta", "catalan": "ca", "czech": "cs", "polish": "pl",
    "lithuanian": "lt", "korean": "ko", "chinese": "zh", "japanese": "ja", "thai": "th",
    "bengali": "bn", "telugu": "te", "swahili": "sw", "yoruba": "yo",
}

# A word: letters / marks / digits, optionally joined by apostrophes; or a decimal number.
_WORD_RE = regex.compile(
    r"\p{N}+(?:[.,]\p{N}+)+|[\p{L}\p{M}\p{N}_]+(?:['’][\p{L}\p{M}\p{N}_]+)*"
)
# Scripts written without spaces between words: bigrammed. Two classes so that a Thai run
# next to a Han run is not joined into one bigram.
_CJK_RE = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}ー]+")
_SEA_RE = regex.compile(r"[\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}]+")
_NOSPACE_RE = regex.compile(
    r"([\p{Han}\p{Hiragana}\p{Katakana}ー]+|[\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}]+)"
)
_AR_DIACRITICS_RE = regex.compile(r"[\u064B-\u065F\u0670\u0640]")
_AR_FOLD = str.maketrans({"أ": "ا", "إ": "ا", "آ": "ا", "ٱ": "ا", "ى": "ي", "ة": "ه"})
_APOSTROPHES = str.maketrans({"'": None, "’": None})


def _normalize_arabic(s: str) -> str:
    return _AR_DIACRITICS_RE.sub("", s).translate(_AR_FOLD)


def resolve_language(language: str | None) -> str:
    """Normalise a language code or English name (``"en"``, ``"Arabic"``, ``None``)."""
    if language is None:
        return "none"
    if not isinstance(language, str):
        raise TypeError(f"language must be a string, got {type(language).__name__}")
    code = language.strip().lower()
    code = _LANGUAGE_NAMES.get(code, code)
    code = code.split("-")[0].split("_")[0] if code not in LANGUAGES else code
    if code not in LANGUAGES:
        raise ValueError(
            f"unsupported BM25 language {language!r}; known: {', '.join(sorted(LANGUAGES))} "
            "(use 'none' for no stemming or stopwords)"
        )
    return code


def _bigrams(run: str) -> list[str]:
    """Overlapping bigrams of grapheme clusters (a Thai tone mark stays on its consonant)."""
    g = regex.findall(r"\X", run)
    if len(g) == 1:
        return g
    return [g[i] + g[i + 1] for i in range(len(g) - 1)]


class Analyzer:
    """Text -> list of index terms for one language (see the module docstring).

    >>> Analyzer("en")("The cells were dividing rapidly, weren't they? 3.5 mg")
    ['cell', 'were', 'divid', 'rapidli', 'werent', '3.5', 'mg']
    >>> Analyzer("zh")("检索系统")
    ['检索', '索系', '系统']
    """

    def __init__(self, language: str | None = "en", *, stopwords: Sequence[str] | None = None,
                 stemmer: str | None | bool = True) -> None:
        self.language = resolve_language(language)
        stem_name, stop_name = LANGUAGES[self.language]
        if stemmer is not True:
            stem_name = stemmer or None
        if stopwords is None:
            stopwords = self._default_stopwords(stop_name)
        norm = (_normalize_arabic(unicodedata.normalize("NFKC", w).lower()) for w in stopwords)
        self.stopwords: frozenset[str] = frozenset(w.translate(_APOSTROPHES) for w in norm)
        self.stemmer_name = stem_name
        self._cache: dict[str, str | None] = {}
        self._stem = None
        if stem_name is not None:
            import Stemmer

            self._stem = Stemmer.Stemmer(stem_name).stemWord

    @staticmethod
    def _default_stopwords(name: str | None) -> tuple[str, ...]:
        if name is None:
            return ()
        if name == "ar":
            return _STOPWORDS_AR
        from bm25s.tokenization import _infer_stopwords

        return tuple(_infer_stopwords(name.split(":", 1)[1]))

    def describe(self) -> dict[str, Any]:
        return {"language": self.language, "stemmer": self.stemmer_name,
                "version": ANALYZER_VERSION}

    def _word(self, w: str) -> str | None:
        t = self._cache.get(w, 0)
        if t == 0:
            t = None if w in self.stopwords else (self._stem(w) if self._stem is not None else w)
            if len(self._cache) < (1 << 20):
                self._cache[w] = t
        return t

    def __call__(self, text: str) -> list[str]:
        text = _normalize_arabic(unicodedata.normalize("NFKC", text).lower())
        english = self.language == "en"
        word = self._word
        if _NOSPACE_RE.search(text) is None:  # fast path: no CJK / Thai anywhere
            out = []
            for tok in _WORD_RE.findall(text):
                if "'" in tok or "’" in tok:
                    if english and tok.endswith(("'s", "’s")):
                        tok = tok[:-2]
                    tok = tok.translate(_APOSTROPHES)
                t = word(tok)
                if t:
                    out.append(t)
            return out
        out = []
        for tok in _WORD_RE.findall(text):
            if "'" in tok or "’" in tok:
                if english and tok.endswith(("'s", "’s")):
                    tok = tok[:-2]
                tok = tok.translate(_APOSTROPHES)
            for part in _NOSPACE_RE.split(tok):  # alternating: other, no-space run, other, ...
                if not part:
                    continue
                if _CJK_RE.fullmatch(part) or _SEA_RE.fullmatch(part):
                    out.extend(_bigrams(part))
                else:
                    t = word(part)
                    if t:
                        out.append(t)
        return out


_SCRIPT_LANG = [  # (script regex, language) checked on a sample of the corpus
    (r"\p{Hiragana}|\p{Katakana}", "ja"), (r"\p{Han}", "zh"), (r"\p{Thai}", "th"),
    (r"\p{Hangul}", "ko"), (r"\p{Arabic}", "ar"), (r"\p{Cyrillic}", "ru"),
    (r"\p{Devanagari}", "hi"), (r"\p{Greek}", "el"),
]


def guess_language(texts: Sequence[str], sample: int = 200) -> str:
    """The BM25 language a corpus most likely needs, from the scripts of its letters.

    Only scripts decide (Arabic -> ``ar``, kana -> ``ja``, Han -> ``zh``, Thai -> ``th``, ...);
    a Latin-script corpus is taken as English. The one rule for ``colengine index --bm25``,
    ``Retriever.build(bm25=True)`` and ``colengine eval``.
    """
    import regex

    chunk = " ".join(t[:2000] for t in texts[:sample])
    letters = max(1, len(regex.findall(r"\p{L}", chunk)))
    for pat, lang in _SCRIPT_LANG:
        if len(regex.findall(pat, chunk)) / letters > 0.15:
            return lang
    return "en"


def tokenize(texts: Sequence[str], language: str | None = "en") -> list[list[str]]:
    """Tokenise ``texts`` with :class:`Analyzer` ``(language)``."""
    a = Analyzer(language)
    return [a(t) for t in texts]


_DEFAULT_PARAMS = {"k1": 0.9, "b": 0.4, "method": "lucene", "delta": 0.5}
#: methods whose score matrix :func:`score_matrix` builds (bm25l / bm25+ go through bm25s)
_NUMPY_METHODS = ("lucene", "robertson", "atire")


def score_matrix(doc_terms: np.ndarray, doc_offsets: np.ndarray, n_terms: int,
                 params: dict[str, Any]) -> dict:
    """bm25s's score matrix (CSC over terms: ``data``, ``indices`` = documents, ``indptr``,
    ``num_docs``) for the ``lucene``, ``robertson`` and ``atire`` methods, computed with
    vectorised numpy from packed term ids (``doc_terms`` int32, ``doc_offsets`` int64 ``[N+1]``)
    instead of bm25s's per-document Python loop over lists of ids: memory stays a few bytes per
    (document, term) pair, so a million-document corpus needs no list of lists. Same formulas
    and float32 arithmetic as bm25s (tested equal to it).

    >>> m = score_matrix(np.array([0, 1, 0, 1, 1], np.int32), np.array([0, 2, 5]), 2,
    ...                  {"method": "lucene", "k1": 0.9, "b": 0.4})
    >>> m["indptr"].tolist(), m["indices"].tolist(), m["num_docs"]
    ([0, 2, 4], [0, 1, 0, 1], 2)
    """
    method, k1, b = params["method"], float(params["k1"]), float(params["b"])
    if method not in _NUMPY_METHODS:
        raise ValueError(f"score_matrix computes {_NUMPY_METHODS}, not {method!r}")
    n = doc_offsets.shape[0] - 1
    dl = np.diff(doc_offsets)
    avg = float(dl.mean()) if n else 0.0
    doc, term, tf = distinct_pairs(doc_terms, doc_offsets, n_terms, counts=True)
    doc, term, tf = doc.astype(np.int32), term.astype(np.int32), tf.astype(np.float32)
    df = np.bincount(term, minlength=n_terms).astype(np.float64)
    with np.errstate(divide="ignore"):
        if method == "lucene":
            idf = np.log(1 + (n - df + 0.5) / (df + 0.5))
        elif method == "robertson":
            idf = np.log(np.maximum((n - df + 0.5) / (df + 0.5), 1.0))
        else:  # atire
            idf = np.log(n / df)
    idf = np.where(df > 0, idf, 0.0).astype(np.float32)
    # bm25s computes the length normalisation per document in float64 and adds it to the
    # float32 term frequencies
    norm = (k1 * ((1 - b) + (b * dl) / avg)).astype(np.float32) if avg > 0 \
        else np.full(n, k1 * (1 - b), dtype=np.float32)
    if method == "atire":
        tfc = (tf * np.float32(k1 + 1)) / (tf + norm[doc])
    else:
        tfc = tf / (norm[doc] + tf)
    score = idf[term] * tfc
    order = np.argsort(term, kind="stable")    # CSC: by term, documents ascending within
    indptr = np.zeros(n_terms + 1, dtype=np.int64)
    np.cumsum(np.bincount(term, minlength=n_terms), out=indptr[1:])
    return {"data": score[order], "indices": doc[order], "indptr": indptr, "num_docs": n}



class BM25Index:
    """A BM25 index over documents with string ids.

    ``build(texts, ids, language="en", k1=0.9, b=0.4, method="lucene")``; ``search`` returns,
    per query, up to ``k`` :class:`Hit` s of documents sharing at least one term with it, best
    first (ties: earlier-added document first).

    >>> idx = BM25Index.build(["red apples", "green pears", "apple pie"], ["a", "b", "c"],
    ...                       show_progress=False)
    >>> [h.doc_id for h in idx.search(["apple"], k=5)[0]]
    ['a', 'c']
    """

    kind = "bm25"

    def __init__(self, ids: IdMap, vocab: list[str], doc_terms: np.ndarray, doc_offsets: np.ndarray,
                 *, analyzer: Analyzer, params: dict[str, Any], scores: dict | None = None,
                 show_progress: bool = False) -> None:
        if len(ids) != doc_offsets.shape[0] - 1:
            raise ValueError(f"{len(ids)} ids for {doc_offsets.shape[0] - 1} documents")
        self.ids = ids
        self.analyzer = analyzer
        self.params = {**_DEFAULT_PARAMS, **params}
        self._vocab = vocab
        self._vocab_map = {t: i for i, t in enumerate(vocab)}
        self._doc_terms = np.ascontiguousarray(doc_terms, dtype=np.int32)
        self._doc_offsets = np.ascontiguousarray(doc_offsets, dtype=np.int64)
        self._bm25 = self._new_bm25()
        if scores is None or self.params["method"] in ("bm25l", "bm25+"):
            # bm25l / bm25+ also need a per-term non-occurrence array: rebuild rather than store
            self._reindex(show_progress=show_progress)
        else:
            self._set_scores(scores)

    # -- construction ----------------------------------------------------------------
    @classmethod
    def build(cls, texts: Sequence[str], ids: Sequence[str] | None = None, *,
              language: str | None = "en",
              show_progress: bool = True, **bm25_params: Any) -> "BM25Index":
        """Tokenise and index ``texts``. ``bm25_params``: ``k1``, ``b``, ``method``, ``delta``
        (bm25s's; defaults k1=0.9, b=0.4, method="lucene", as Anserini's BEIR runs)."""
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError("documents must be a list of strings, not "
                            f"{'a single string' if isinstance(texts, str) else type(texts).__name__}")
        if not len(texts):
            raise ValueError("cannot build a BM25 index from an empty corpus")
        ids = [str(i) for i in range(len(texts))] if ids is None else list(ids)
        if len(ids) != len(texts):
            raise ValueError(f"got {len(ids)} ids for {len(texts)} documents")
        unknown = set(bm25_params) - set(_DEFAULT_PARAMS)
        if unknown:
            raise TypeError(f"unknown BM25 parameters: {sorted(unknown)} "
                            f"(known: {sorted(_DEFAULT_PARAMS)})")
        idmap = IdMap(ids)
        analyzer = Analyzer(language)
        vocab: list[str] = []
        vmap: dict[str, int] = {}
        terms, offsets = cls._encode_texts(texts, analyzer, vocab, vmap, show_progress)
        return cls(idmap, vocab, terms, offsets, analyzer=analyzer, params=bm25_params,
                   show_progress=show_progress)

    @staticmethod
    def _encode_texts(texts: Sequence[str], analyzer: Analyzer, vocab: list[str],
                      vmap: dict[str, int], show_progress: bool) -> tuple[np.ndarray, np.ndarray]:
        """Packed term ids and offsets; ``texts`` is read once, in order (a lazy sequence,
        such as a streamed build's view of a corpus on disk, is never held whole)."""
        flat = array("i")            # 4 bytes a term, not a Python list's 8 + an int each
        offsets = np.zeros(len(texts) + 1, dtype=np.int64)
        for i, t in enumerate(tqdm(texts, desc="BM25 tokenising", unit="doc",
                                   disable=not show_progress)):
            if not isinstance(t, str):
                raise TypeError(f"documents[{i}] must be str, got {type(t).__name__}")
            for tok in analyzer(t):
                j = vmap.get(tok)
                if j is None:
                    j = vmap[tok] = len(vocab)
                    vocab.append(tok)
                flat.append(j)
            offsets[i + 1] = len(flat)
        return np.frombuffer(flat, dtype=np.int32).copy(), offsets

    def _new_bm25(self):
        import bm25s

        p = self.params
        return bm25s.BM25(k1=p["k1"], b=p["b"], delta=p["delta"], method=p["method"])

    def _reindex(self, show_progress: bool = False) -> None:
        """Drop unused terms and rebuild the score matrix from the stored term ids."""
        if self._doc_terms.size:
            count = np.bincount(self._doc_terms, minlength=len(self._vocab))
            used = np.flatnonzero(count)
            if used.size != len(self._vocab):
                remap = np.full(len(self._vocab), -1, dtype=np.int32)
                remap[used] = np.arange(used.size, dtype=np.int32)
                self._vocab = [self._vocab[i] for i in used.tolist()]
                self._vocab_map = {t: i for i, t in enumerate(self._vocab)}
                self._doc_terms = remap[self._doc_terms]
        else:
            self._vocab, self._vocab_map = [], {}
        if len(self._vocab) == 0:  # nothing but stopwords: an index that matches nothing
            n = len(self.ids)
            self._set_scores({"data": np.zeros(0, np.float32), "indices": np.zeros(0, np.int32),
                              "indptr": np.zeros(1, np.int32), "num_docs": n})
            return
        if self.params["method"] in _NUMPY_METHODS:
            self._set_scores(score_matrix(self._doc_terms, self._doc_offsets, len(self._vocab),
                                          self.params))
            return
        # bm25l / bm25+ (also a per-term non-occurrence array): bm25s's own builder, which
        # takes a Python list of term ids per document (several times the memory)
        per_doc = [a.tolist() for a in np.split(self._doc_terms, self._doc_offsets[1:-1])]
        scores = self._bm25.build_index_from_ids(
            unique_token_ids=list(range(len(self._vocab))), corpus_token_ids=per_doc,
            show_progress=False,   # bm25s' own bars leave blank lines behind; ours is enough
        )
        self._set_scores(scores)

    def _set_scores(self, scores: dict) -> None:
        if not hasattr(self._bm25, "nonoccurrence_array"):
            self._bm25.nonoccurrence_array = None
        self._bm25.scores = scores
        self._bm25.vocab_dict = self._vocab_map
        self._bm25.unique_token_ids_set = set(range(len(self._vocab)))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def language(self) -> str:
        return self.analyzer.language

    # -- search ----------------------------------------------------------------------
    def query_terms(self, query: str) -> list[int]:
        """Term ids of ``query`` that occur in the index (repeated terms repeat)."""
        return [j for j in (self._vocab_map.get(t) for t in self.analyzer(query)) if j is not None]

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document (internal order) for ``query``; float32 ``[N]``."""
        terms = self.query_terms(query)
        if not terms:
            return np.zeros(len(self), dtype=np.float32)
        return self._bm25.get_scores_from_ids(terms)

    def search(self, queries: list[str], k: int = 100, *, show_progress: bool = False,
               allowed: np.ndarray | None = None) -> list[list[Hit]]:
        """Top-``k`` documents per query, best first; documents matching no term are left out.

        ``allowed`` (a metadata filter): bool ``[len(self)]`` over :attr:`ids` positions; only
        those documents are returned."""
        from colengine.index.base import check_allowed, check_k

        check_k(k)
        queries = check_texts(queries, "queries", allow_blank=True)
        keep = None if allowed is None else check_allowed(allowed, len(self))
        out: list[list[Hit]] = []
        for q in tqdm(queries, desc="BM25 search", unit="query", disable=not show_progress):
            s = self.scores(q)
            if keep is not None:
                s = np.where(allowed, s, np.float32(0))
            pos = np.flatnonzero(s != 0)
            if pos.size > k:
                part = np.argpartition(-s[pos], k - 1)[:k]
                # argpartition may cut inside a tie at the k-th score: include the whole tie,
                # then let the stable order below decide.
                kth = s[pos][part].min()
                pos = pos[s[pos] >= kth]
            order = np.lexsort((pos, -s[pos]))[:k]
            out.append([Hit(self.ids[int(p)], float(s[p])) for p in pos[order]])
        return out

    # -- mutation --------------------------------------------------------------------
    def add(self, texts: list[str], ids: list[str] | None = None, *, show_progress: bool = False
            ) -> list[str]:
        """Append documents (re-indexes; BM25 statistics cover the new corpus). Returns ids."""
        texts = check_texts(texts, "documents", allow_blank=True)
        if not texts:
            return []
        ids = [str(i) for i in range(len(self.ids), len(self.ids) + len(texts))] \
            if ids is None else list(ids)
        if len(ids) != len(texts):
            raise ValueError(f"got {len(ids)} ids for {len(texts)} documents")
        IdMap.check_new(ids, self.ids)
        terms, offsets = self._encode_texts(texts, self.analyzer, self._vocab, self._vocab_map,
                                            show_progress)
        self._doc_terms = np.concatenate([self._doc_terms, terms])
        self._doc_offsets = np.concatenate([self._doc_offsets, offsets[1:] + self._doc_offsets[-1]])
        self.ids.extend(ids)
        self._reindex()
        return ids

    def delete(self, ids: list[str]) -> None:
        """Remove documents by id (all must exist, else :class:`UnknownIdError` and no change)."""
        if isinstance(ids, str):
            raise TypeError("ids must be a list of strings, not a single string")
        pos = self.ids.positions(list(ids))
        keep = np.ones(len(self), dtype=bool)
        keep[pos] = False
        if not keep.any():
            raise ValueError("deleting every document would leave an empty BM25 index")
        lens = np.diff(self._doc_offsets)
        tok_keep = np.repeat(keep, lens)
        self._doc_terms = self._doc_terms[tok_keep]
        new_off = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
        np.cumsum(lens[keep], out=new_off[1:])
        self._doc_offsets = new_off
        self.ids = self.ids.keep(keep)
        self._reindex()

    # -- persistence -----------------------------------------------------------------
    def to_bundle(self) -> Bundle:
        """Plain arrays (ids, vocabulary, per-document term ids, the score matrix) + JSON."""
        vocab_data, vocab_off = pack_strings(self._vocab)
        stop_data, stop_off = pack_strings(sorted(self.analyzer.stopwords))
        sc = self._bm25.scores
        arrays = {
            **self.ids.to_arrays(),
            "vocab_utf8": vocab_data, "vocab_offsets": vocab_off,
            "stopwords_utf8": stop_data, "stopwords_offsets": stop_off,
            "doc_terms": self._doc_terms, "doc_offsets": self._doc_offsets,
            "score_data": np.asarray(sc["data"]), "score_indices": np.asarray(sc["indices"]),
            "score_indptr": np.asarray(sc["indptr"]),
        }
        import bm25s

        meta = {
            "params": dict(self.params), "analyzer": self.analyzer.describe(),
            "n_documents": len(self), "n_terms": len(self._vocab),
            "bm25s_version": bm25s.__version__,
        }
        return Bundle(kind=self.kind, meta=meta, arrays=arrays)

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> "BM25Index":
        a, meta = bundle.arrays, bundle.meta
        try:
            an = meta["analyzer"]
            if an.get("version") != ANALYZER_VERSION:
                raise IndexFormatError(
                    f"BM25 analyzer version {an.get('version')!r} is not supported "
                    f"(this colengine writes version {ANALYZER_VERSION})")
            analyzer = Analyzer(an["language"],
                                stopwords=unpack_strings(a["stopwords_utf8"], a["stopwords_offsets"]),
                                stemmer=an["stemmer"] or False)
            ids = IdMap.from_arrays(a)
            vocab = unpack_strings(a["vocab_utf8"], a["vocab_offsets"])
            doc_terms = np.asarray(a["doc_terms"])
            doc_offsets = np.asarray(a["doc_offsets"])
            scores = {"data": np.asarray(a["score_data"]), "indices": np.asarray(a["score_indices"]),
                      "indptr": np.asarray(a["score_indptr"]), "num_docs": len(ids)}
        except (KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
            raise IndexFormatError(f"BM25 index arrays are missing or inconsistent: {e}") from e
        if doc_offsets.shape[0] != len(ids) + 1 or int(doc_offsets[-1]) != doc_terms.shape[0] \
                or scores["indptr"].shape[0] != max(len(vocab), 0) + 1 \
                or (doc_terms.size and (int(doc_terms.max()) >= len(vocab) or int(doc_terms.min()) < 0)):
            raise IndexFormatError("BM25 index arrays are inconsistent (ids, terms and vocabulary "
                                   "do not agree)")
        try:   # cheap O(N) structure checks: a tampered array fails here, not with wrong hits
            check_offsets(doc_offsets, doc_terms.shape[0], "BM25 document offsets")
            if len(vocab):
                check_offsets(scores["indptr"], scores["data"].shape[0], "BM25 score indptr")
            idx = scores["indices"]
            if idx.shape != scores["data"].shape or (idx.size and (int(idx.min()) < 0
                                                                   or int(idx.max()) >= len(ids))):
                raise ValueError("BM25 score indices point outside the documents")
            if not np.isfinite(scores["data"]).all():
                raise ValueError("BM25 scores hold NaN or Inf")
        except ValueError as e:
            raise IndexFormatError(f"BM25 index arrays are inconsistent: {e}") from None
        if len(vocab) == 0:
            scores["indptr"] = np.zeros(1, np.int32)
        return cls(ids, vocab, doc_terms, doc_offsets, analyzer=analyzer,
                   params=meta.get("params", {}), scores=scores)

    def stats(self) -> dict[str, Any]:
        return {"kind": self.kind, "documents": len(self), "terms": len(self._vocab),
                "postings": int(np.asarray(self._bm25.scores["data"]).shape[0]),
                "language": self.language, **self.params}
