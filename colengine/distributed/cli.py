"""``colengine index DATA --shards N [--ray-address ADDR]``: the sharded side of the CLI."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any


def check_sharded_args(args: argparse.Namespace) -> None:
    """Options a sharded build does not take, refused before the corpus is read."""
    if args.shards < 1:
        raise SystemExit(f"error: --shards must be at least 1, got {args.shards}")
    bad = [flag for flag, on in (("--bm25", args.bm25 is not None), ("--tune", args.tune),
                                 ("--stream", bool(args.stream)),
                                 ("--pool-factor", args.pool_factor not in (None, 1)),
                                 ("--cache-dir", args.cache_dir is not None)) if on]
    if bad:
        raise SystemExit(f"error: {', '.join(bad)} cannot be combined with --shards "
                         "(a sharded index is dense only, built by Ray tasks)")
    if args.ray_address is None and args.shards > 64:
        raise SystemExit("error: more than 64 shards on a local Ray; pass --ray-address")
    try:
        import ray  # noqa: F401
    except ImportError:
        raise SystemExit("error: --shards needs Ray: pip install 'colengine[ray]'") from None


def index_sharded(args: argparse.Namespace, ids: list[str], docs: list[Any],
                  metadata: list) -> int:
    """Build the sharded index and print one summary line."""
    from colengine.distributed import ShardedRetriever

    kwargs: dict[str, Any] = {}
    if any(m is not None for m in metadata):
        kwargs["metadata"] = metadata
    if args.nbits is not None:
        kwargs["nbits"] = args.nbits
    if args.refine is not None:
        kwargs["refine"] = args.refine
    t0 = time.perf_counter()
    r = ShardedRetriever.build(docs, ids=ids, model=args.model, shards=args.shards,
                               path=args.out, ray_address=args.ray_address,
                               index=args.index or "plaid", device=args.device,
                               batch_size=args.batch_size, overwrite=args.overwrite,
                               trust_remote_code=args.trust_remote_code or None, **kwargs)
    tokens = r.meta["build"]["tokens"]
    sizes = ", ".join(str(s["documents"]) for s in r.meta["shards"])
    r.close()
    print(f"indexed {len(r)} documents ({tokens} tokens) into {args.out} in "
          f"{time.perf_counter() - t0:.1f}s [{r.kind}, {r.n_shards} shards: {sizes} documents]",
          file=sys.stdout)
    return 0


def search_sharded(args: argparse.Namespace, queries: list[str], flt: Any,
                   knobs: dict[str, Any]) -> list:
    """``colengine search`` on a sharded index (the late-interaction pipeline only)."""
    if args.pipeline not in ("late", "plaid", "exhaustive"):
        raise ValueError(f"--pipeline {args.pipeline}: a sharded index serves 'late' only")
    try:
        from colengine.distributed import ShardedRetriever
    except ImportError as e:
        raise SystemExit(f"error: {e}") from None
    r = ShardedRetriever.load(args.path, model=args.model, device=args.device,
                              trust_remote_code=args.trust_remote_code or None)
    try:
        if args.pipeline in ("plaid", "exhaustive") and args.pipeline != r.kind:
            raise ValueError(f"--pipeline {args.pipeline}: this index is {r.kind!r}")
        return r.search_batch(queries, k=args.k, filter=flt, return_text=args.show_text,
                              return_metadata=args.show_text, **knobs)
    finally:
        r.close()
