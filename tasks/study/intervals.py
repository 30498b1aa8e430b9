"""Intervals for label-budget ablations, and how many labelled images a target mIoU needs.

Plain numpy/scipy on per-episode sums; `tasks/study/report.py` feeds it from MLflow.

**Intervals.** A hierarchical, paired percentile bootstrap. The two sources of noise in an
ablation point are the training run (seed, budget draw) and the finite test set, so each
replicate resamples both:

1. the seeds of a fold, with replacement (a seed's value at a budget is the mean over its runs
   there, e.g. several budget draws);
2. the fold's test episodes, with replacement, as multinomial count weights W (B, E) applied to
   the per-episode intersections and unions, I (E, C) -> W @ I.

Each class's IoU is then its resampled summed intersection over its resampled summed union (the
protocol's metric, `tasks/fewshot/metrics.py`; never a mean of per-episode IoUs) and the
statistic is the mean over the resampled seeds of each run's mIoU. Several folds are strata:
each is resampled on its own and the folds' values are averaged.

Pairing: every point of a study is scored on the same test episodes, so one episode draw per
replicate is shared by all runs and budgets, and one seed draw is shared by all budgets. The
difference to the 100 % budget and the fraction of it use the seeds both budgets have. Shared
draws cancel the noise the two budgets have in common (hard episodes are hard for both), which
is what makes a small difference detectable. A single run still gets an interval, from its
episodes alone.

**Model against model** (`compare_models`): at each budget, one model's mIoU minus another's,
when both were scored on the same test episodes (their ``test.episodes`` keys agree). Each
replicate shares the episode draw between the two models and draws each model's seeds on its
own: seeds are not shared across models, but episodes are.

**Budget estimate.** A saturating power law with offset, miou(n) = a - b * n**(-c) (b, c > 0),
fitted to the mean mIoU of the budgets with n > 0 labelled images (weighted least squares: each
budget by its 95 % interval half-width, so a budget with more seeds or a steadier score weighs
more), is inverted at 90 % and 95 % of the measured full-supervision mIoU; the fit is repeated
on every bootstrap replicate's per-budget means for an interval. Known bias: Mahmood et al.
(CVPR 2022, "How much more data do I need? Estimating requirements for downstream tasks") show
that power laws fitted on small budgets *under*-estimate the data needed to reach a target. The
correction applied here: the recommended figure is the upper end of the 95 % interval
(conservative); the point estimate is reported beside it as the optimistic figure. A replicate
whose curve never reaches the target counts as +inf, so the upper end can be unbounded ("> the
largest measured n").

When no estimate is given, a reason is (see `estimate_budget`): no 100 % budget, the smallest
positive budget is already within noise of full supervision (the interval of its difference to
100 % contains 0), fewer than 3 positive budgets (the curve has 3 parameters), a fit that does
not converge, or a poor fit: R² < `MIN_R2` or a residual larger than that budget's 95 %
interval half-width (the curve must pass through every point's interval; with exactly 3 budgets
it passes through the points themselves and its quality cannot be checked, which is noted).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

N_BOOT = 2000
LEVEL = 0.95
FULL_BUDGET = 1.0
TARGETS = (0.90, 0.95)
MIN_R2 = 0.8
EPISODE_COLUMNS = ("episode", "class_id", "intersection", "union")
STATISTICS = ("miou", "delta", "fraction")


# --- per-run episode matrices -----------------------------------------------------------------


def episode_matrices(rows: pd.DataFrame, episodes: Sequence[int],
                     classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Dense I[E, C], U[E, C] (float64, exact for pixel counts) of one run's episode rows
    (`EPISODE_COLUMNS`) over the given episode indices and class ids; pairs absent from the rows
    (a class not drawn in an episode) are 0."""
    missing = [c for c in EPISODE_COLUMNS if c not in rows.columns]
    if missing:
        raise ValueError(f"episode rows lack columns {missing}")
    e_pos = pd.Index(episodes).get_indexer(rows["episode"])
    c_pos = pd.Index(classes).get_indexer(rows["class_id"])
    if (e_pos < 0).any() or (c_pos < 0).any():
        raise ValueError("episode rows hold episodes or classes outside the given sets")
    shape = (len(episodes), len(classes))
    inter, union = np.zeros(shape), np.zeros(shape)
    np.add.at(inter, (e_pos, c_pos), rows["intersection"].to_numpy(np.float64))
    np.add.at(union, (e_pos, c_pos), rows["union"].to_numpy(np.float64))
    return inter, union


