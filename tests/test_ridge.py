"""The ridge head: the one-factorisation λ path equals a direct dense solve per λ."""

from __future__ import annotations

import pytest
import torch

from retain.layers.ridge import (
    RANPAC_LAMBDAS,
    RidgeStatistics,
    lambda_path_errors,
    ridge_path,
    select_lambda,
)


@pytest.mark.parametrize("n,m", [(60, 150), (200, 80)])  # SVD route (n < M) and eigh route
def test_path_equals_direct_solve_for_every_lambda(n, m):
    g = torch.Generator().manual_seed(0)
    h = torch.relu(torch.randn(n, m, generator=g, dtype=torch.float64))
    y = torch.nn.functional.one_hot(torch.randint(0, 5, (n,), generator=g), 5).double()
    lambdas = (1e-2, 1e-1, 1.0, 1e2, 1e4)
    path = ridge_path(h, y, lambdas)
    for lam, w in zip(lambdas, path, strict=True):
        direct = torch.linalg.solve(h.T @ h + lam * torch.eye(m, dtype=torch.float64), h.T @ y)
        rel = (w - direct).norm() / direct.norm()
        assert rel < 1e-4, (lam, float(rel))


def test_statistics_are_order_invariant_and_equal_joint_ridge():
    g = torch.Generator().manual_seed(1)
    h1, h2 = torch.randn(30, 20, generator=g), torch.randn(25, 20, generator=g)
    y1, y2 = torch.randint(0, 3, (30,), generator=g), torch.randint(3, 5, (25,), generator=g)
    a, b = RidgeStatistics(20), RidgeStatistics(20)
    a.update(h1, y1, 3)
    a.update(h2, y2, 5)
    b.update(h2, y2, 5)
    b.update(h1, y1, 5)
    torch.testing.assert_close(a.solve(0.5), b.solve(0.5))
    h, y = torch.cat([h1, h2]).double(), torch.cat([y1, y2])
    joint = torch.linalg.solve(h.T @ h + 0.5 * torch.eye(20, dtype=torch.float64),
                               h.T @ torch.nn.functional.one_hot(y, 5).double())
    torch.testing.assert_close(a.solve(0.5), joint)


def test_lambda_errors_match_direct_and_selection_prefers_regularising_noise():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(80, 40, generator=g, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.randint(0, 4, (80,), generator=g), 4).double()
    errs = lambda_path_errors(h[:60], y[:60], h[60:], y[60:], RANPAC_LAMBDAS)
    lam = 1e2
    w = torch.linalg.solve(h[:60].T @ h[:60] + lam * torch.eye(40, dtype=torch.float64),
                           h[:60].T @ y[:60])
    direct = ((h[60:] @ w - y[60:]) ** 2).mean()
    torch.testing.assert_close(errs[RANPAC_LAMBDAS.index(lam)], direct)
    # labels are noise: the best λ is a large one (shrink towards zero)
    chosen, _ = select_lambda(h, torch.randint(0, 4, (80,), generator=g), 4,
                              torch.Generator().manual_seed(0))
    assert chosen >= 1.0


def test_stratified_folds_match_scikit_learn():
    sklearn = pytest.importorskip("sklearn.model_selection")
    import numpy as np

    from retain.layers.ridge import stratified_folds

    y = np.random.RandomState(0).randint(0, 5, 103)
    ours = stratified_folds(y, 4)
    for f, (_, test) in enumerate(sklearn.StratifiedKFold(4, shuffle=False).split(y, y)):
        assert set(np.flatnonzero(ours == f)) == set(test)


def test_cv_lambda_matches_direct_solves():
    import numpy as np

    from retain.layers.ridge import LAYUP_LAMBDAS, select_lambda_cv, stratified_folds

    g = torch.Generator().manual_seed(3)
    prev = RidgeStatistics(12)
    prev.update(torch.randn(20, 12, generator=g), torch.randint(0, 3, (20,), generator=g), 3)
    h, y = torch.randn(40, 12, generator=g), torch.randint(3, 5, (40,), generator=g)
    lam, accs = select_lambda_cv(h, y, 5, prev)
    fold_of = stratified_folds(y.numpy(), 4)
    onehot = torch.nn.functional.one_hot(y, 5).double()
    direct = np.zeros(len(LAYUP_LAMBDAS))
    for f in range(4):
        tr, va = fold_of != f, fold_of == f
        gram = prev.gram + h[tr].double().T @ h[tr].double()
        cross = torch.cat([prev.cross, torch.zeros(12, 2, dtype=torch.float64)], 1)
        cross = cross + h[tr].double().T @ onehot[tr]
        for i, lmb in enumerate(LAYUP_LAMBDAS):
            w = torch.linalg.solve(gram + lmb * torch.eye(12, dtype=torch.float64), cross)
            direct[i] += float(((h[va].double() @ w).argmax(1) == y[va]).double().mean()) / 4
    np.testing.assert_allclose(accs, direct, atol=1e-9)
    assert lam == LAYUP_LAMBDAS[int(np.argmax(direct))]
