"""Degradation diversity (the paper's Section 4.3.1): the entropy of a dataset's degradation labels, and the labels
section of its dataset card. Pure Python and NumPy, so `factory stats` and the build's card need no torch.

H = -sum_c P(c) log P(c) over the proportions of predicted classes (Eq. 2), in nats (natural log) by default: the
paper does not state the base; Figure 8's values stay below ln(15) = 2.71, the maximum in nats, which log2 (maximum
3.91) would not make a bound.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from factory.corruption_names import CORRUPTIONS


def degradation_entropy(labels: Iterable[str | None] | Mapping[str, int], base: float = math.e) -> float:
    """H = -sum_c P(c) log_base P(c), P(c) the proportion of class c (the paper's Eq. 2); 0 log 0 = 0.

    `labels`: the per-pair labels (None, an unlabelled pair, is skipped) or a {class: count} mapping. Nats by
    default. Raises ValueError when nothing is labelled."""
    counts = (
        Counter({name: count for name, count in labels.items() if count})
        if isinstance(labels, Mapping)
        else (Counter(label for label in labels if label is not None))
    )
    if any(count < 0 for count in counts.values()):
        raise ValueError("class counts must not be negative")
    total = sum(counts.values())
    if total == 0:
        raise ValueError("degradation_entropy needs at least one labelled pair")
    proportions = np.array([count / total for count in counts.values()], dtype=np.float64)
    entropy = float(-(proportions * np.log(proportions)).sum() / math.log(base))
    return entropy if entropy > 0 else 0.0  # a single class gives -0.0, and max(-0.0, 0.0) would keep it


def labels_card(
    labels: Iterable[str | None], classifier_sha256s: Iterable[str | None]
) -> dict[str, Any] | None:
    """The `labels` section of a dataset card, from the dataset's `label` and `classifier_sha256` columns: pairs per
    class (all 15), unlabelled pairs, the classifier(s) that labelled them and the diversity entropy H in nats.
    None when no pair is labelled."""
    labels = list(labels)
    counts = Counter(label for label in labels if label is not None)
    if not counts:
        return None
    return {
        "counts": {name: counts.get(name, 0) for name in CORRUPTIONS},
        "unlabelled": len(labels) - sum(counts.values()),
        "classifier_sha256": sorted({sha256 for sha256 in classifier_sha256s if sha256}),
        "entropy": degradation_entropy(counts),
        "entropy_unit": "nats (paper Eq. 2, natural log)",
    }