def miou(intersection: np.ndarray, union: np.ndarray) -> np.ndarray:
    """mIoU over the last axis (classes) of summed intersections and unions: classes with zero
    union are left out, as in `SegmentationMeter.miou`; nan where no class is left."""
    scored = union > 0
    iou = np.divide(intersection, union, out=np.zeros(np.shape(union)), where=scored)
    count = scored.sum(-1)
    return np.divide(iou.sum(-1), count, out=np.full(np.shape(count), np.nan), where=count > 0)


def resampled_run_miou(weights: np.ndarray, intersection: np.ndarray,
                       union: np.ndarray) -> np.ndarray:
    """(B, R) mIoU of R runs under B episode resamples: ``weights`` (B, E) holds how often each
    episode is drawn, ``intersection`` and ``union`` are (R, E, C)."""
    n_runs, n_eps, n_cls = intersection.shape
    flat = (n_eps, n_runs * n_cls)
    inter = weights @ intersection.transpose(1, 0, 2).reshape(flat)
    uni = weights @ union.transpose(1, 0, 2).reshape(flat)
    shape = (len(weights), n_runs, n_cls)
    return miou(inter.reshape(shape), uni.reshape(shape))


@dataclass(frozen=True)
class Run:
    """One finished run: its place in the grid and its (E, C) matrices over its fold's episodes
    and classes (the same for every run of the fold)."""

    budget: float
    seed: str
    fold: str
    intersection: np.ndarray
    union: np.ndarray

    @property
    def miou(self) -> float:
        return float(miou(self.intersection.sum(0), self.union.sum(0)))


def runs_from_tables(points: pd.DataFrame, tables: Sequence[pd.DataFrame]) -> list[Run]:
    """`Run`s from one row of ``points`` (columns budget, seed, fold) per episode table; each
    fold's runs are aligned on the union of their episode indices and class ids."""
    if len(points) != len(tables):
        raise ValueError(f"{len(points)} points but {len(tables)} episode tables")
    runs: list[Run | None] = [None] * len(tables)
    folds = points["fold"].astype(str).to_numpy()
    for fold in sorted(set(folds)):
        idx = np.flatnonzero(folds == fold)
        episodes = sorted(set().union(*(tables[i]["episode"] for i in idx)))
        classes = sorted(set().union(*(tables[i]["class_id"] for i in idx)))
        for i in idx:
            inter, union = episode_matrices(tables[i], episodes, classes)
            p = points.iloc[i]
            runs[i] = Run(float(p["budget"]), str(p["seed"]), fold, inter, union)
    return [r for r in runs if r is not None]


# --- the bootstrap ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetIntervals:
    """Point values and bootstrap replicates per budget of one model × ways × shots.

    ``point`` and ``replicates`` hold, per statistic of `STATISTICS`, arrays (k,) and (B, k) over
    ``budgets``: "miou" (fraction), "delta" (mIoU minus the 100 % budget's, paired by seed) and
    "fraction" (mIoU over the 100 % budget's); the last two are nan without a 100 % budget.
    """

    budgets: np.ndarray
    point: dict[str, np.ndarray]
    replicates: dict[str, np.ndarray]
    n_runs: np.ndarray
    n_episodes: np.ndarray
    full_budget: float | None = FULL_BUDGET
    level: float = LEVEL

    def interval(self, statistic: str) -> tuple[np.ndarray, np.ndarray]:
        """Percentile interval per budget (nan where no replicate has a value)."""
        return _percentiles(self.replicates[statistic], self.level)

    def index(self, budget: float) -> int:
        return int(np.flatnonzero(np.isclose(self.budgets, budget))[0])

    def table(self) -> pd.DataFrame:
        """One row per budget: each statistic with its interval (``_lo``, ``_hi``), n_runs and
        n_episodes."""
        out = pd.DataFrame({"budget": self.budgets})
        for stat in STATISTICS:
            lo, hi = self.interval(stat)
            out[stat], out[f"{stat}_lo"], out[f"{stat}_hi"] = self.point[stat], lo, hi
        out["n_runs"], out["n_episodes"] = self.n_runs, self.n_episodes
        return out


