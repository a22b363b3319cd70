"""Greedy forward selection of a group's channels, in rounds of matrix-matrix work.

Keeping a set S of channels and reconstructing the others by least squares leaves the
consumers the error ``tr(Q A)``, ``A = Σ - Σ_:S Σ_SS⁻¹ Σ_S:`` the conditional covariance and
``Q = B Bᵀ`` the consumers' fan-out energy. Adding channel j removes
``gain_j = |Bᵀ a_j|² / A_jj`` (a_j the column j of A), and A loses ``a_j a_jᵀ / A_jj``.

Plain greedy updates every channel's gain after each pick: two C x C matrix-vector
products per step, C³ memory-bound work per group (ResNet-50's 2048-channel group took
most of a minute). Here a round takes a pool of the best candidates by the gains at its
start and runs exact greedy on the pool alone (A and Y = A B restricted to the pool rows:
p x p and p x r updates per step); then one commit brings every channel up to date with
matrix-matrix products (the new factor columns are ``A[:, J] L⁻ᵀ``, L the pool's Cholesky
factor of the picked channels). The curve is exact for the order taken: every gain is
computed from the current conditional covariance. A group of at most POOL channels is
one pool: plain greedy. Worked example: C = 2048, POOL = 128: 32 rounds of 64 picks each.

The products are skinny (64 picks, a pool of 128), where BLAS threads gain little and
their spin-waits cost a lot on a shared machine: the selection runs on one BLAS thread
(ResNet-50 on a busy 2-core machine: 4.0 CPU s instead of 30).
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import blas, lapack, solve_triangular
from threadpoolctl import threadpool_limits

POOL = 128  # candidates per round
MIN_PICKS, MAX_PICKS = 16, 64  # picks per round when the pool is not the whole group


def forward_order(gm, candidates: list[np.ndarray]) -> tuple[list[int], np.ndarray]:
    """Greedy forward selection over candidate tiers; returns the order and error(k).

    `gm.points` holds (Q, Σ, μ) per read point; the gains of all points add up. Once the
    selected channels explain everything (rank-deficient statistics: fewer samples than
    channels), the rest follow in index order at zero gain."""
    with threadpool_limits(limits=1, user_api="blas"):
        return _forward_order(gm, candidates)


def _forward_order(gm, candidates: list[np.ndarray]) -> tuple[list[int], np.ndarray]:
    n = gm.group.size
    points = [_Point(q, s) for q, s, _ in gm.points.values()]
    err = sum(p.error for p in points)
    curve = np.zeros(n + 1)
    curve[0] = err
    order: list[int] = []
    for tier in candidates:
        left = [int(c) for c in tier]
        while left:
            gains = sum(p.gains(left) for p in points)
            if not np.any(gains > 0):
                order.extend(left)
                curve[len(order) - len(left) + 1:len(order) + 1] = err
                break
            ranked = np.argsort(-gains, kind="stable")
            pool = [left[i] for i in ranked[:POOL]]
            outside = float(gains[ranked[POOL]]) if len(left) > POOL else -np.inf
            for j, drop in _round(points, pool, outside):
                err = max(err - drop, 0.0)
                order.append(j)
                curve[len(order)] = err
            taken = set(order)
            left = [c for c in left if c not in taken]
    return order, curve


def _round(points: list[_Point], pool: list[int], outside: float
           ) -> list[tuple[int, float]]:
    """Exact greedy on `pool`; then every point commits the picks. The round ends when
    the best pool gain falls below `outside` (the best gain outside the pool at the
    round's start: gains mostly shrink as channels are explained, so a channel outside
    may now be the best), after at least MIN_PICKS picks, or after MAX_PICKS."""
    states = [p.pool_state(pool) for p in points]
    open_ = np.ones(len(pool), dtype=bool)
    picked: list[tuple[int, float]] = []
    limit = len(pool) if outside == -np.inf else MAX_PICKS  # the whole group: plain greedy
    while len(picked) < limit and open_.any():
        gains = np.where(open_, sum(s.gains() for s in states), -np.inf)
        jj = int(np.argmax(gains))
        if not gains[jj] > 0 or (gains[jj] < outside and len(picked) >= MIN_PICKS):
            break
        open_[jj] = False
        picked.append((pool[jj], float(sum(s.select(jj) for s in states))))
    for p, s in zip(points, states, strict=True):
        p.commit(s, pool)
    return picked


def fanout_factor(q: np.ndarray) -> np.ndarray:
    """B with ``B Bᵀ = Q`` and rank(Q) columns (pivoted Cholesky): a 1x1 convolution that
    reduces 2048 channels to 512 gives 512 columns, and the work shrinks with them."""
    c, piv, rank, _ = lapack.dpstrf(np.asarray(q, dtype=np.float64), lower=1)
    b = np.empty((len(q), rank))
    b[piv - 1] = np.tril(c)[:, :rank]
    return b


class _Pool:
    """One point's view of a round: A and Y = A B on the pool rows, and the picks.

    The rank-one updates run in place (BLAS ger on the transposed, Fortran-ordered views):
    numpy's ``a -= np.outer(u, v)`` writes a temporary and reads it back, three passes
    over Y per pick instead of one."""

    def __init__(self, a: np.ndarray, y: np.ndarray, tol: float) -> None:
        self.a = np.asfortranarray(a)  # A[pool, pool], updated per pick (symmetric)
        self.yt = np.asfortranarray(y.T)  # (A B)[pool] transposed, r x p, updated per pick
        self.tol = tol
        self.picks: list[int] = []  # pool positions this point explained (A_jj > tol)
        self.factor: list[np.ndarray] = []  # their factor columns on the pool rows

    def gains(self) -> np.ndarray:
        a = np.diag(self.a)
        b = np.einsum("ij,ij->j", self.yt, self.yt)
        live = a > self.tol  # a channel the selected ones already explain gains nothing
        return np.where(live, b / np.where(live, a, 1.0), 0.0)

    def select(self, jj: int) -> float:
        d = self.a[jj, jj]
        if d <= self.tol:
            return 0.0
        u, yj = self.a[:, jj].copy(), self.yt[:, jj].copy()
        gain = float(yj @ yj) / d
        blas.dger(-1.0 / d, u, u, a=self.a, overwrite_a=True)
        blas.dger(-1.0 / d, yj, u, a=self.yt, overwrite_a=True)
        self.picks.append(jj)
        self.factor.append(u / np.sqrt(d))
        return gain


class _Point:
    """One read point's state: the factor F of the explained part (A = Σ - F Fᵀ), the
    projected residual Y = A B, and the diagonals of A and of A Q A = Y Yᵀ."""

    def __init__(self, q: np.ndarray, sigma: np.ndarray) -> None:
        self.sigma = sigma
        self.b = fanout_factor(q)
        self.y = sigma @ self.b
        self.factor = np.zeros((len(sigma), len(sigma)))  # first `taken` columns in use
        self.taken = 0
        self.diag_a = np.diag(sigma).copy()
        self.diag_b = np.einsum("ij,ij->i", self.y, self.y)
        self.error = float(np.sum(self.b * self.y))  # tr(Q Σ)
        self.tol = 1e-9 * max(float(self.diag_a.max(initial=0.0)), 1e-30)

    def gains(self, left: list[int]) -> np.ndarray:
        a, b = self.diag_a[left], self.diag_b[left]
        live = a > self.tol
        return np.where(live, np.maximum(b, 0.0) / np.where(live, a, 1.0), 0.0)

    def pool_state(self, pool: list[int]) -> _Pool:
        """A on the pool only (p x p): the columns of every channel are needed for the
        picks alone, at the commit (C x m, not C x p: half the work of a round)."""
        f = self.factor[pool, :self.taken]
        return _Pool(self.sigma[np.ix_(pool, pool)] - f @ f.T, self.y[pool], self.tol)

    def commit(self, state: _Pool, pool: list[int]) -> None:
        """Fold the round's picks into F, Y and the diagonals for every channel."""
        if not state.picks:
            return
        picked = [pool[jj] for jj in state.picks]
        f = self.factor[:, :self.taken]
        cols = self.sigma[picked].T - f @ f[picked].T  # A[:, picked]; Σ symmetric: rows
        lower = np.stack(state.factor, axis=1)[state.picks]  # m x m, lower triangular
        new = solve_triangular(lower, cols.T, lower=True, check_finite=False).T  # C x m
        self.factor[:, self.taken:self.taken + new.shape[1]] = new
        self.taken += new.shape[1]
        self.y -= new @ (new.T @ self.b)
        self.diag_a -= np.einsum("ij,ij->i", new, new)
        self.diag_b = np.einsum("ij,ij->i", self.y, self.y)
