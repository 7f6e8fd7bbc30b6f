"""Closed-form ridge heads accumulated across tasks (RanPAC, LayUP).

``RidgeStatistics`` keeps G = Σ HᵀH and Q = Σ HᵀY over every task seen, so the head
W = (G + λI)⁻¹ Q equals a joint ridge regression on all data, whatever the task order
(McDonnell et al., RanPAC, NeurIPS 2023, Alg. 1).

``lambda_path_errors`` scores every candidate λ on a held-out part at the cost of one
eigendecomposition of the training part instead of one dense solve per λ: of HHᵀ (n x n) when
there are fewer samples than features, W(λ) = Hᵀ U diag(1/(e + λ)) Uᵀ Y (the push-through
identity), else of HᵀH = V diag(e) Vᵀ with W(λ) = V diag(1/(e + λ)) Vᵀ HᵀY. Both are exact.
"""

from __future__ import annotations

import numpy as np
import torch

RANPAC_LAMBDAS = tuple(10.0**k for k in range(-8, 9))  # the official 17 candidates


class RidgeStatistics:
    """Running G (M, M) and Q (M, C) in float64; C grows with the classes."""

    def __init__(self, dim: int):
        self.gram = torch.zeros(dim, dim, dtype=torch.float64)  # (M, M)
        self.cross = torch.zeros(dim, 0, dtype=torch.float64)  # (M, C)

    def update(self, h: torch.Tensor, y: torch.Tensor, num_classes: int) -> None:
        """Add features ``h`` (N, M) with integer labels ``y`` (N,) over ``num_classes``."""
        h = h.double()
        onehot = torch.nn.functional.one_hot(y, num_classes).double()  # (N, C)
        self.cross = _pad(self.cross, num_classes)
        self.gram += h.T @ h
        self.cross += h.T @ onehot

    def solve(self, lam: float) -> torch.Tensor:
        """W = (G + λI)⁻¹ Q (M, C): by Cholesky; when G + λI is numerically singular (tiny λ,
        fewer samples than features) by least squares, which returns the minimum-norm answer."""
        a = self.gram + lam * torch.eye(len(self.gram), dtype=torch.float64)
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            return torch.cholesky_solve(self.cross, chol)
        return torch.linalg.lstsq(a, self.cross, driver="gelsd").solution

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}gram": self.gram, f"{prefix}cross": self.cross}

    def load(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        self.gram, self.cross = state[f"{prefix}gram"].double(), state[f"{prefix}cross"].double()


def _factorise(h: torch.Tensor, y: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Eigendecomposition of the smaller Gram matrix of ``h`` (N, M): (vectors, eigenvalues,
    targets projected on them, dual). Dual (N < M): HHᵀ = U diag(e) Uᵀ and
    W(λ) = Hᵀ U diag(1/(e+λ)) Uᵀ Y; primal: HᵀH = V diag(e) Vᵀ and W(λ) = V diag(1/(e+λ)) Vᵀ HᵀY.
    """
    dual = h.shape[0] < h.shape[1]
    e, vec = torch.linalg.eigh(h @ h.T if dual else h.T @ h)  # (r,), (r, r)
    proj = vec.T @ (y if dual else h.T @ y)  # (r, C)
    return vec, e.clamp_min(0), proj, dual


def _scales(e: torch.Tensor, lambdas: tuple[float, ...]) -> torch.Tensor:
    lam = torch.tensor(lambdas, dtype=torch.float64).view(-1, 1)  # (L, 1)
    return 1.0 / (e + lam)  # (L, r)


def ridge_path(h: torch.Tensor, y: torch.Tensor, lambdas: tuple[float, ...]) -> torch.Tensor:
    """(L, M, C) ridge solutions of ``h`` (N, M) onto targets ``y`` (N, C) for every λ, from a
    single eigendecomposition."""
    h, y = h.double(), y.double()
    vec, e, proj, dual = _factorise(h, y)
    basis = h.T @ vec if dual else vec  # (M, r)
    return basis.unsqueeze(0) @ (_scales(e, lambdas).unsqueeze(-1) * proj.unsqueeze(0))


def lambda_path_errors(h_train: torch.Tensor, y_train: torch.Tensor, h_val: torch.Tensor,
                       y_val: torch.Tensor, lambdas: tuple[float, ...]) -> torch.Tensor:
    """(L,) mean squared error on the held-out part of the ridge head fitted for each λ; the
    heads themselves are never formed (validation features are projected on the basis once)."""
    h_train, y_train, h_val = h_train.double(), y_train.double(), h_val.double()
    vec, e, proj, dual = _factorise(h_train, y_train)
    val = (h_val @ h_train.T) @ vec if dual else h_val @ vec  # (N_val, r)
    pred = val.unsqueeze(0) @ (_scales(e, lambdas).unsqueeze(-1) * proj.unsqueeze(0))
    return ((pred - y_val.double()) ** 2).mean(dim=(1, 2))  # pred: (L, N_val, C)


def select_lambda(h: torch.Tensor, y: torch.Tensor, num_classes: int, generator: torch.Generator,
                  lambdas: tuple[float, ...] = RANPAC_LAMBDAS, train_fraction: float = 0.8
                  ) -> tuple[float, torch.Tensor]:
    """RanPAC's λ choice: shuffle the current task's data, fit on the first 80 %, keep the λ with
    the lowest MSE on the last 20 %. Returns (λ, errors per candidate)."""
    perm = torch.randperm(len(h), generator=generator)
    cut = int(train_fraction * len(h))
    onehot = torch.nn.functional.one_hot(y, num_classes).double()  # (N, C)
    tr, va = perm[:cut], perm[cut:]
    errors = lambda_path_errors(h[tr], onehot[tr], h[va], onehot[va], lambdas)
    return lambdas[int(errors.argmin())], errors


LAYUP_LAMBDAS = tuple(float(v) for v in np.logspace(-4, 3, 15)) + (1e-8,)  # LayUP's candidates


def stratified_folds(y: np.ndarray, folds: int) -> np.ndarray:
    """Fold of each sample, as scikit-learn's ``StratifiedKFold(shuffle=False)`` assigns them:
    within each class, samples in order fill fold 0, then fold 1, ..."""
    _, first, inverse = np.unique(y, return_index=True, return_inverse=True)
    encoded = np.argsort(np.argsort(first))[inverse]  # classes numbered by first appearance
    classes = first
    order = np.sort(encoded)
    allocation = np.array([np.bincount(order[i::folds], minlength=len(classes))
                           for i in range(folds)])  # (folds, K)
    fold_of = np.empty(len(y), dtype=np.int64)
    for k in range(len(classes)):
        fold_of[encoded == k] = np.arange(folds).repeat(allocation[:, k])
    return fold_of


def select_lambda_cv(h: torch.Tensor, y: torch.Tensor, num_classes: int,
                     previous: RidgeStatistics, lambdas: tuple[float, ...] = LAYUP_LAMBDAS,
                     folds: int = 4) -> tuple[float, np.ndarray]:
    """LayUP's λ choice: stratified k-fold CV on the current task with the previous G and Q
    added in, accuracy criterion; one eigendecomposition per fold serves every λ.
    Returns (λ, mean validation accuracy per candidate)."""
    h = h.double()
    onehot = torch.nn.functional.one_hot(y, num_classes).double()  # (N, C)
    fold_of = stratified_folds(y.numpy(), folds)
    accs = []
    for f in range(folds):
        tr, va = torch.from_numpy(fold_of != f), torch.from_numpy(fold_of == f)
        gram = previous.gram + h[tr].T @ h[tr]  # (M, M)
        cross = _pad(previous.cross, num_classes) + h[tr].T @ onehot[tr]  # (M, C)
        e, v = torch.linalg.eigh(gram)
        proj = v.T @ cross  # (M, C)
        val = h[va] @ v  # (N_va, M)
        lam = torch.tensor(lambdas, dtype=torch.float64).view(-1, 1, 1)  # (L, 1, 1)
        pred = val.unsqueeze(0) @ (proj.unsqueeze(0) / (e.clamp_min(0).view(1, -1, 1) + lam))
        accs.append((pred.argmax(-1) == y[va]).double().mean(1).numpy())  # (L,)
    mean = np.mean(accs, axis=0)
    return lambdas[int(np.argmax(mean))], mean


def _pad(cross: torch.Tensor, num_classes: int) -> torch.Tensor:
    extra = num_classes - cross.shape[1]
    return torch.cat([cross, cross.new_zeros(cross.shape[0], extra)], 1) if extra > 0 else cross