def _percentiles(replicates: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """The ``level`` percentile interval of each column of ``replicates`` (B, k)."""
    tail = 50 * (1 - level)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-nan columns -> nan
        lo, hi = np.nanpercentile(replicates, [tail, 100 - tail], axis=0)
    return lo, hi


def bootstrap_budgets(runs: Sequence[Run], *, n_boot: int = N_BOOT, seed: int = 0,
                      paired: bool = True, full_budget: float = FULL_BUDGET,
                      level: float = LEVEL) -> BudgetIntervals:
    """Hierarchical bootstrap (module docstring) of the runs of one model × ways × shots.

    ``paired=False`` draws episodes and seeds independently for every budget: only there to show
    what pairing buys (tests); an ablation's points are paired by construction.
    """
    if not runs:
        raise ValueError("no runs to bootstrap")
    budgets = np.array(sorted({r.budget for r in runs}))
    full = next((float(b) for b in budgets if math.isclose(b, full_budget)), None)
    rng = np.random.default_rng(seed)
    point_parts, rep_parts, n_episodes = [], [], np.zeros(len(budgets), int)
    for fold in sorted({r.fold for r in runs}):
        fold_runs = [r for r in runs if r.fold == fold]
        n_eps = fold_runs[0].intersection.shape[0]
        n_seeds = len({r.seed for r in fold_runs})
        n_episodes += n_eps * np.isin(budgets, [r.budget for r in fold_runs])
        identity = {b: (np.ones((1, n_eps)), np.ones((1, n_seeds))) for b in budgets}
        draws = _draws(n_eps, n_seeds, budgets, n_boot, rng, paired)
        point_parts.append(_fold_statistics(fold_runs, budgets, full, identity, paired=True))
        rep_parts.append(_fold_statistics(fold_runs, budgets, full, draws, paired))
    point = {k: v[0] for k, v in _combine_folds(point_parts).items()}
    n_runs = np.array([sum(math.isclose(r.budget, b) for r in runs) for b in budgets])
    return BudgetIntervals(budgets, point, _combine_folds(rep_parts), n_runs, n_episodes,
                           full, level)


def _multinomial(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """(size, n) counts: how often each of n items is drawn in a resample of n."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(np.float64)


def _draws(n_eps: int, n_seeds: int, budgets: np.ndarray, n_boot: int,
           rng: np.random.Generator, paired: bool) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    """Episode and seed weights per budget: one shared draw when paired, else one per budget."""
    if paired:
        shared = (_multinomial(rng, n_eps, n_boot), _multinomial(rng, n_seeds, n_boot))
        return {b: shared for b in budgets}
    return {b: (_multinomial(rng, n_eps, n_boot), _multinomial(rng, n_seeds, n_boot))
            for b in budgets}


def _seed_means(runs: Sequence[Run], seeds: list[str], weights: np.ndarray) -> np.ndarray:
    """(B, S) mean resampled mIoU of each seed's runs (nan for a seed without runs)."""
    m = resampled_run_miou(weights, np.stack([r.intersection for r in runs]),
                           np.stack([r.union for r in runs]))
    out = np.full((len(weights), len(seeds)), np.nan)
    for s, name in enumerate(seeds):
        cols = [j for j, r in enumerate(runs) if r.seed == name]
        if cols:
            out[:, s] = m[:, cols].mean(1)
    return out


def _weighted_mean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Row-wise mean of ``values`` (B, S) under seed counts (B, S), nan entries left out; nan
    where a row draws none of the seeds that have a value."""
    w = np.where(np.isnan(values), 0.0, weights)
    total = w.sum(1)
    num = (w * np.nan_to_num(values)).sum(1)
    return np.divide(num, total, out=np.full(len(total), np.nan), where=total > 0)


def _fold_statistics(runs: Sequence[Run], budgets: np.ndarray, full: float | None,
                     draws: dict[float, tuple[np.ndarray, np.ndarray]],
                     paired: bool) -> dict[str, np.ndarray]:
    """Per budget (columns) and replicate (rows) of one fold: "level" (the seed mean),
    "with" and "full" (the budget's and the 100 % budget's means over the seeds compared)."""
    seeds = sorted({r.seed for r in runs})
    n_rows = len(next(iter(draws.values()))[0])
    out = {k: np.full((n_rows, len(budgets)), np.nan) for k in ("level", "with", "full")}
    means = {}
    for j, b in enumerate(budgets):
        at_b = [r for r in runs if r.budget == b]
        if at_b:
            means[b] = _seed_means(at_b, seeds, draws[b][0])
            out["level"][:, j] = _weighted_mean(means[b], draws[b][1])
    if full is None or full not in means:
        return out
    for j, b in enumerate(budgets):
        if b not in means:
            continue
        if paired:  # the same seed draw on the seeds both budgets have
            both = ~np.isnan(means[b]) & ~np.isnan(means[full])
            weights = np.where(both, draws[b][1], 0.0)
            out["with"][:, j] = _weighted_mean(means[b], weights)
            out["full"][:, j] = _weighted_mean(means[full], weights)
        else:
            out["with"][:, j] = out["level"][:, j]
            out["full"][:, j] = out["level"][:, budgets.tolist().index(full)]
    return out


def _combine_folds(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Average the folds: mIoU over the folds holding the budget, delta and fraction over the
    folds holding both it and the 100 % budget."""
    level, with_b, full = (np.stack([p[k] for p in parts]) for k in ("level", "with", "full"))
    both = ~np.isnan(with_b) & ~np.isnan(full)
    n_level, n_both = (~np.isnan(level)).sum(0), both.sum(0)
    mean_level = _safe_divide(np.nansum(level, 0), n_level)
    mean_with = _safe_divide(np.where(both, with_b, 0).sum(0), n_both)
    mean_full = _safe_divide(np.where(both, full, 0).sum(0), n_both)
    fraction = np.divide(mean_with, mean_full, out=np.full(mean_full.shape, np.nan),
                         where=mean_full > 0)
    return {"miou": mean_level, "delta": mean_with - mean_full, "fraction": fraction}


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.full(np.shape(num), np.nan), where=den > 0)


# --- one model against another ----------------------------------------------------------------


@dataclass(frozen=True)
class ModelComparison:
    """mIoU of model A minus model B at each budget both were run at, with its bootstrap
    replicates: ``point`` (k,) and ``replicates`` (B, k) over ``budgets``, fractions."""

    budgets: np.ndarray
    point: np.ndarray
    replicates: np.ndarray
    n_runs: tuple[np.ndarray, np.ndarray]
    n_episodes: np.ndarray
    level: float = LEVEL

    def interval(self) -> tuple[np.ndarray, np.ndarray]:
        """Percentile interval per budget (nan where no replicate has a value)."""
        return _percentiles(self.replicates, self.level)


def compare_models(runs_a: Sequence[Run], runs_b: Sequence[Run], *, n_boot: int = N_BOOT,
                   seed: int = 0, paired: bool = True, level: float = LEVEL) -> ModelComparison:
    """Model A's mIoU minus model B's at each budget both have, over the folds both have.

    The runs of a fold must be aligned on the same episodes and classes (one `runs_from_tables`
    call for both models) and scored on the same test episodes (equal ``test.episodes`` tags;
    the caller checks). Each replicate draws the fold's episodes once for both models (paired:
    a hard episode is hard for both) and each model's seeds on their own (seed 0 of one model
    has nothing to do with seed 0 of the other). ``paired=False`` draws the episodes
    independently per model: only there to show what pairing buys (tests).
    """
    budgets = np.array(sorted({r.budget for r in runs_a} & {r.budget for r in runs_b}))
    folds = sorted({r.fold for r in runs_a} & {r.fold for r in runs_b})
    if not len(budgets) or not folds:
        raise ValueError("the two models share no budget and fold to compare")
    rng = np.random.default_rng(seed)
    point_parts, rep_parts, n_episodes = [], [], np.zeros(len(budgets), int)
    for fold in folds:
        fold_a = [r for r in runs_a if r.fold == fold and r.budget in budgets]
        fold_b = [r for r in runs_b if r.fold == fold and r.budget in budgets]
        if not fold_a or not fold_b:
            continue
        n_eps = fold_a[0].intersection.shape[0]
        if fold_b[0].intersection.shape != fold_a[0].intersection.shape:
            raise ValueError(f"fold {fold}: the two models' runs are not aligned on the same "
                             "episodes and classes")
        episodes_a = _multinomial(rng, n_eps, n_boot)
        episodes_b = episodes_a if paired else _multinomial(rng, n_eps, n_boot)
        levels = []
        for runs, episodes in ((fold_a, episodes_a), (fold_b, episodes_b)):
            n_seeds = len({r.seed for r in runs})
            seeds = _multinomial(rng, n_seeds, n_boot)
            identity = (np.ones((1, n_eps)), np.ones((1, n_seeds)))
            levels.append(tuple(
                _fold_statistics(runs, budgets, None, {b: draw for b in budgets}, True)["level"]
                for draw in (identity, (episodes, seeds))))
        (point_a, rep_a), (point_b, rep_b) = levels
        point_parts.append(point_a - point_b)
        n_episodes += n_eps * ~np.isnan(point_parts[-1][0])
        rep_parts.append(rep_a - rep_b)
    if not point_parts:
        raise ValueError("the two models share no budget within a fold to compare")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a budget no fold holds -> nan
        point = np.nanmean(np.stack(point_parts), 0)[0]
        replicates = np.nanmean(np.stack(rep_parts), 0)
    n_runs = tuple(np.array([sum(math.isclose(r.budget, b) and r.fold in folds for r in runs)
                             for b in budgets]) for runs in (runs_a, runs_b))
    return ModelComparison(budgets, point, replicates, n_runs, n_episodes, level)


# --- the budget estimate ----------------------------------------------------------------------


def power_law(n: np.ndarray | float, a: float, b: float, c: float) -> np.ndarray | float:
    """miou(n) = a - b * n**(-c): rises towards the plateau a as n grows (b, c > 0)."""
    return a - b * np.power(n, -c)


@dataclass(frozen=True)
class PowerLawFit:
    a: float
    b: float
    c: float
    r2: float
    residuals: np.ndarray  # measured minus fitted, per point

    def __call__(self, n: np.ndarray | float) -> np.ndarray | float:
        return power_law(n, self.a, self.b, self.c)

    def images_for(self, target: float) -> float:
        """Labelled images at which the curve reaches ``target`` (inf if its plateau doesn't)."""
        if not target < self.a:
            return math.inf
        return float((self.b / (self.a - target)) ** (1.0 / self.c))


def _power_law_jacobian(n: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    """d miou / d(a, b, c): analytic, a third faster than curve_fit's finite differences."""
    p = np.power(n, -c)
    return np.stack([np.ones_like(n), -p, b * p * np.log(n)], axis=1)


# a (the plateau) is an mIoU, so in [0, 1]; c beyond 5 would be a step, not a learning curve.
_BOUNDS = ([0.0, 1e-12, 1e-3], [1.0, np.inf, 5.0])


def fit_power_law(n: Sequence[float], y: Sequence[float],
                  p0: Sequence[float] | None = None,
                  sigma: Sequence[float] | None = None) -> PowerLawFit | None:
    """Least-squares fit of `power_law` (scipy `curve_fit`, bounded); None if it fails.

    ``sigma``: each point's uncertainty (its interval half-width), so that a precise point
    weighs more than a noisy one (weighted least squares); None weighs all alike. Without
    ``p0`` a few starting exponents are tried and the best fit kept: with 3 to 5 points the
    fit has local minima.
    """
    from scipy.optimize import curve_fit

    n, y = np.asarray(n, np.float64), np.asarray(y, np.float64)
    weights = np.ones_like(y) if sigma is None else 1.0 / np.asarray(sigma, np.float64) ** 2
    starts = [p0] if p0 is not None else [_start(n, y, c) for c in (0.3, 0.7, 1.5)]
    best = None
    for start in starts:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # OptimizeWarning: no covariance with 3 points
            try:
                params, _ = curve_fit(power_law, n, y, p0=np.clip(start, *_BOUNDS),
                                      sigma=sigma, bounds=_BOUNDS, jac=_power_law_jacobian,
                                      maxfev=5000)
            except (RuntimeError, ValueError):
                continue
        residuals = y - power_law(n, *params)
        cost = (weights * residuals ** 2).sum()
        if best is None or cost < (weights * best.residuals ** 2).sum():
            best = PowerLawFit(*map(float, params), r2=_r2(y, residuals), residuals=residuals)
    return best


def _start(n: np.ndarray, y: np.ndarray, c: float) -> list[float]:
    """A starting point through the two ends of the data for exponent c."""
    lo, hi = np.argmin(n), np.argmax(n)
    span = n[lo] ** -c - n[hi] ** -c
    b = max((y[hi] - y[lo]) / span, 1e-6) if span > 0 else 1e-3
    return [min(float(y[hi] + b * n[hi] ** -c), 1.0), b, c]


def _r2(y: np.ndarray, residuals: np.ndarray) -> float:
    total = ((y - y.mean()) ** 2).sum()
    if total == 0:
        return 1.0 if np.allclose(residuals, 0) else 0.0
    return float(1 - (residuals ** 2).sum() / total)


@dataclass(frozen=True)
class BudgetEstimate:
    """Labelled images needed to reach ``target`` × the 100 % budget's mIoU.

    ``images`` is the point estimate (optimistic, see the module docstring), ``images_lo`` and
    ``images_hi`` its bootstrap interval; ``images_hi`` is the recommended figure (inf:
    unbounded). ``region``/``point_region``: "interpolation" when the recommended/point figure
    lies inside the measured range of labelled images, else "extrapolation". A refused
    estimate has a ``refusal`` and nan figures.
    """

    target: float
    target_miou: float
    images: float = math.nan
    images_lo: float = math.nan
    images_hi: float = math.nan
    region: str = ""
    point_region: str = ""
    measured: tuple[float, float] = (math.nan, math.nan)
    refusal: str | None = None
    note: str = ""
    fit: PowerLawFit | None = None

    @property
    def recommended(self) -> float:
        return self.images_hi


def estimate_budget(intervals: BudgetIntervals, images: Sequence[float],
                    targets: Sequence[float] = TARGETS, min_r2: float = MIN_R2
                    ) -> list[BudgetEstimate]:
    """One `BudgetEstimate` per target for one model × ways × shots; ``images`` (k,) is the
    number of labelled images of each budget of ``intervals`` (0 at budget 0)."""
    images = np.asarray(images, np.float64)
    full = intervals.full_budget
    full_miou = intervals.point["miou"][intervals.index(full)] if full is not None else math.nan
    refused = [BudgetEstimate(t, t * full_miou) for t in targets]
    reason = _refusal_before_fit(intervals, images)
    if reason:
        return [_refuse(e, reason) for e in refused]
    pos = images > 0
    n, y = images[pos], intervals.point["miou"][pos]
    lo, hi = intervals.interval("miou")
    half_widths = (hi - lo)[pos] / 2
    sigma = _fit_sigma(half_widths)
    fit = fit_power_law(n, y, sigma=sigma)
    if fit is None:
        return [_refuse(e, "the power-law fit did not converge") for e in refused]
    reason = _poor_fit(fit, n, half_widths, min_r2)
    if reason:
        return [_refuse(e, reason) for e in refused]
    note = ("3 budgets for 3 parameters: the curve passes through every point, so its fit "
            "cannot be checked" if len(n) == 3 else f"R² = {fit.r2:.3f}")
    replicate_images = _replicate_images(intervals, n, pos, fit, targets, sigma)
    return [_estimate(e, fit, n, samples, intervals.level, note)
            for e, samples in zip(refused, replicate_images.T, strict=True)]


# A half-width under 0.01 mIoU points counts as that: noiseless points weigh alike, not inf.
_MIN_SIGMA = 1e-4


def _fit_sigma(half_widths: np.ndarray) -> np.ndarray | None:
    """The weights of the fit: each budget's interval half-width (None, an unweighted fit,
    when a budget has no interval)."""
    if np.isnan(half_widths).any():
        return None
    return np.maximum(half_widths, _MIN_SIGMA)


def _refuse(estimate: BudgetEstimate, reason: str) -> BudgetEstimate:
    return BudgetEstimate(estimate.target, estimate.target_miou, refusal=reason)


def _refusal_before_fit(intervals: BudgetIntervals, images: np.ndarray) -> str | None:
    """Why no curve should be fitted to these points, or None."""
    if intervals.full_budget is None:
        return "no 100 % budget: nothing to compare against"
    positive = intervals.budgets > 0
    if np.isnan(images[positive]).any():
        return "labelled-image counts unknown (labels/images not logged)"
    if positive.sum() >= 2:  # a positive budget below 100 %: is it already there?
        j = int(np.flatnonzero(positive)[0])
        lo, hi = (x[j] for x in intervals.interval("delta"))
        if np.isnan(lo):
            return "no interval for the difference to 100 % (no episode-level results)"
        if lo <= 0 <= hi:
            return (f"the smallest measured budget ({images[j]:g} images) is already within "
                    "noise of full supervision")
        if lo > 0:
            return (f"the smallest measured budget ({images[j]:g} images) scores above full "
                    "supervision: no saturating curve to fit")
    if positive.sum() < 3:
        shown = ", ".join(f"{x:g}" for x in images[positive])
        return (f"only {positive.sum()} budget(s) with labelled images ({shown}): the 3-parameter "
                "curve needs at least 3")
    return None


def _poor_fit(fit: PowerLawFit, n: np.ndarray, half_widths: np.ndarray,
              min_r2: float) -> str | None:
    if fit.r2 < min_r2:
        return f"poor fit (R² = {fit.r2:.2f} < {min_r2:g})"
    # A residual under 0.01 mIoU points is never a miss: noiseless data has zero-width intervals.
    allowed = np.maximum(np.nan_to_num(half_widths), _MIN_SIGMA)
    if (np.abs(fit.residuals) > allowed).any():
        k = int(np.argmax(np.abs(fit.residuals) - allowed))
        return (f"poor fit: the curve misses the {n[k]:g}-image point by "
                f"{100 * abs(fit.residuals[k]):.2f} mIoU points, more than its 95 % interval "
                f"half-width ({100 * half_widths[k]:.2f})")
    return None


def _replicate_images(intervals: BudgetIntervals, n: np.ndarray, pos: np.ndarray,
                      fit: PowerLawFit, targets: Sequence[float],
                      sigma: np.ndarray | None) -> np.ndarray:
    """(B, targets) images needed under each replicate's refitted curve and its own 100 %
    mIoU; +inf where the curve never reaches the target, nan where the refit failed."""
    reps = intervals.replicates["miou"]
    full = reps[:, intervals.index(intervals.full_budget)]
    out = np.full((len(reps), len(targets)), np.nan)
    for i, row in enumerate(reps):
        if np.isnan(row[pos]).any() or np.isnan(full[i]):
            continue
        refit = fit_power_law(n, row[pos], p0=(fit.a, fit.b, fit.c), sigma=sigma)
        if refit is not None:
            out[i] = [refit.images_for(t * full[i]) for t in targets]
    return out


def _estimate(base: BudgetEstimate, fit: PowerLawFit, n: np.ndarray, samples: np.ndarray,
              level: float, note: str) -> BudgetEstimate:
    point = fit.images_for(base.target_miou)
    if math.isinf(point):
        return _refuse(base, f"the fitted plateau ({100 * fit.a:.1f} mIoU) is below the target "
                             f"({100 * base.target_miou:.1f})")
    lo, hi = _percentile_interval(samples, level)
    failed = int(np.isnan(samples).sum())
    if failed:
        note += f"; {failed} of {len(samples)} replicate fits failed and were left out"
    measured = (float(n.min()), float(n.max()))
    return BudgetEstimate(base.target, base.target_miou, point, lo, hi, _region(hi, measured),
                          _region(point, measured), measured, None, note, fit)


def _percentile_interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval of samples that may hold +inf: an order statistic (inverted CDF), so
    that inf never enters an interpolation."""
    finite_or_inf = samples[~np.isnan(samples)]
    if not len(finite_or_inf):
        return math.nan, math.nan
    tail = (1 - level) / 2
    lo, hi = np.quantile(finite_or_inf, [tail, 1 - tail], method="inverted_cdf")
    return float(lo), float(hi)


def _region(images: float, measured: tuple[float, float]) -> str:
    inside = measured[0] <= images <= measured[1]
    return "interpolation" if inside else "extrapolation"
