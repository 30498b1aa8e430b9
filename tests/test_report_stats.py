"""Intervals, the budget estimate and the report, on fabricated episode sums (no MLflow)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.fewshot.metrics import SegmentationMeter
from tasks.study import intervals, report
from tasks.study.intervals import BudgetIntervals, Run, bootstrap_budgets, estimate_budget

CLASSES = [3, 7, 11, 15, 19]


def _episode_table(iou: np.ndarray, union: np.ndarray, classes: np.ndarray) -> pd.DataFrame:
    """One 1-way episode per row: intersection = iou × union."""
    return pd.DataFrame({"episode": np.arange(len(iou)), "class_id": classes,
                         "intersection": np.round(iou * union).astype(int),
                         "union": union.astype(int), "class": [f"c{c}" for c in classes]})


def _run(table: pd.DataFrame, budget: float, seed: str = "0", fold: str = "0") -> Run:
    episodes, classes = sorted(table["episode"]), sorted(set(table["class_id"]))
    inter, union = intervals.episode_matrices(table, episodes, classes)
    return Run(budget, seed, fold, inter, union)


def _width(boot: BudgetIntervals, statistic: str, budget: float) -> float:
    lo, hi = boot.interval(statistic)
    j = boot.index(budget)
    return float(hi[j] - lo[j])


def _test_set(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-episode difficulty, union and class: what every point of a study shares."""
    return (rng.uniform(0.2, 0.9, n), rng.integers(500, 3000, n), rng.choice(CLASSES, n))


# --- the bootstrap ----------------------------------------------------------------------------


def test_identity_resample_reproduces_the_meter_miou() -> None:
    """Per-episode sums with all weights 1 give exactly SegmentationMeter's mIoU: summed
    intersection over summed union per class, a class with zero union left out."""
    rng = np.random.default_rng(0)
    meter = SegmentationMeter(CLASSES)
    rows = []
    for e in range(40):
        cls = int(rng.choice(CLASSES[:4]))  # class 19 is never drawn: zero union
        target = (rng.random((16, 16)) < 0.3).astype(np.uint8)
        pred = (rng.random((16, 16)) < 0.3).astype(np.uint8)
        target[0, :4] = 255
        meter.update(pred, target, [cls])
        valid = target != 255
        p, t = pred[valid] == 1, target[valid] == 1
        rows.append((e, cls, int((p & t).sum()), int((p | t).sum())))
    table = pd.DataFrame(rows, columns=["episode", "class_id", "intersection", "union"])
    inter, union = intervals.episode_matrices(table, range(40), CLASSES)
    identity = np.ones((1, 40))
    got = intervals.resampled_run_miou(identity, inter[None], union[None])[0, 0]
    assert got == pytest.approx(meter.miou(), abs=1e-12)
    boot = bootstrap_budgets([Run(1.0, "0", "0", inter, union)], n_boot=50)
    assert boot.point["miou"][0] == pytest.approx(meter.miou(), abs=1e-12)


def test_single_run_gets_an_interval_from_its_episodes() -> None:
    rng = np.random.default_rng(1)
    difficulty, union, classes = _test_set(rng, 200)
    run = _run(_episode_table(difficulty, union, classes), 0.2)
    boot = bootstrap_budgets([run], n_boot=500)
    lo, hi = boot.interval("miou")
    assert lo[0] < boot.point["miou"][0] < hi[0]
    assert hi[0] - lo[0] > 0.01  # 200 episodes spread over 0.2..0.9: clearly not ± 0.0
    assert boot.n_runs.tolist() == [1] and boot.n_episodes.tolist() == [200]


def test_pairing_narrows_the_difference_interval() -> None:
    """Both budgets see the same hard and easy episodes: pairing cancels that shared noise."""
    rng = np.random.default_rng(2)
    difficulty, union, classes = _test_set(rng, 300)
    runs = []
    for seed in ("0", "1", "2"):
        shift = rng.normal(0, 0.005)
        for budget, gain in ((0.2, -0.03), (1.0, 0.0)):
            iou = np.clip(difficulty + gain + shift + rng.normal(0, 0.01, 300), 0, 1)
            runs.append(_run(_episode_table(iou, union, classes), budget, seed))
    paired = bootstrap_budgets(runs, n_boot=1000, seed=0)
    unpaired = bootstrap_budgets(runs, n_boot=1000, seed=0, paired=False)
    assert paired.point["delta"][0] == pytest.approx(unpaired.point["delta"][0])
    assert paired.point["delta"][0] == pytest.approx(-0.03, abs=0.005)
    assert _width(paired, "delta", 0.2) < 0.3 * _width(unpaired, "delta", 0.2)
    lo, hi = paired.interval("delta")
    assert hi[0] < 0  # the 3-point loss is detected only thanks to pairing
    lo, hi = unpaired.interval("delta")
    assert lo[0] < 0 < hi[0]


