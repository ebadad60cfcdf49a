"""Scaling analysis: t(n) ≈ a + b·n + c·n² (non-negative least squares), local log-log slopes, the
doubling ratio t(2n)/t(n), and verdicts in words. Pure numpy; no plotting."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Fit:
    a: float
    b: float
    c: float
    slopes: list[float]  # local log-log slope between consecutive points
    doubling: float | None  # t(2n)/t(n) at the top of the range (from the data where it has 2n and n)
    r2: float

    def predict(self, n: float) -> float:
        return self.a + self.b * n + self.c * n * n

    def as_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "c": self.c, "slopes": self.slopes, "doubling": self.doubling, "r2": self.r2}


def _nnls3(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with non-negative coefficients, by trying every support set (3 unknowns)."""
    best, best_err = np.zeros(X.shape[1]), math.inf
    cols = range(X.shape[1])
    for mask in range(1, 1 << X.shape[1]):
        idx = [i for i in cols if mask >> i & 1]
        coef, *_ = np.linalg.lstsq(X[:, idx], y, rcond=None)
        if (coef < 0).any():
            continue
        full = np.zeros(X.shape[1])
        full[idx] = coef
        err = float(((X @ full - y) ** 2).sum())
        if err < best_err:
            best, best_err = full, err
    return best


def fit_scaling(n: list[float], t: list[float]) -> Fit | None:
    pts = sorted((float(a), float(b)) for a, b in zip(n, t) if b is not None and b > 0 and math.isfinite(b))
    if len(pts) < 2:
        return None
    N = np.array([p[0] for p in pts])
    T = np.array([p[1] for p in pts])
    # weight by 1/t so small contexts count as much as large ones (relative error)
    X = np.stack([np.ones_like(N), N, N * N], axis=1) / T[:, None]
    coef = _nnls3(X, np.ones_like(T))
    pred = coef[0] + coef[1] * N + coef[2] * N * N
    ss_res = float(((np.log(pred.clip(1e-30)) - np.log(T)) ** 2).sum())
    ss_tot = float(((np.log(T) - np.log(T).mean()) ** 2).sum()) or 1.0
    slopes = [math.log(T[i + 1] / T[i]) / math.log(N[i + 1] / N[i]) for i in range(len(N) - 1) if N[i + 1] > N[i]]
    doubling = None
    byn = dict(pts)
    for top in sorted(byn, reverse=True):
        if top / 2 in byn:
            doubling = byn[top] / byn[top / 2]
            break
    if doubling is None and len(slopes):
        doubling = 2 ** slopes[-1]
    return Fit(float(coef[0]), float(coef[1]), float(coef[2]), slopes, doubling, 1 - ss_res / ss_tot)


# How a cost's growth per doubling of context reads: below FLAT_DOUBLING flat, below LINEAR_DOUBLING
# linear (2x), below QUADRATIC_DOUBLING between the two, else quadratic (4x).
FLAT_DOUBLING, LINEAR_DOUBLING, QUADRATIC_DOUBLING = 1.5, 2.6, 3.4


def describe(label: str, fit: Fit | None) -> str:
    """'Mamba layers: linear (doubling 2.0x)' / 'attention layers: quadratic (doubling 3.8x)'."""
    if fit is None or fit.doubling is None:
        return f"{label}: not enough points to fit"
    d = fit.doubling
    if d < FLAT_DOUBLING:
        kind = "flat"
    elif d < LINEAR_DOUBLING:
        kind = "linear"
    elif d < QUADRATIC_DOUBLING:
        kind = "between linear and quadratic"
    else:
        kind = "quadratic"
    return f"{label}: {kind} (doubling {d:.1f}x)"
