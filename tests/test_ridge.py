"""Ridge base learner: closed form, both forms, gradients, weighting and the unpenalised bias."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

from models.ridge import RidgeBaseLearner, class_balanced_weights, ridge_solve

D64 = torch.float64


def _problem(b: int, n: int, d: int, c: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, d, generator=g, dtype=D64), torch.randn(
        b, n, c, generator=g, dtype=D64
    )


@pytest.mark.parametrize(("n", "d"), [(30, 6), (5, 12), (9, 9)])
def test_primal_equals_dual(n: int, d: int) -> None:
    X, Y = _problem(3, n, d, 4)
    lam = torch.tensor([0.1, 1.0, 7.5], dtype=D64)
    primal = ridge_solve(X, Y, lam, form="primal")
    dual = ridge_solve(X, Y, lam, form="dual")
    assert primal.shape == (3, d, 4)
    torch.testing.assert_close(primal, dual, atol=1e-8, rtol=0)


def test_matches_lstsq_on_augmented_system() -> None:
    # min ||XW - Y||² + λ||W||² is ordinary least squares on [X; √λ I] W ≈ [Y; 0].
    X, Y = _problem(2, 40, 8, 3, seed=1)
    lam = 0.7
    X_aug = torch.cat([X, math.sqrt(lam) * torch.eye(8, dtype=D64).expand(2, 8, 8)], dim=1)
    Y_aug = torch.cat([Y, torch.zeros(2, 8, 3, dtype=D64)], dim=1)
    expected = torch.linalg.lstsq(X_aug, Y_aug).solution
    for form in ("primal", "dual", "auto"):
        torch.testing.assert_close(ridge_solve(X, Y, lam, form=form), expected, atol=1e-8, rtol=0)


@pytest.mark.parametrize("form", ["primal", "dual"])
def test_gradcheck_solve(form: str) -> None:
    X, Y = _problem(2, 6, 4, 3, seed=2)
    lam = torch.tensor([0.5, 2.0], dtype=D64)
    inputs = tuple(t.clone().requires_grad_() for t in (X, Y, lam))
    assert gradcheck(lambda x, y, lam_: ridge_solve(x, y, lam_, form=form), inputs)


def test_gradcheck_base_learner() -> None:
    # Through centring, class-balanced weights, the bias and the log-parametrised λ and scale.
    torch.manual_seed(0)
    learner = RidgeBaseLearner(init_lambda=0.3, init_scale=2.0).double()
    Xs = torch.randn(2, 12, 3, dtype=D64, requires_grad=True)
    labels = torch.randint(0, 3, (2, 12))
    Y = torch.nn.functional.one_hot(labels, 3).to(D64)
    Y[:, 0] = 0  # an ignored pixel
    Xq = torch.randn(2, 5, 3, dtype=D64, requires_grad=True)
    log_lam = torch.tensor(math.log(0.3), dtype=D64, requires_grad=True)
    log_scale = torch.tensor(math.log(2.0), dtype=D64, requires_grad=True)

    def f(xs: torch.Tensor, xq: torch.Tensor, ll: torch.Tensor, ls: torch.Tensor) -> torch.Tensor:
        params = {"log_lambda": ll, "log_scale": ls}
        return functional_call(learner, params, (xs, Y, xq))

    assert gradcheck(f, (Xs, Xq, log_lam, log_scale))


def test_auto_picks_smaller_system(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    solve = torch.linalg.solve

    def recording_solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        sizes.append(A.shape[-1])
        return solve(A, B)

    monkeypatch.setattr(torch.linalg, "solve", recording_solve)
    ridge_solve(*_problem(1, 50, 4, 2), 1.0)  # many pixels, few dims: primal d×d
    ridge_solve(*_problem(1, 3, 20, 2), 1.0)  # few samples, many dims: dual n×n
    assert sizes == [4, 3]
    with pytest.raises(ValueError):
        ridge_solve(*_problem(1, 3, 2, 2), 1.0, form="kernel")  # type: ignore[arg-type]


def test_fit_has_unpenalised_bias_and_weights() -> None:
    # Reference: weighted ridge on [X, 1] with the penalty diag(λ, ..., λ, 0).
    X, _ = _problem(2, 25, 5, 3, seed=3)
    labels = torch.randint(0, 3, (2, 25), generator=torch.Generator().manual_seed(4))
    Y = torch.nn.functional.one_hot(labels, 3).to(D64)
    learner = RidgeBaseLearner(init_lambda=0.4).double()
    W = learner.fit(X, Y)
    assert W.shape == (2, 6, 3)

    w = class_balanced_weights(Y)
    Xa = torch.cat([X, torch.ones(2, 25, 1, dtype=D64)], dim=-1)
    lam = learner.lam.item()  # float32 parameter: exp(log 0.4) is 0.4 only to ~1e-7
    penalty = torch.diag(torch.tensor([lam] * 5 + [0.0], dtype=D64))
    wn = (w / w.sum(1, keepdim=True)).unsqueeze(-1)
    expected = torch.linalg.solve(Xa.mT @ (wn * Xa) + penalty, Xa.mT @ (wn * Y))
    torch.testing.assert_close(W, expected, atol=1e-10, rtol=0)

    # Rescaling the weights changes nothing (they are normalised); zero weight = row removed.
    torch.testing.assert_close(learner.fit(X, Y, weight=5 * w), W)
    keep = torch.ones(2, 25, dtype=D64)
    keep[:, :4] = 0
    dropped = RidgeBaseLearner(init_lambda=0.4, balance=False).double()
    torch.testing.assert_close(
        dropped.fit(X, Y, weight=keep), dropped.fit(X[:, 4:], Y[:, 4:]), atol=1e-10, rtol=0
    )


def test_class_balanced_weights() -> None:
    labels = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 2, 2]])
    Y = torch.nn.functional.one_hot(labels, 3).float()
    Y[0, 0] = 0  # ignored pixel
    w = class_balanced_weights(Y)
    assert w[0, 0] == 0
    per_class = torch.stack([w[0][labels[0] == c].sum() for c in range(3)])
    torch.testing.assert_close(per_class, torch.full((3,), 1 / 3))
    # A class absent from the support gets no mass and the others still share it equally.
    w2 = class_balanced_weights(Y[..., :2].contiguous())
    torch.testing.assert_close(w2.sum(), torch.tensor(1.0))


def test_separable_support_is_classified_and_params_positive() -> None:
    torch.manual_seed(0)
    centres = torch.randn(3, 16) * 3
    labels = torch.randint(0, 3, (1, 200))
    X = centres[labels] + 0.3 * torch.randn(1, 200, 16)
    Y = torch.nn.functional.one_hot(labels, 3).float()
    learner = RidgeBaseLearner()
    assert learner.lam.item() == pytest.approx(1.0) and learner.scale.item() == pytest.approx(10.0)
    logits = learner(X[:, :150], Y[:, :150], X[:, 150:])
    assert (logits.argmax(-1) == labels[:, 150:]).float().mean() > 0.95
    frozen = RidgeBaseLearner(learn_lambda=False, learn_scale=False)
    assert list(frozen.parameters()) == [] and frozen.lam > 0


def test_empty_support_and_low_precision() -> None:
    torch.manual_seed(0)
    learner = RidgeBaseLearner()
    X = torch.randn(2, 30, 8, requires_grad=True)
    Xq = torch.randn(2, 5, 8)
    out = learner(X, torch.zeros(2, 30, 3), Xq)  # every support pixel ignored
    assert torch.equal(out, torch.zeros(2, 5, 3))
    out.sum().backward()
    assert torch.isfinite(X.grad).all()

    Y = torch.nn.functional.one_hot(torch.randint(0, 3, (2, 30)), 3).float()
    X16 = X.detach().bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        W = learner.fit(X16, Y.bfloat16())
    assert W.dtype == torch.float32
    torch.testing.assert_close(W, learner.fit(X16.float(), Y))
