"""Bootstrap confidence intervals and paired bootstrap tests for ratio-of-sums metrics.

Every metric in this package is a function of column *sums* over per-sample records: a POPE sample adds
one to exactly one of ``tp``/``fp``/``fn``/``tn``, a caption adds its mention counts, and accuracy, CHAIR_i,
recall, ... are ratios of those sums. A metric is therefore given as ``fn(sums) -> values`` where
``sums[name]`` is a float array of shape ``[R]`` (one entry per bootstrap replicate, or ``[1]`` for the
point estimate), so all replicates are evaluated in one vectorised call.

Resampling is over samples (rows), with replacement, from a fixed seed (Efron & Tibshirani 1993, ch. 13,
percentile interval). The paired test resamples the *same* rows for two models scored on the same samples
and tests the null "no difference" with the centred bootstrap (Efron & Tibshirani 1993, ch. 16;
Berg-Kirkpatrick et al. 2012): p = (1 + #{|d* - d| >= |d|}) / (1 + B).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

Columns = Mapping[str, np.ndarray]
MetricFn = Callable[[Mapping[str, np.ndarray]], np.ndarray]

# Replicates are summed in chunks so memory stays at CHUNK x n indices, whatever n_boot is.
_CHUNK = 128


@dataclass(frozen=True)
class MetricValue:
    """A metric's point estimate, the number of resampled samples, and its bootstrap interval."""

    value: float
    n: int
    ci_low: float
    ci_high: float

    def to_json(self) -> dict[str, float | int | None]:
        return {"value": _finite(self.value), "n": self.n, "ci_low": _finite(self.ci_low),
                "ci_high": _finite(self.ci_high)}


@dataclass(frozen=True)
class PairedResult:
    """Difference ``a - b`` of one metric on the same samples, its bootstrap interval and p-value."""

    value_a: float
    value_b: float
    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    n: int

    def to_json(self) -> dict[str, float | int | None]:
        return {key: _finite(val) if isinstance(val, float) else val for key, val in vars(self).items()}


def _finite(x: float) -> float | None:
    """JSON has no NaN: an undefined ratio (zero denominator) is written as null."""
    return None if math.isnan(x) else float(x)


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Elementwise ``num / den`` with NaN where ``den == 0`` (an undefined metric, not zero)."""
    num = np.asarray(num, dtype=float)
    den = np.asarray(den, dtype=float)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _check_columns(columns: Columns) -> int:
    lengths = {name: len(col) for name, col in columns.items()}
    if not lengths or len(set(lengths.values())) != 1:
        raise ValueError(f"per-sample columns must be non-empty and of equal length, got {lengths}")
    return next(iter(lengths.values()))


def point_estimates(columns: Columns, metrics: Mapping[str, MetricFn]) -> dict[str, float]:
    """Each metric on the full sample: ``columns[name]`` has shape ``[n]``."""
    _check_columns(columns)
    sums = {name: np.asarray(col, dtype=float).sum(keepdims=True) for name, col in columns.items()}
    return {name: float(fn(sums)[0]) for name, fn in metrics.items()}


def _replicate_sums(columns: Columns, n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """Column sums of ``n_boot`` resamples of the rows: each array has shape ``[n_boot]``."""
    n = _check_columns(columns)
    rng = np.random.default_rng(seed)
    stacked = np.stack([np.asarray(col, dtype=float) for col in columns.values()], axis=1)  # [n, K]
    out = np.empty((n_boot, stacked.shape[1]))
    for start in range(0, n_boot, _CHUNK):
        stop = min(start + _CHUNK, n_boot)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = stacked[idx].sum(axis=1)
    return {name: out[:, k] for k, name in enumerate(columns)}


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        return math.nan, math.nan
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap(columns: Columns, metrics: Mapping[str, MetricFn], *, n_boot: int = 1000, seed: int = 0,
              level: float = 0.95) -> dict[str, MetricValue]:
    """Point estimate and percentile bootstrap interval of every metric.

    ``columns[name]``: shape ``[n]`` per-sample values. Replicates where a metric is undefined (zero
    denominator) are left out of its interval.
    """
    if n_boot < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got n_boot={n_boot}, level={level}")
    n = _check_columns(columns)
    points = point_estimates(columns, metrics)
    sums = _replicate_sums(columns, n_boot, seed)
    out = {}
    for name, fn in metrics.items():
        low, high = _interval(fn(sums), level)
        out[name] = MetricValue(points[name], n, low, high)
    return out


def paired_bootstrap(columns_a: Columns, columns_b: Columns, metrics: Mapping[str, MetricFn], *,
                     n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, PairedResult]:
    """Paired bootstrap of ``metric(a) - metric(b)`` where row i of both is the same sample.

    ``columns_a`` and ``columns_b`` hold the same column names, each of shape ``[n]``. The two models are
    resampled with the same row indices, so sample difficulty cancels in the difference.
    """
    n = _check_columns(columns_a)
    if _check_columns(columns_b) != n or set(columns_a) != set(columns_b):
        raise ValueError("paired bootstrap needs the same columns over the same samples for both models")
    # Stack a and b as one table so one index draw resamples both identically.
    joint = {f"a:{k}": columns_a[k] for k in columns_a} | {f"b:{k}": columns_b[k] for k in columns_a}
    sums = _replicate_sums(joint, n_boot, seed)
    sums_a = {k: sums[f"a:{k}"] for k in columns_a}
    sums_b = {k: sums[f"b:{k}"] for k in columns_a}
    points_a = point_estimates(columns_a, metrics)
    points_b = point_estimates(columns_b, metrics)
    out = {}
    for name, fn in metrics.items():
        diff = points_a[name] - points_b[name]
        diffs = fn(sums_a) - fn(sums_b)
        diffs = diffs[~np.isnan(diffs)]
        low, high = _interval(diffs, level)
        if math.isnan(diff) or diffs.size == 0:
            p_value = math.nan
        else:
            extreme = int(np.sum(np.abs(diffs - diff) >= abs(diff)))
            p_value = (1 + extreme) / (1 + diffs.size)
        out[name] = PairedResult(points_a[name], points_b[name], diff, low, high, p_value, n)
    return out
