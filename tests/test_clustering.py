"""Spherical k-means, superpixel refinement, pseudo masks without labels, the report, flows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from models.kmeans import kmeans as reference_kmeans
from tasks.data import store
from tasks.labelfree import clustering, features
from tests.test_features import SPEC, checksums, forbid_labels, ingest_store

QUARANTINED_ROW = 3
CFG = clustering.PseudoConfig(k=6, seed=1, sample_size=2000, init_size=500, iters=30)


def blobs(k: int = 5, d: int = 16, n: int = 150, noise: float = 0.05,
          seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit points around k well-separated unit centres (orthonormal: cosine 0 apart)."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(d, d)))[0][:k].astype(np.float32)
    labels = rng.integers(k, size=n * k)
    x = centres[labels] + noise * rng.normal(size=(n * k, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels, centres


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_spherical_kmeans_recovers_blobs_like_the_reference() -> None:
    x, truth, centres = blobs()
    pieces = np.array_split(x, 3)
    result = clustering.spherical_kmeans(pieces, 5, seed=0)
    assert result.converged and result.iterations < 10
    cos = result.centers @ centres.T
    assert np.allclose(np.sort(cos.max(1)), 1.0, atol=2e-3)  # every centre found once
    assert sorted(cos.argmax(1).tolist()) == list(range(5))
    labels = (x @ result.centers.T).argmax(1)
    assert same_partition(labels, truth)
    ref, _ = reference_kmeans(torch.from_numpy(x)[None], 5,
                              generator=torch.Generator().manual_seed(0))
    assert same_partition((x @ ref[0].numpy().T).argmax(1), labels)
    assert sorted(result.counts.tolist()) == sorted(np.bincount(truth).tolist())


def test_kmeans_is_deterministic_by_seed_here_and_on_dask() -> None:
    from distributed import Client, LocalCluster

    x, _, _ = blobs(k=8, d=12, noise=0.4, seed=3)  # overlapping: seeding matters
    pieces = np.array_split(x, 4)
    a = clustering.spherical_kmeans(pieces, 8, seed=5, init_size=300)
    b = clustering.spherical_kmeans(pieces, 8, seed=5, init_size=300)
    np.testing.assert_array_equal(a.centers, b.centers)
    assert a.objective == b.objective
    c = clustering.spherical_kmeans(pieces, 8, seed=6, init_size=300)
    assert not np.array_equal(a.centers, c.centers)
    with LocalCluster(processes=False, n_workers=2, threads_per_worker=1,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        futures = client.scatter(pieces)
        d = clustering.spherical_kmeans(futures, 8, seed=5, init_size=300, client=client)
    np.testing.assert_array_equal(a.centers, d.centers)
    assert a.objective == d.objective


@pytest.mark.parametrize("transpose", [False, True])
def test_superpixels_move_a_boundary_onto_the_image_edge(transpose: bool) -> None:
    # 48 x 80 image: flat colour left of column 37, another colour from 37 on. The score map
    # (stride 8, 6 x 10 cells) puts its argmax boundary at column 40 (between cells 4 and 5).
    image = np.zeros((48, 80, 3), np.uint8)
    image[:, :37] = (200, 40, 40)
    image[:, 37:] = (30, 90, 220)
    ramp = torch.tensor(4.5 - np.arange(10), dtype=torch.float32).expand(6, 10)
    scores = torch.stack([ramp, -ramp])
    if transpose:  # the same along the other axis: 80 x 48
        image, scores = image.transpose(1, 0, 2).copy(), scores.transpose(1, 2)
    raw = clustering.upsample_scores(scores, image.shape[:2], 8).argmax(0).numpy()
    refined = clustering.refine(image, scores, 8, CFG)
    if transpose:
        raw, refined = raw.T, refined.T
    assert (raw[:, :40] == 0).all() and (raw[:, 40:] == 1).all()
    assert (refined[:, :37] == 0).all() and (refined[:, 37:] == 1).all()


def test_upsampling_crops_instead_of_stretching() -> None:
    # A 45 x 75 image seen at stride 8 gives 6 x 10 cells that cover 48 x 80 pixels: the
    # boundary at pixel 40 must stay at 40 (stretching to 75 columns would move it to ~37.5).
    ramp = torch.tensor(4.5 - np.arange(10), dtype=torch.float32).expand(6, 10)
    scores = torch.stack([ramp, -ramp])
    up = clustering.upsample_scores(scores, (45, 75), 8)
    assert up.shape == (2, 45, 75)
    labels = up.argmax(0).numpy()
    assert (labels[:, :40] == 0).all() and (labels[:, 40:] == 1).all()
    with pytest.raises(ValueError, match="does not cover"):
        clustering.upsample_scores(scores, (50, 75), 8)


def test_spans_prototypes_and_background_flags() -> None:
    mask = np.zeros((8, 12), np.uint8)
    mask[2:5, 3:6] = 1
    mask[:, 10:] = 2
    spans = clustering.region_spans(mask, 4)
    np.testing.assert_array_equal(spans, [[8, 10], [3, 3], [8, 2], [0, 0]])
    f = torch.zeros(2, 2, 3)  # 2-d features on a stride-4 grid covering 8 x 12
    f[0] = 1.0
    f[1, :, 2] = 1.0
    protos = clustering.masked_prototypes(f, mask, 4, 4)
    np.testing.assert_allclose(protos[1], [1, 0], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(protos[:3], axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(protos[2], [2 ** -0.5, 2 ** -0.5], atol=1e-6)
    assert (protos[3] == 0).all()  # absent cluster

    counts = np.array([[50, 9, 0], [40, 9, 5], [60, 0, 5]])
    spans = np.array([[[100, 100], [10, 20], [0, 0]],
                      [[95, 30], [99, 10], [20, 20]],
                      [[10, 10], [0, 0], [20, 20]]])
    assert clustering.background_clusters(spans, counts, 100) == [0]
    assert clustering.background_clusters(spans, counts, 100, image_frac=0.4) == [0, 1]


def test_cluster_scores_on_known_tables() -> None:
    perfect = np.array([[0, 7, 0], [5, 0, 0], [0, 0, 3], [0, 0, 0]])
    s = clustering.cluster_scores(perfect)
    assert s["purity"] == 1 and s["miou"] == 1 and s["miou_fg"] == 1
    assert s["nmi"] == pytest.approx(1.0)
    assert {c: v["cluster"] for c, v in s["per_class"].items()} == {0: 1, 1: 0, 2: 2}

    split = np.array([[10, 0], [0, 5], [0, 5]])  # class 1 split over two clusters
    s = clustering.cluster_scores(split)
    assert s["purity"] == 1 and s["miou"] == pytest.approx(0.75)
    assert s["miou_fg"] == pytest.approx(0.5)
    sklearn = pytest.importorskip("sklearn.metrics")
    truth = np.repeat([0, 1, 1], [10, 5, 5])
    pred = np.repeat([0, 1, 2], [10, 5, 5])
    assert s["nmi"] == pytest.approx(sklearn.normalized_mutual_info_score(truth, pred))


def test_report_json_writes_null_for_nan(tmp_path: Path) -> None:
    """A split with background pixels only has no foreground mIoU: null in report.json, which
    stays valid JSON (json.dumps would write NaN)."""
    scores = clustering.cluster_scores(np.array([[6], [2]]))  # 2 clusters, background only
    assert np.isnan(scores["miou_fg"])
    report = {"dataset": "d", "version": "v", "pseudo": "k", "classes": ["background"],
              "all": scores, "splits": {"train": scores}}
    json_path, _ = clustering.write_report(report, tmp_path)

    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    saved = json.loads(json_path.read_text(), parse_constant=refuse)
    assert saved["all"]["miou_fg"] is None and saved["splits"]["train"]["miou_fg"] is None
    assert saved["all"]["purity"] == 1.0


@pytest.fixture(scope="module")
def feature_store(synth_root: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> tuple[str, str, str]:
    url = str(tmp_path_factory.mktemp("clustering") / "s.zarr")
    version = ingest_store(synth_root, url)
    status = zarr.open_array(f"{url}/datasets/synth/{version}/index/status", mode="r+")
    status[QUARANTINED_ROW] = store.QUARANTINED  # stages must skip rows without an image
    plan = features.plan_features(url, "synth", SPEC)
    features.create_features(plan)
    for k in range(plan.n_shards):
        features.extract_shard(url, "synth", version, plan.key, k, SPEC)
    store.finalize_derived(url, "synth", version, plan.key)
    return url, version, plan.key


def _pseudo(url: str, version: str, fkey: str, shards) -> str:
    result = clustering.fit_kmeans(url, "synth", version, fkey, CFG)
    key = clustering.create_pseudo(url, "synth", version, fkey, CFG, result)
    for s in shards:
        clustering.assign_shard(url, "synth", version, key, s)
    return key


def test_pseudo_masks_read_no_label_then_resume_identically(
        feature_store: tuple[str, str, str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    src, version, fkey = feature_store
    url, crashed = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    shutil.copytree(src, url)
    shutil.copytree(src, crashed)
    forbid_labels(monkeypatch)
    key = _pseudo(url, version, fkey, range(4))
    assert _pseudo(crashed, version, fkey, (0, 3)) == key
    assert all(clustering.assign_shard(url, "synth", version, key, s).skipped
               for s in range(4))
    assert [clustering.assign_shard(crashed, "synth", version, key, s).skipped
            for s in range(4)] == [True, False, False, True]
    summary = clustering.finalize_pseudo(url, "synth", version, key)
    with pytest.raises(AssertionError, match="label"):  # the guard does bite
        clustering.cluster_report(url, "synth", version, key)
    monkeypatch.undo()

    folder = Path("datasets") / "synth" / version / "derived" / key
    assert checksums(Path(crashed) / folder) == checksums(Path(url) / folder)
    assert summary["complete"]
    pseudo = store.open_derived(url, "synth", key)
    counts, masks = pseudo.read(clustering.COUNTS), pseudo.read(clustering.MASK)
    ok = np.arange(56) != QUARANTINED_ROW
    assert (counts[ok].sum(1) == 64 * 64).all() and masks[ok].max() < CFG.k
    assert (masks[QUARANTINED_ROW] == clustering.UNASSIGNED).all()
    assert counts[QUARANTINED_ROW].sum() == 0 and len(pseudo.ids) == 55
    assert pseudo.attrs["kmeans"]["iterations"] >= 1
    assert pseudo.extra("centers").shape == (CFG.k, 256)
    assert set(pseudo.attrs["background"]["clusters"]) <= set(range(CFG.k))
    assert pseudo.params["features"] == fkey and pseudo.params["fit_splits"] == ["train"]

    report = clustering.cluster_report(url, "synth", version, key)
    assert set(report["splits"]) == {"train", "val"}
    for scores in (report["all"], *report["splits"].values()):
        assert 0 < scores["purity"] <= 1 and 0 <= scores["nmi"] <= 1
        assert 0 <= scores["miou_fg"] <= scores["purity"] + 1
    files = clustering.write_report(report, tmp_path / "report")
    assert json.loads(files[0].read_text())["pseudo"] == key
    assert "class_id" in files[1].read_text().splitlines()[0]


@pytest.mark.slow
def test_features_and_pseudo_flows_on_local_cluster(
        feature_store: tuple[str, str, str], tmp_path: Path, prefect_api_url: str,
        monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Both flows on one 2-worker LocalCluster: features with GPU requests, pseudo masks from
    the CLI with a report logged to MLflow, then a rerun of both that writes nothing."""
    import argparse

    from distributed import LocalCluster
    from distributed.diagnostics.plugin import SchedulerPlugin
    from mlflow.tracking import MlflowClient

    from flows.cli.labelfree import add_features_parser, add_pseudo_parser
    from flows.pseudo import run_pseudo
    from flows.runtime import prefect_api

    class Restrictions(SchedulerPlugin):
        """Records the resources each submitted task asked for."""

        def __init__(self) -> None:
            self.seen: dict[str, dict | None] = {}

        def update_graph(self, scheduler, *, keys, **kw) -> None:
            self.seen |= {str(k): scheduler.tasks[k].resource_restrictions for k in keys
                          if k in scheduler.tasks}

    src, version, _ = feature_store
    url = str(tmp_path / "s.zarr")
    shutil.copytree(src, url, ignore=shutil.ignore_patterns("derived"))
    monkeypatch.chdir(tmp_path)  # reports and the MLflow DB land here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_features_parser(sub)
    add_pseudo_parser(sub)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, resources={"GPU": 1}) as cluster:
        plugin = Restrictions()
        cluster.scheduler.add_plugin(plugin)
        address = cluster.scheduler_address
        with prefect_api():
            args = parser.parse_args(["features", "--store", url, "--dataset", "synth",
                                      "--embedder", json.dumps(SPEC), "--gpu",
                                      "--dask-address", address])
            assert args.func(args) == 0
            gpu = dict(plugin.seen)
            fkey = features.features_key(SPEC)
            args = parser.parse_args(["pseudo", "--store", url, "--dataset", "synth",
                                      "--features", fkey, "--k", "6", "--seed", "1",
                                      "--sample-size", "2000", "--experiment", "pseudo-test",
                                      "--dask-address", address])
            assert args.func(args) == 0
            again = run_pseudo(dask_address=address, embedder=SPEC, store_url=url,
                               name="synth", k=6, seed=1, sample_size=2000,
                               experiment="pseudo-test", progress=False)
            with monkeypatch.context() as m:  # nothing left to do: no Dask client at all
                m.setattr("distributed.Client", None)
                idle = run_pseudo(dask_address=address, embedder=SPEC, store_url=url,
                                  name="synth", k=6, seed=1, sample_size=2000, report=False,
                                  progress=False)
    # The 4 shards in 4 runs of one (2 workers x TASKS_PER_SLOT), each holding a GPU.
    assert sorted(map(str, gpu.values())) == ["{'GPU': 1}"] * 4, gpu
    assert {"GPU": 1} not in [r for k, r in plugin.seen.items() if k not in gpu]
    out = capsys.readouterr().out
    assert f"features {fkey} of synth" in out and "4 shards written (55 images)" in out
    assert "4 shards assigned, 0 already complete" in out
    assert "Hungarian mIoU" in out and "MLflow run" in out
    assert again["features_run"]["shards_written"] == 0
    assert again["kmeans"] == {"skipped": True} and again["shards_written"] == 0
    assert again["complete"] and again["report"]["purity"] > 0
    assert idle["features_run"]["shards_written"] == idle["shards_written"] == 0
    assert idle["complete"] and idle["kmeans"] == {"skipped": True} and idle["report"] is None
    report = Path(again["report_files"][0])
    assert report.is_file() and report.parent.name == again["key"]
    runs = MlflowClient().search_runs([MlflowClient().get_experiment_by_name(
        "pseudo-test").experiment_id])
    assert [r.info.run_id for r in runs] == [again["mlflow_run_id"]]  # logged once
    assert runs[0].data.metrics["purity"] == pytest.approx(again["report"]["purity"])
