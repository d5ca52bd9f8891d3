"""The outlier count of a Hessian spectrum: eigenvalues well above the edge of the bulk.

With the top eigenvalues lambda_1 >= ... >= lambda_k, the k-th stands for the edge of the bulk,
and the outliers are those above ``ratio`` times it: #{i < k : lambda_i > r max(lambda_k, 0)}
(Sagun et al. 2017; Papyan 2019 finds about one per class, C of them). It needs k larger than
the number of outliers.
"""

from __future__ import annotations

from typing import Sequence


def count_outliers(eigenvalues: Sequence[float], ratio: float = 2.0) -> int:
    """The number of eigenvalues above ``ratio`` times the bulk's edge (the module docstring's rule).

    Args:
        eigenvalues: the top-k eigenvalues, largest first; the last one stands for the bulk edge.
        ratio: how far above the edge an outlier lies.
    """
    values = [float(v) for v in eigenvalues]
    if len(values) < 2:
        return 0
    threshold = ratio * max(values[-1], 0.0)
    return sum(1 for v in values[:-1] if v > threshold)
