"""Drift: how far an index has moved from what its centroids and codec were trained on.

The index keeps a small record in its manifest (``meta["drift"]``, :func:`fresh_drift`), adds
to it on every ``add`` (:func:`record_added`), and :func:`drift_report` turns it into the
figures ``PlaidIndex.drift()`` returns. Pure functions over plain values.

>>> d = fresh_drift(rows=10, tokens=1000, residual_norm=0.3)
>>> record_added(d, tokens=1500, norm_sum=1500 * 0.45)
>>> r = drift_report(d, lengths=np.full(25, 100), deleted=np.zeros(25, bool))
>>> round(r["added_token_share"], 3), round(r["residual_norm_ratio"], 2), r["high"]
(0.6, 1.5, True)
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["DRIFT_MIN_TOKENS", "DRIFT_NORM_RATIO", "DRIFT_TOKEN_SHARE", "drift_report",
           "fresh_drift", "record_added"]

#: drift above either of these warns on add() (once, until retrain()): share of the live tokens
#: added after the centroids were trained, and mean residual norm of the added tokens over the
#: mean residual norm of the tokens the centroids were built with.
DRIFT_TOKEN_SHARE = 0.5
DRIFT_NORM_RATIO = 1.25
#: the residual norm ratio only counts towards "high" drift once this many tokens (and 1% of
#: the trained ones) were added: a few documents' mean residual norm is noise
DRIFT_MIN_TOKENS = 1000


def fresh_drift(rows: int, tokens: int, residual_norm: float | None) -> dict[str, Any]:
    """The drift record of an index just trained on ``rows`` documents of ``tokens`` tokens
    whose mean residual norm was ``residual_norm`` (``None``: unknown)."""
    return {"trained_rows": int(rows), "trained_tokens": int(tokens),
            "train_residual_norm": None if residual_norm is None else float(residual_norm),
            "added_tokens": 0, "added_residual_norm_sum": 0.0, "warned": False}


def record_added(d: dict[str, Any], tokens: int, norm_sum: float) -> None:
    """Count ``tokens`` added tokens whose residual norms sum to ``norm_sum`` in record ``d``."""
    d["added_tokens"] = int(d["added_tokens"]) + int(tokens)
    d["added_residual_norm_sum"] = float(d["added_residual_norm_sum"]) + float(norm_sum)


def drift_report(d: dict[str, Any], lengths: np.ndarray, deleted: np.ndarray) -> dict[str, Any]:
    """The drift figures of record ``d`` for stored rows of ``lengths`` tokens (tombstoned
    where ``deleted``); rows past ``d["trained_rows"]`` were added after training.

    ``added_token_share``: share of the live tokens in documents added after training;
    ``tokens_added_since_training``: all tokens added since (deleted ones included);
    ``mean_residual_norm_trained`` / ``_added``: mean L2 norm of token - centroid over the
    tokens indexed at training time / added since (``None`` if unknown or none);
    ``residual_norm_ratio``: added / trained; ``high``: share > :data:`DRIFT_TOKEN_SHARE` or
    ratio > :data:`DRIFT_NORM_RATIO` over at least :data:`DRIFT_MIN_TOKENS` added tokens.
    """
    lengths = np.asarray(lengths)
    live = ~np.asarray(deleted, dtype=bool)
    tr = int(d["trained_rows"])
    live_tok = int(lengths[live].sum())
    added_live = int(lengths[tr:][live[tr:]].sum())
    share = added_live / max(1, live_tok)
    n_add = int(d["added_tokens"])
    m_add = float(d["added_residual_norm_sum"]) / n_add if n_add else None
    m_tr = d.get("train_residual_norm")
    ratio = m_add / m_tr if (m_add is not None and m_tr) else None
    return {
        "added_token_share": share,
        "live_tokens_added": added_live,
        "tokens_added_since_training": n_add,
        "trained_tokens": int(d["trained_tokens"]),
        "mean_residual_norm_trained": m_tr,
        "mean_residual_norm_added": m_add,
        "residual_norm_ratio": ratio,
        "high": bool(share > DRIFT_TOKEN_SHARE or (
            ratio is not None and ratio > DRIFT_NORM_RATIO
            and n_add >= max(DRIFT_MIN_TOKENS, 0.01 * int(d["trained_tokens"])))),
        "thresholds": {"added_token_share": DRIFT_TOKEN_SHARE,
                       "residual_norm_ratio": DRIFT_NORM_RATIO},
    }