def test_intervals_shrink_with_more_episodes() -> None:
    rng = np.random.default_rng(3)
    widths = []
    for n in (50, 800):
        difficulty, union, classes = _test_set(rng, n)
        run = _run(_episode_table(difficulty, union, classes), 1.0)
        widths.append(_width(bootstrap_budgets([run], n_boot=500), "miou", 1.0))
    assert widths[1] < 0.5 * widths[0]  # ~ 1/sqrt(16) = 0.25 expected


def test_difference_pairs_runs_by_seed_and_folds_are_averaged() -> None:
    """A budget with a seed the 100 % budget lacks is compared on the common seeds only."""
    rng = np.random.default_rng(4)
    difficulty, union, classes = _test_set(rng, 100)

    def run(level: float, budget: float, seed: str, fold: str) -> Run:
        iou = np.clip(difficulty * 0 + level, 0, 1)
        return _run(_episode_table(iou, union, classes), budget, seed, fold)

    runs = [run(0.50, 0.2, "0", "0"), run(0.40, 0.2, "1", "0"), run(0.90, 0.2, "2", "0"),
            run(0.60, 1.0, "0", "0"), run(0.50, 1.0, "1", "0"),
            run(0.30, 0.2, "0", "1"), run(0.40, 1.0, "0", "1")]
    boot = bootstrap_budgets(runs, n_boot=20)
    # fold 0: mIoU over its 3 seeds, delta over seeds 0 and 1; fold 1: one seed; mean of folds.
    assert boot.point["miou"][0] == pytest.approx(((0.5 + 0.4 + 0.9) / 3 + 0.3) / 2, abs=2e-3)
    assert boot.point["delta"][0] == pytest.approx((-0.1 + -0.1) / 2, abs=2e-3)
    assert boot.point["fraction"][0] == pytest.approx((0.45 + 0.3) / (0.55 + 0.4), abs=2e-3)
    assert boot.n_runs.tolist() == [4, 3] and boot.n_episodes.tolist() == [200, 200]


# --- the budget estimate ----------------------------------------------------------------------

A, B, C = 0.62, 0.9, 0.45


