"""How good each quantized GGUF file is, as llama.cpp itself runs it.

llama.cpp runs the 16-bit GGUF of the merge (the merged weights, as stored) and each quantized
file on the same fixed token sequences; the score is the mean KL divergence of the quantized
file's next-token distribution from the 16-bit one's, and how often their top-1 tokens agree:
what ``llama-perplexity --kl-divergence`` reports, on a few sequences instead of a dataset.
The 16-bit logits are computed first and the 16-bit model is freed before any quantized one is
loaded, so only one model is in memory at a time.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mergeflow.engine.gguf_quant import quiet_llama

#: The fixed texts the files are scored on (plain prose, code and numbers, a chat turn).
TEXTS = (
    "The history of the river valley begins long before the first farms were planted. Glaciers "
    "carved the hills, and the water that followed left a plain of deep, dark soil.",
    "def merge(base, adapter, scale):\n    for name, weight in base.items():\n        "
    "weight += scale * adapter[name]\n    return base\n",
    "In 2024 the committee met 12 times, approved 7 of 9 proposals, and spent 48.5% of its "
    "budget; the rest, about 1,250,000 euros, carries over to next year.",
    "Question: what is the capital of France, and why did it become the capital? Answer: Paris, "
    "because the kings who unified the country ruled from it.",
)
MAX_TOKENS = 48  # per text (192 in all: a few percent of a run, see docs/benchmarks.md)


@dataclass(frozen=True)
class GgufScore:
    """One file's score against the 16-bit reference."""

    file: str
    reference: str
    tokens: int  # positions scored
    mean_kl: float  # nats per token
    top1: float  # share of positions where both pick the same next token

    def words(self) -> str:
        """The score in one line (for the report's notes and the model card)."""
        return (f"{self.file}: mean KL {self.mean_kl:.4g} nats and top-1 agreement "
                f"{self.top1:.1%} against {self.reference} over {self.tokens} tokens "
                "(llama.cpp)")


@contextlib.contextmanager
def _no_native_stderr() -> Iterator[None]:
    """llama.cpp prints some lines (context sizes, on freeing a model) straight to file
    descriptor 2, past any Python logger; keep them out of the user's terminal."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _load(path: Path, threads: int):
    import llama_cpp

    with quiet_llama(), _no_native_stderr():
        return llama_cpp.Llama(str(path), n_ctx=MAX_TOKENS, n_batch=MAX_TOKENS, logits_all=True,
                               verbose=False, n_threads=threads, seed=0)


def _logits(llm, ids: list[int]) -> np.ndarray:
    """Next-token logits at every position of ``ids``; (n, vocab) float64."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float64)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """(n, vocab) -> (n, vocab), rows normalized in log space."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def score_files(reference: Path, files: list[Path], threads: int = 1) -> list[GgufScore]:
    """Score each of ``files`` against the 16-bit ``reference`` GGUF (see the module's text)."""
    ref = _load(reference, threads)
    sequences = [ref.tokenize(text.encode(), add_bos=True)[:MAX_TOKENS] for text in TEXTS]
    want = [_log_softmax(_logits(ref, ids)) for ids in sequences]  # each (n, vocab)
    with _no_native_stderr():
        ref.close()
    scores = []
    for path in files:
        llm = _load(path, threads)
        kl, agree, count = 0.0, 0, 0
        for ids, log_p in zip(sequences, want, strict=True):
            log_q = _log_softmax(_logits(llm, ids))  # (n, vocab)
            kl += float((np.exp(log_p) * (log_p - log_q)).sum())
            agree += int((log_p.argmax(-1) == log_q.argmax(-1)).sum())
            count += len(ids)
        with _no_native_stderr():
            llm.close()
        scores.append(GgufScore(path.name, reference.name, count, kl / count, agree / count))
    return scores
