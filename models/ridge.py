"""Differentiable closed-form ridge regression, the base learner of MetaSegNet.

As in R2-D2 (Bertinetto et al., ICLR 2019, Sec. 3.2) and MetaOptNet-RR (Lee et al., CVPR 2019),
a linear classifier is fitted to the support set by ridge regression onto one-hot targets, in
closed form, so that the query loss back-propagates through the solver into the embedding and
into the regulariser λ and the output scale, which are meta-learned.

Weighting: support pixels are dominated by background (often >90 %), so by default every class
present in the support gets the same total weight and pixels inside a class share it equally
(``balance=True``). Weights are normalised to sum to one per episode, which makes λ mean the same
thing whatever the number of shots or the feature-map size.

Bias: fitted but *not* penalised (the usual ridge formulation, Hastie et al., ESL Sec. 3.4.1):
the features and targets are centred with the weighted means, the ridge is solved on the centred
data and the bias is recovered as ``ȳ - x̄ᵀW``. Penalising a ones-column instead would shrink
every prediction toward zero by an amount that depends on λ, which the learned scale would then
have to undo.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

Form = Literal["auto", "primal", "dual"]


def ridge_solve(X: Tensor, Y: Tensor, lam: Tensor | float, form: Form = "auto") -> Tensor:
    """Minimise ``||XW - Y||² + λ||W||²`` for every batch element.

    X: (B, n, d), Y: (B, n, C), lam: scalar or (B,) → W: (B, d, C). The primal form solves the
    d×d system ``(XᵀX + λI)W = XᵀY``; the dual form solves the n×n system ``(XXᵀ + λI)A = Y``
    and returns ``W = XᵀA`` (same minimiser, push-through identity). ``"auto"`` picks the
    smaller system. ``torch.linalg.solve`` (LU) is used rather than an explicit inverse.
    Half-precision inputs (autocast) are solved, and returned, in float32: LU has no fp16/bf16
    kernels and the normal equations lose too much precision there.
    """
    n, d = X.shape[-2], X.shape[-1]
    if form == "auto":
        form = "primal" if d <= n else "dual"
    if form not in ("primal", "dual"):
        raise ValueError(f"form must be 'auto', 'primal' or 'dual', not {form!r}")
    with torch.autocast(X.device.type, enabled=False):
        X, Y = _full_precision(X), _full_precision(Y)
        lam = torch.as_tensor(lam, device=X.device).to(X.dtype).reshape(-1, 1, 1)
        Xt = X.transpose(-1, -2)
        if form == "primal":
            eye = torch.eye(d, dtype=X.dtype, device=X.device)
            return torch.linalg.solve(Xt @ X + lam * eye, Xt @ Y)
        eye = torch.eye(n, dtype=X.dtype, device=X.device)
        return Xt @ torch.linalg.solve(X @ Xt + lam * eye, Y)


def _full_precision(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def class_balanced_weights(Y: Tensor) -> Tensor:
    """Per-row weights (B, n) giving each class present in ``Y`` (B, n, C) equal total mass.

    Rows whose target sums to zero (ignored pixels, padding) get weight zero. Soft targets are
    allowed: a row's weight is ``Σ_c Y_ic / (C_present · n_c)`` with ``n_c = Σ_i Y_ic``.
    """
    mass = Y.sum(dim=1, keepdim=True)  # (B, 1, C)
    present = (mass > 0).sum(dim=-1, keepdim=True).clamp(min=1)  # (B, 1, 1)
    # Clamp rather than torch.where on 1/mass: an inf in the unused branch would poison gradients.
    per_class = (mass > 0).to(Y.dtype) / (mass.clamp(min=torch.finfo(Y.dtype).tiny) * present)
    return (Y * per_class).sum(dim=-1)


class RidgeBaseLearner(nn.Module):
    """Weighted ridge regression classifier with an unpenalised bias and learnable λ, scale.

    λ and the scale are stored as logarithms so they stay positive (R2-D2 learns both, Sec. 3.2).
    """

    def __init__(
        self,
        init_lambda: float = 1.0,
        init_scale: float = 10.0,
        learn_lambda: bool = True,
        learn_scale: bool = True,
        balance: bool = True,
        form: Form = "auto",
    ) -> None:
        super().__init__()
        log_lambda = torch.tensor(math.log(init_lambda))
        log_scale = torch.tensor(math.log(init_scale))
        if learn_lambda:
            self.log_lambda = nn.Parameter(log_lambda)
        else:
            self.register_buffer("log_lambda", log_lambda)
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.balance = balance
        self.form = form

    @property
    def lam(self) -> Tensor:
        return self.log_lambda.exp()

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp()

    def fit(self, X: Tensor, Y: Tensor, weight: Tensor | None = None) -> Tensor:
        """Fit W (B, d+1, C) on support features X (B, n, d) and targets Y (B, n, C).

        The last row of W is the bias. ``weight`` (B, n), if given, replaces the default
        weighting (class-balanced, or uniform over rows with a non-zero target when
        ``balance=False``); it is renormalised to sum to one per batch element. The fit runs
        in at least float32, outside autocast.
        """
        with torch.autocast(X.device.type, enabled=False):
            X, Y = _full_precision(X), _full_precision(Y)
            if weight is None:
                weight = class_balanced_weights(Y) if self.balance else (Y.sum(-1) > 0)
            weight = _full_precision(weight).to(X.dtype)
            weight = weight / weight.sum(dim=1, keepdim=True).clamp(min=torch.finfo(X.dtype).tiny)
            w = weight.unsqueeze(-1)  # (B, n, 1)
            x_mean = (w * X).sum(dim=1, keepdim=True)  # (B, 1, d)
            y_mean = (w * Y).sum(dim=1, keepdim=True)  # (B, 1, C)
            # Weighted least squares = ordinary least squares on rows scaled by √w.
            sqrt_w = w.sqrt()
            W = ridge_solve(sqrt_w * (X - x_mean), sqrt_w * (Y - y_mean), self.lam, self.form)
            bias = y_mean - x_mean @ W  # (B, 1, C)
            return torch.cat([W, bias], dim=1)

    @staticmethod
    def predict(W: Tensor, X: Tensor) -> Tensor:
        """Apply a fitted W (B, d+1, C) to features X (B, m, d) → unscaled scores (B, m, C)."""
        return X @ W[:, :-1] + W[:, -1:]

    def forward(
        self,
        support_feats: Tensor,
        support_onehot: Tensor,
        query_feats: Tensor,
        weight: Tensor | None = None,
    ) -> Tensor:
        """Fit on the support and return scaled query logits (B, m, C)."""
        W = self.fit(support_feats, support_onehot, weight)
        return self.scale * self.predict(W, query_feats)