def _noiseless(images: list[float], budgets: list[float], width: float = 0.0,
               n_boot: int = 20) -> BudgetIntervals:
    """Intervals whose every replicate lies on the curve (± width / 2 as two shifted halves)."""
    images_arr = np.asarray(images, float)
    y = np.where(images_arr > 0, intervals.power_law(np.maximum(images_arr, 1), A, B, C), 0.1)
    shifts = np.repeat([-width / 2, width / 2], n_boot // 2)[:, None]
    reps = y[None] + shifts
    full = y[-1]
    point = {"miou": y, "delta": y - full, "fraction": y / full}
    replicates = {"miou": reps, "delta": reps - reps[:, -1:], "fraction": reps / reps[:, -1:]}
    return BudgetIntervals(np.asarray(budgets), point, replicates, np.ones(len(y), int),
                           np.full(len(y), 1000), 1.0)


def test_fit_recovers_a_known_power_law_and_its_inverse() -> None:
    n = np.array([30.0, 60, 120, 300, 600])
    fit = intervals.fit_power_law(n, intervals.power_law(n, A, B, C))
    assert fit is not None
    assert (fit.a, fit.b, fit.c) == pytest.approx((A, B, C), rel=1e-4)
    assert fit.r2 == pytest.approx(1.0)
    target = 0.9 * intervals.power_law(600.0, A, B, C)
    analytic = (B / (A - target)) ** (1 / C)
    assert fit.images_for(target) == pytest.approx(analytic, rel=1e-3)
    assert math.isinf(fit.images_for(A + 0.01))

    boot = _noiseless([0, 30, 60, 120, 300, 600], [0, 0.05, 0.1, 0.2, 0.5, 1.0])
    est90, est95 = estimate_budget(boot, [0, 30, 60, 120, 300, 600])
    assert est90.refusal is None and est95.refusal is None
    assert est90.images == pytest.approx(analytic, rel=1e-3)
    assert est90.images < est95.images
    assert est90.images_lo <= est90.images <= est90.images_hi == est90.recommended
    assert est90.region == est90.point_region == "interpolation"


def test_a_noisy_budget_weighs_less_in_the_fit() -> None:
    """Four precise budgets on the curve and one noisy one 6 points off: weighted by their
    interval half-widths the fit keeps to the precise ones; unweighted it misses them."""
    n = np.array([30.0, 60, 120, 300, 600])
    y = intervals.power_law(n, A, B, C) + np.array([0.06, 0, 0, 0, 0])
    sigma = np.array([0.08, 0.005, 0.005, 0.005, 0.005])
    weighted = intervals.fit_power_law(n, y, sigma=sigma)
    unweighted = intervals.fit_power_law(n, y)
    assert weighted is not None and unweighted is not None
    assert (np.abs(weighted.residuals[1:]) < 0.005).all()
    assert (np.abs(unweighted.residuals[1:]) > 0.005).any()
    assert abs(weighted.a - A) < abs(unweighted.a - A)


def test_an_estimate_outside_the_measured_range_is_an_extrapolation() -> None:
    # Measured from 300 images on: 90 % of the 600-image mIoU is reached well below 300.
    images = [300, 400, 500, 600]
    est90, _ = estimate_budget(_noiseless(images, [0.5, 0.667, 0.833, 1.0]), images)
    assert est90.refusal is None
    assert est90.images < 300 and est90.region == "extrapolation"


def test_a_noisy_curve_has_a_wider_estimate_interval_up_to_unbounded() -> None:
    images = [0, 30, 60, 120, 300, 600]
    budgets = [0, 0.05, 0.1, 0.2, 0.5, 1.0]
    tight = estimate_budget(_noiseless(images, budgets, width=0.002), images)[1]
    loose = estimate_budget(_noiseless(images, budgets, width=0.03), images)[1]
    assert tight.refusal is None and loose.refusal is None
    assert loose.images_hi - loose.images_lo > tight.images_hi - tight.images_lo
    row = {"model": "m", "ways": 1, "shots": 1, "target": 95.0, "target_miou": 50.0,
           "images": 200.0, "images_lo": 150.0, "images_hi": math.inf, "recommended": math.inf,
           "region": "extrapolation", "measured_max": 600.0, "refusal": None}
    markdown = report.estimate_markdown(pd.DataFrame([row]))
    assert "200 [150, > 600] | **> 600** | extrapolation" in markdown


def test_refuses_a_flat_curve() -> None:
    images = [0, 30, 60, 120, 600]
    boot = _noiseless(images, [0, 0.05, 0.1, 0.2, 1.0])
    flat = boot.replicates["delta"].copy()
    flat[:, 1] = np.linspace(-0.02, 0.01, len(flat))  # 30 images: within noise of 100 %
    boot = BudgetIntervals(boot.budgets, boot.point, boot.replicates | {"delta": flat},
                           boot.n_runs, boot.n_episodes, 1.0)
    for est in estimate_budget(boot, images):
        assert est.refusal == ("the smallest measured budget (30 images) is already within "
                               "noise of full supervision")
        assert math.isnan(est.images) and math.isnan(est.recommended)


def test_refuses_fewer_than_three_budgets_and_a_poor_fit() -> None:
    images = [0, 60, 600]
    for est in estimate_budget(_noiseless(images, [0, 0.1, 1.0]), images):
        assert "needs at least 3" in est.refusal
    # A zig-zag that no saturating curve follows within its (narrow) intervals.
    images = [30, 60, 120, 300, 600]
    boot = _noiseless(images, [0.05, 0.1, 0.2, 0.5, 1.0], width=0.002)
    zigzag = boot.point["miou"] + np.array([0, 0.04, -0.04, 0.04, 0])
    boot = BudgetIntervals(boot.budgets, boot.point | {"miou": zigzag}, boot.replicates,
                           boot.n_runs, boot.n_episodes, 1.0)
    assert "poor fit" in estimate_budget(boot, images)[0].refusal


# --- the report -------------------------------------------------------------------------------


def _study(rng: np.random.Generator, *, ways: int = 1,
           dropped: str = "") -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """child_results-shaped rows and episode tables: 2 seeds × 5 budgets on one test set."""
    difficulty, union, classes = _test_set(rng, 150)
    rows, tables = [], {}
    for budget, images in ((0.0, 0), (0.05, 30), (0.1, 60), (0.2, 120), (1.0, 600)):
        for seed in (0, 1):
            level = intervals.power_law(max(images, 1), A, B, C) if images else 0.1
            iou = np.clip(difficulty * level / 0.55 + rng.normal(0, 0.01, 150), 0, 1)
            table = _episode_table(iou, union, classes)
            run_id = f"m{ways}-{budget:g}-{seed}"
            run = _run(table, budget)
            tables[run_id] = table
            rows.append({"model": "panet", "budget": budget, "fold": "0", "shots": 1,
                         "ways": ways, "seed": str(seed), "budget_seed": str(seed),
                         "miou": run.miou, "fbiou": 0.6, "labels_images": images,
                         "labels_pixels": 1000 * images, "scored_classes": "c3,c7,c11,c15,c19",
                         "dropped_classes": dropped, "run_id": run_id})
    return pd.DataFrame(rows), tables


def test_report_tables_warning_metrics_and_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    one_way, eps1 = _study(rng, dropped="c23")
    two_way, eps2 = _study(rng, ways=2)
    results = pd.concat([one_way, two_way], ignore_index=True)
    summary = report.build_summary(results, eps1 | eps2, n_boot=200)
    assert len(summary.table) == 10 and not summary.table["miou_lo"].isna().any()
    assert (summary.table["miou_lo"] < summary.table["miou_mean"]).all()
    markdown = report.to_markdown(summary)
    assert ("**Warning:** fold 0 (1-way 1-shot): c23 not scored (too few eligible test "
            "images)") in markdown
    assert "| panet | 1 | 1 | 20 % | 120 |" in markdown
    assert "Mahmood et al." in markdown
    assert "| 0 | 1 | 1 | c11, c15, c19, c3, c7 | c23 |" in markdown
    assert summary.estimates["refusal"].isna().all(), summary.estimates["refusal"].tolist()
    assert set(summary.fits) == {("panet", 1, 1), ("panet", 2, 1)}

    metrics = report.summary_metrics(summary)
    assert metrics["summary/panet/1w1s/b0.2/miou"] == pytest.approx(
        summary.table.query("ways == 1 and budget == 0.2")["miou_mean"].iloc[0])
    assert {"estimate/panet/1w1s/images_90", "estimate/panet/2w1s/images_95_hi"} <= set(metrics)

    paths = report.write_summary(summary, results, tmp_path, "test study")
    assert {p.name for p in paths.values()} == {"summary.csv", "summary.md", "estimate.csv",
                                                "runs.csv", "miou_vs_budget.png", "report.html"}
    assert all(p.stat().st_size > 0 for p in paths.values())
    assert len(pd.read_csv(paths["estimate"])) == 4


def _png_bytes(colour: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 4), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_html_report_is_self_contained_with_tables_plot_and_points(tmp_path: Path) -> None:
    import base64
    import html
    import io
    from html.parser import HTMLParser

    from PIL import Image

    rng = np.random.default_rng(8)
    results, tables = _study(rng, dropped="c23")
    results.loc[results["run_id"] == "m1-0.2-1", "budget_seed"] = "4"  # a second budget draw
    summary = report.build_summary(results, tables, n_boot=100)
    overlay = _png_bytes((200, 30, 40))
    per_class = pd.DataFrame({"class": ["c3", "c<7>", "mIoU", "FB-IoU"],
                              "iou": [0.4321, 0.6789, 0.5556, 0.7]})
    points = {"m1-0.2-0": report.PointArtifacts(per_class, overlay),
              "m1-1-1": report.PointArtifacts(per_class, None)}
    paths = report.write_summary(summary, results, tmp_path, "html study", points)
    page = paths["html"].read_text(encoding="utf-8")

    class Tags(HTMLParser):  # every opened element is closed (void elements aside)
        def __init__(self) -> None:
            super().__init__()
            self.stack: list[str] = []
            self.images: list[str] = []

        def handle_starttag(self, tag: str, attrs: list) -> None:
            if tag == "img":
                self.images.append(dict(attrs)["src"])
            elif tag != "meta":
                self.stack.append(tag)

        def handle_endtag(self, tag: str) -> None:
            assert self.stack.pop() == tag

    parser = Tags()
    parser.feed(page)
    assert page.startswith("<!DOCTYPE html>") and parser.stack == []
    # Nothing to fetch: no links, scripts or images from elsewhere.
    assert "<title>html study</title>" in page and "http" not in page
    # The plot, embedded: the very bytes of miou_vs_budget.png; the overlay grid of one point,
    # as a JPEG of the same picture.
    plot_b64 = base64.b64encode(paths["plot"].read_bytes()).decode()
    assert parser.images[0] == f"data:image/png;base64,{plot_b64}"
    assert len(parser.images) == 2 and parser.images[1].startswith("data:image/jpeg;base64,")
    shown = Image.open(io.BytesIO(base64.b64decode(parser.images[1].split(",", 1)[1])))
    assert shown.format == "JPEG" and shown.size == (8, 4)
    assert np.abs(np.asarray(shown, np.int16) - (200, 30, 40)).max() <= 8
    # The tables: every cell of the markdown's summary, estimate and classes tables.
    for row in (report.table_rows(summary.table) + report.estimate_rows(summary.estimates)
                + report.classes_rows(summary.classes)):
        assert all(f">{html.escape(cell)}<" in page for cell in row), row
    assert "c23 not scored" in page and "Mahmood et al." in page
    # Each point named, per-class IoU in %, names escaped; points without artifacts say so.
    for name in ("panet 0% seed 0", "panet 20% seed 0", "panet 20% seed 1 draw 4",
                 "panet 100% seed 1"):
        assert f"<h3>{name}</h3>" in page
    assert page.count('<section class="point"') == len(results)
    assert '<a href="#point-m1-0.2-0">panet 20% seed 0</a>' in page  # the index links
    assert '<section class="point" id="point-m1-0.2-0">' in page
    assert ">43.2<" in page and ">67.9<" in page and "c&lt;7&gt;" in page
    assert "<td><strong>mIoU</strong></td><td><strong>55.6</strong></td>" in page
    assert page.count("No per-class IoU") == len(results) - 2
    assert page.count("No overlays") == len(results) - 1


def test_runs_without_episodes_show_means_and_na(tmp_path: Path) -> None:
    results, _ = _study(np.random.default_rng(6))
    old = results.drop(columns=["labels_images", "labels_pixels", "scored_classes",
                                "dropped_classes"])
    summary = report.build_summary(old)
    assert summary.table["miou_mean"].tolist() == pytest.approx(
        100 * old.groupby("budget")["miou"].mean().to_numpy())
    markdown = report.to_markdown(summary)
    assert "[n/a]" in markdown and "no episode-level results" in markdown
    assert "n/a (not recorded)" in markdown
    report.write_summary(summary, old, tmp_path, "old")  # the plot falls back to budget %


def test_episode_rows_that_disagree_with_the_logged_miou_are_flagged() -> None:
    results, tables = _study(np.random.default_rng(7))
    results.loc[0, "miou"] += 0.01
    summary = report.build_summary(results, tables, n_boot=50)
    assert any("!= logged test/miou" in w for w in summary.warnings)


# --- model against model ----------------------------------------------------------------------


def _two_models(rng: np.random.Generator, gain: float, n: int = 300,
                seeds: tuple[str, ...] = ("0", "1", "2")) -> tuple[list[Run], list[Run]]:
    """Model A = model B + ``gain`` on every episode of one shared test set, plus small
    per-episode noise: the episodes' difficulty (0.2..0.9) dwarfs the gain."""
    difficulty, union, classes = _test_set(rng, n)
    out: tuple[list[Run], list[Run]] = ([], [])
    for runs, shift in zip(out, (gain, 0.0), strict=True):
        for seed in seeds:
            for budget in (0.0, 1.0):
                iou = np.clip(difficulty + shift + rng.normal(0, 0.01, n), 0, 1)
                runs.append(_run(_episode_table(iou, union, classes), budget, seed))
    return out


def test_comparing_models_pairs_their_episodes() -> None:
    """A 2-point gain over 300 shared episodes whose difficulty spreads over 0.2..0.9: the paired
    interval finds it, drawing the two models' episodes apart does not."""
    runs_a, runs_b = _two_models(np.random.default_rng(11), gain=0.02)
    paired = intervals.compare_models(runs_a, runs_b, n_boot=1000)
    unpaired = intervals.compare_models(runs_a, runs_b, n_boot=1000, paired=False)
    assert paired.budgets.tolist() == [0.0, 1.0]
    assert paired.point == pytest.approx([0.02, 0.02], abs=0.004)
    assert paired.point == pytest.approx(unpaired.point)
    (lo, hi), (ulo, uhi) = paired.interval(), unpaired.interval()
    assert (lo > 0).all() and (ulo < 0).all() and (uhi > 0).all()
    assert ((hi - lo) < 0.3 * (uhi - ulo)).all()
    assert [n.tolist() for n in paired.n_runs] == [[3, 3], [3, 3]]
    assert paired.n_episodes.tolist() == [300, 300]


def test_equal_models_compare_as_noise_and_seeds_are_not_paired_across_models() -> None:
    runs_a, runs_b = _two_models(np.random.default_rng(12), gain=0.0)
    lo, hi = intervals.compare_models(runs_a, runs_b, n_boot=500).interval()
    assert (lo < 0).all() and (hi > 0).all()
    # Model B with one seed, A with three: compared all the same (seeds are each model's own).
    found = intervals.compare_models(runs_a, [r for r in runs_b if r.seed == "0"], n_boot=50)
    assert [n.tolist() for n in found.n_runs] == [[3, 3], [1, 1]]
    with pytest.raises(ValueError, match="share no budget"):
        intervals.compare_models([r for r in runs_a if r.budget == 0.0],
                                 [r for r in runs_b if r.budget == 1.0], n_boot=10)


def _with_baseline(rng: np.random.Generator) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """`_study` for PANet, and a UMT scored on the same episodes 5 points higher."""
    panet, tables = _study(rng)
    umt = panet.copy()
    umt["model"] = "umt"
    umt["run_id"] = "umt-" + panet["run_id"]
    for old, new in zip(panet["run_id"], umt["run_id"], strict=True):
        table = tables[old].copy()
        table["intersection"] = np.minimum(
            table["union"], table["intersection"] + np.round(0.05 * table["union"])).astype(int)
        tables[new] = table
        umt.loc[umt["run_id"] == new, "miou"] = _run(table, 0.0).miou
    results = pd.concat([panet, umt], ignore_index=True)
    results["test_key"] = "pfenet-0123456789abcdef"
    return results, tables


def test_report_compares_each_model_with_the_baseline(tmp_path: Path) -> None:
    results, tables = _with_baseline(np.random.default_rng(13))
    summary = report.build_summary(results, tables, n_boot=300)
    found = summary.comparisons
    assert found["budget"].tolist() == [0.0, 0.05, 0.1, 0.2, 1.0]
    assert set(found["model"]) == {"umt"} and set(found["baseline"]) == {"panet"}
    assert (found["diff_lo"] > 0).all() and (found["verdict"] == "umt higher").all()
    expected = (summary.table.query("model == 'umt'")["miou_mean"].to_numpy()
                - summary.table.query("model == 'panet'")["miou_mean"].to_numpy())
    assert found["diff"].to_numpy() == pytest.approx(expected)
    markdown = report.to_markdown(summary)
    assert "### Models compared at each budget" in markdown
    assert "| 1 | 1 | 20 % | umt − panet | +" in markdown
    assert "| umt higher | 2 vs 2 × 150 |" in markdown
    assert "compare/umt-panet/1w1s/b0.2/diff_lo" in report.summary_metrics(summary)
    paths = report.write_summary(summary, results, tmp_path, "two models")
    assert "Models compared at each budget" in paths["html"].read_text()


def test_another_baseline_turns_the_comparison_round() -> None:
    results, tables = _with_baseline(np.random.default_rng(13))
    default = report.build_summary(results, tables, n_boot=300).comparisons
    found = report.build_summary(results, tables, n_boot=300, baseline="umt")
    rows = found.comparisons
    assert set(rows["model"]) == {"panet"} and set(rows["baseline"]) == {"umt"}
    assert rows["diff"].to_numpy() == pytest.approx(-default["diff"].to_numpy())
    assert (rows["verdict"] == "umt higher").all()
    assert "Each model against umt" in report.to_markdown(found)


@pytest.mark.parametrize(("keys", "why"), [
    (None, "not every run records its test episodes"),
    ("mixed", "they were scored on different test episodes (fold 0: test.episodes"),
])
def test_models_on_unknown_or_different_episodes_are_not_compared(keys: str | None,
                                                                  why: str) -> None:
    results, tables = _with_baseline(np.random.default_rng(14))
    if keys is None:
        results = results.drop(columns="test_key")
    else:  # UMT tested on another episode draw (say another test_seed)
        results.loc[results["model"] == "umt", "test_key"] = "pfenet-fedcba9876543210"
    summary = report.build_summary(results, tables, n_boot=50)
    assert summary.comparisons.empty
    assert any(w.startswith("1-way 1-shot: models not compared, " + why)
               for w in summary.warnings), summary.warnings
    assert "Models compared" not in report.to_markdown(summary)
