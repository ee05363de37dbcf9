"""Near-duplicate detection between prompts, for the validation set's leak check.

An exact match after normalising catches a copied test prompt but not a reworded one ("What happened
during X?" against "What happened in X?"). This index compares character 3-5-gram TF-IDF vectors
(scikit-learn) by cosine similarity, which scores such rewordings above 0.9 and unrelated prompts
that merely share a form ("How do I ... ?") below 0.5.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

# Cosine similarity at or above which a prompt counts as a copy of an evaluation prompt.
NEAR_DUPLICATE = 0.9


@dataclass(frozen=True)
class Match:
    """The most similar reference text to a query, with their cosine similarity."""

    query: str
    nearest: str
    similarity: float


class NearDuplicateIndex:
    """Finds, for any text, the most similar of a fixed set of reference texts."""

    def __init__(self, references: Iterable[str]) -> None:
        self.references = sorted(set(references))
        self._vectorizer = TfidfVectorizer(
            analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True, lowercase=True
        )
        if self.references:
            self._matrix = self._vectorizer.fit_transform(self.references)

    def nearest(self, queries: Sequence[str]) -> list[Match]:
        """For each query, the reference text it is most similar to."""
        if not queries:
            return []
        if not self.references:
            return [Match(q, "", 0.0) for q in queries]
        scores = self._vectorizer.transform(list(queries)) @ self._matrix.T
        best = np.asarray(scores.max(axis=1).todense()).ravel()
        where = np.asarray(scores.argmax(axis=1)).ravel()
        return [
            Match(q, self.references[int(i)], float(s))
            for q, i, s in zip(queries, where, best, strict=True)
        ]

    def near_copies(self, queries: Sequence[str], threshold: float = NEAR_DUPLICATE) -> list[Match]:
        """The queries at least ``threshold`` similar to some reference text."""
        return [m for m in self.nearest(queries) if m.similarity >= threshold]
