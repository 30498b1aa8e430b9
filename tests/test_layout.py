"""Bring your own dataset: layout files, datasets without a background class, void labels,
colour-coded masks, unlabelled images, and one-line user errors from the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tasks.data import ingest, store
from tasks.data.layout import NO_BACKGROUND, LayoutError, LayoutReader, load_layout
from tasks.fewshot.config import TrainConfig
from tasks.fewshot.episodes import EpisodeSampler
from tasks.fewshot.training import build_model, evaluate_fold, load_state, train

# A street scene as public datasets ship it: class ids 0..10, none of them a background, and
# void = 11 ("not annotated").
STREET = ["sky", "building", "road", "sidewalk", "vegetation", "car", "pedestrian", "pole",
          "sign", "bicycle", "terrain"]
VOID = 11
COLOURS = np.array([[70, 130, 180], [70, 70, 70], [128, 64, 128], [244, 35, 232],
                    [107, 142, 35], [0, 0, 142], [220, 20, 60], [153, 153, 153],
                    [220, 220, 0], [119, 11, 32], [152, 251, 152]], np.uint8)
WITH_VOID = np.vstack([COLOURS, [[0, 0, 0]]]).astype(np.uint8)  # void is black
FLOOR = 40  # min_pixels of the tiny runs: every drawn object holds more


def street_labels(rng: np.random.Generator, height: int = 48, width: int = 64) -> np.ndarray:
    """Sky, buildings and road bands, 2-4 objects of the other classes, a void strip."""
    labels = np.full((height, width), 1, np.uint8)  # building
    labels[: height // 4] = 0  # sky
    labels[3 * height // 4:] = 2  # road
    for c in rng.choice(np.arange(3, 11), size=int(rng.integers(2, 5)), replace=False):
        h, w = int(rng.integers(9, 16)), int(rng.integers(9, 18))
        y, x = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        labels[y:y + h, x:x + w] = c
    labels[:, int(rng.integers(0, width - 3)):][:, :2] = VOID  # an unannotated strip
    return labels


def street_image(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noise = rng.integers(-20, 21, (*labels.shape, 3))
    return np.clip(WITH_VOID[labels].astype(int) + noise, 0, 255).astype(np.uint8)


def write_streets(root: Path, counts: dict[str, int], *, seed: int = 0, unlabelled: int = 0,
                  palette: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """``{split}/images/*.jpg`` and ``{split}/labels/*.png`` (grayscale ids, or RGB colours
    with ``palette``); ``unlabelled`` extra train images have no label file. Returns the
    source label values of every labelled image."""
    rng = np.random.default_rng(seed)
    truth: dict[str, dict[str, np.ndarray]] = {}
    for split, n in counts.items():
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "labels").mkdir(parents=True, exist_ok=True)
        truth[split] = {}
        extra = unlabelled if split == "train" else 0
        for k in range(n + extra):
            stem = f"{split}_{k:04d}"
            labels = street_labels(rng)
            Image.fromarray(street_image(labels, rng)).save(
                root / split / "images" / f"{stem}.jpg", quality=95)
            if k >= n:
                continue  # an image nobody annotated
            truth[split][stem] = labels
            coded = WITH_VOID[labels] if palette else labels
            Image.fromarray(coded).save(root / split / "labels" / f"{stem}.png")
    return truth


def write_layout(path: Path, **keys) -> Path:
    base = {"root": ".", "images": "{split}/images/{stem}.jpg",
            "masks": "{split}/labels/{stem}.png", "splits": ["train", "val", "test"],
            "classes": STREET, "background": None, "ignore": [VOID]}
    path.write_text(yaml.safe_dump(base | keys, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def streets(tmp_path_factory: pytest.TempPathFactory):
    """24 train (+3 without labels) / 8 val / 16 test street scenes, ingested at 32 px."""
    root = tmp_path_factory.mktemp("streets")
    truth = write_streets(root, {"train": 24, "val": 8, "test": 16}, unlabelled=3)
    layout = write_layout(root / "streets.yaml", unlabelled=True)
    url = str(tmp_path_factory.mktemp("store") / "s.zarr")
    summary = ingest.ingest_dataset("layout", str(layout), url, "streets", size=32,
                                    shard_size=16)
    return root, layout, url, truth, summary


# --------------------------------------------------------------------------------------------
# ingest


def test_no_background_class_maps_ids_and_void_pixel_by_pixel(streets) -> None:
    root, layout, url, truth, summary = streets
    assert summary["complete"] and summary["quarantined"] == 0
    assert summary["ingested"] == 24 + 3 + 8 + 16 and summary["unlabelled"] == 3
    ds = store.open_dataset(url, "streets")
    # Store id 0 is an empty background slot; label value i is store id i + 1.
    assert ds.classes == [NO_BACKGROUND, *STREET]
    assert ds.source_ids == [-1, *range(11)]
    for split, masks in truth.items():
        assert sorted(ds.split_ids(split)) == sorted(masks)
        for stem, labels in masks.items():
            expected = np.where(labels == VOID, 255, labels + 1).astype(np.uint8)
            np.testing.assert_array_equal(ds.original_mask(stem), expected)
    assert ds.class_pixels[:, 0].sum() == 0  # the background slot holds no pixel
    stored = ds.original_mask("test_0000")
    assert stored.shape == (48, 64) and (stored == 255).any()


def test_unlabelled_images_are_images_only(streets) -> None:
    _, _, url, _, _ = streets
    ds = store.open_dataset(url, "streets")
    bare = ["train_0024", "train_0025", "train_0026"]
    assert ds.unlabelled_ids == bare
    assert set(bare) <= set(ds.ids)  # readable images ...
    assert not set(bare) & set(ds.split_ids("train"))  # ... never in the labelled pool
    assert set(bare) <= set(ds.split_ids("train", unlabelled=True))
    for i in bare:
        assert (ds.mask(i) == 255).all() and (ds.original_mask(i) == 255).all()
        assert ds.pixels(i).sum() == 0 and ds.image(i).std() > 0
    # Eligibility would exclude them even if a pool named them: they count no class pixel.
    sampler = EpisodeSampler(ds, split="train", classes=list(range(1, 12)), min_pixels=FLOOR)
    assert not set(bare) & {i for ids in sampler.eligible.values() for i in ids}
    # Label-free stages (pretraining, features, pseudo masks) read them.
    images = store.UnlabelledImages(url, "streets")
    assert set(bare) <= set(images.split_ids("train"))
    info = store.inspect_store(url)["datasets"]["streets"][ds.version]
    assert info["unlabelled"] == {"train": 3} and info["splits"]["train"] == 27


def test_label_free_stages_use_unlabelled_images(streets) -> None:
    """Features are computed for every ingested image; pseudo episodes draw from all of them."""
    from tasks.labelfree import features
    from tasks.labelfree.pseudo_tasks import PseudoEpisodeSampler

    _, _, url, _, _ = streets
    ds = store.open_dataset(url, "streets")
    spec = {"kind": "backbone", "backbone": "small_resnet", "layer": "layer2",
            "checkpoint": None}
    plan = features.plan_features(url, "streets", spec)
    features.create_features(plan)
    for k in range(plan.n_shards):
        features.extract_shard(url, "streets", ds.version, plan.key, k, spec)
    store.finalize_derived(url, "streets", ds.version, plan.key)
    feats = store.open_derived(url, "streets", plan.key)
    assert all(np.abs(feats.get(i).astype(np.float32)).sum() > 0 for i in ds.unlabelled_ids)
    # A pseudo-mask group (one cluster per image half) over every row, as `fss pseudo` writes.
    n, size, k = len(ds.index), ds.size, 2
    masks = np.zeros((n, size, size), np.uint8)
    masks[:, size // 2:] = 1
    fields = [store.DerivedField("mask", (size, size), "uint8", fill=255),
              store.DerivedField("counts", (k,), "int64"),
              store.DerivedField("prototypes", (k, 4), "float16")]
    key, _ = store.create_derived(url, "streets", ds.version, "pseudo", {"test": 1}, fields)
    for shard, (a, b) in enumerate(store.shard_bounds(n, ds.shard_size)):
        store.write_derived_shard(url, "streets", ds.version, key, shard, {
            "mask": masks[a:b], "counts": np.full((b - a, k), size * size // 2),
            "prototypes": np.ones((b - a, k, 4), np.float16)})
    store.finalize_derived(url, "streets", ds.version, key)
    sampler = PseudoEpisodeSampler(ds, store.open_derived(url, "streets", key), min_pixels=10)
    assert set(ds.unlabelled_ids) <= set(sampler.ids.tolist())
    assert len(sampler.ids) == 27


def test_rerun_is_noop_and_the_meaning_of_labels_makes_the_version(streets, tmp_path) -> None:
    root, layout, url, _, summary = streets
    again = ingest.ingest_dataset("layout", str(layout), url, "streets", size=32, shard_size=16)
    assert again["version"] == summary["version"] and again["shards_written"] == 0
    readers = lambda path: [LayoutReader(path, s) for s in ("train", "val", "test")]  # noqa: E731
    # Another void value is another dataset version; the same files seen from elsewhere not.
    other = write_layout(root / "other.yaml", unlabelled=True, ignore=[VOID, 200])
    moved = tmp_path / "elsewhere.yaml"
    write_layout(moved, unlabelled=True, root=str(root))
    version = ingest.plan_ingest(readers(layout), "streets", size=32).spec.version
    assert ingest.plan_ingest(readers(moved), "streets", size=32).spec.version == version
    assert ingest.plan_ingest(readers(other), "streets", size=32).spec.version != version


def test_named_background_becomes_class_zero(tmp_path: Path) -> None:
    truth = write_streets(tmp_path, {"train": 4}, seed=1)
    layout = write_layout(tmp_path / "l.yaml", splits=["train"], background="sky")
    reader = LayoutReader(layout, "train")
    assert reader.classes == STREET
    bg_last = write_layout(tmp_path / "b.yaml", splits=["train"], background="terrain")
    reader = LayoutReader(bg_last, "train")
    assert reader.classes == ["terrain", *STREET[:-1]]
    item = reader.list_items()[0]
    _, mask = reader.load(item)
    src = truth["train"][item.id]
    lut = np.full(256, 255, np.uint8)
    lut[:10] = np.arange(1, 11)
    lut[10] = 0
    np.testing.assert_array_equal(mask, lut[src])


def test_colour_coded_masks_with_a_palette(tmp_path: Path) -> None:
    truth = write_streets(tmp_path, {"train": 5}, seed=2, palette=True)
    palette = {name: COLOURS[k].tolist() for k, name in enumerate(STREET)}
    layout = write_layout(tmp_path / "l.yaml", splits=["train"], palette=palette,
                          ignore=[[0, 0, 0]])
    reader = LayoutReader(layout, "train")
    items = reader.list_items()
    for item in items:
        _, mask = reader.load(item)
        src = truth["train"][item.id]
        np.testing.assert_array_equal(mask, np.where(src == VOID, 255, src + 1))
    # A colour the palette does not know quarantines the mask, naming the colour.
    path = tmp_path / "train" / "labels" / f"{items[0].id}.png"
    rgb = np.array(Image.open(path))
    rgb[0, 0] = [1, 2, 3]
    Image.fromarray(rgb).save(path)
    with pytest.raises(Exception, match=r"unknown colours \[1, 2, 3\]"):
        reader.load(items[0])
    # Grayscale ids under a palette layout are refused with the reason.
    Image.fromarray(truth["train"][items[1].id]).save(
        tmp_path / "train" / "labels" / f"{items[1].id}.png")
    with pytest.raises(Exception, match="holds no colours"):
        reader.load(items[1])


def test_remap_covers_reduce_zero_label_and_unknown_values_are_named(tmp_path: Path) -> None:
    # mmsegmentation's reduce_zero_label: 0 is void, value v is class v - 1.
    (tmp_path / "img").mkdir()
    (tmp_path / "ann").mkdir()
    labels = np.array([[0, 1, 2], [3, 3, 1]], np.uint8)
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    Image.fromarray(labels).save(tmp_path / "ann" / "a.png")
    layout = write_layout(tmp_path / "l.yaml", images="img/{stem}.png", masks="ann/{stem}.png",
                          splits=["train"], classes=["wall", "floor", "door"], ignore=[],
                          remap={0: "ignore", 1: "wall", 2: "floor", 3: "door"})
    reader = LayoutReader(layout, "train")
    (item,) = reader.list_items()
    _, mask = reader.load(item)
    np.testing.assert_array_equal(mask, [[255, 1, 2], [3, 3, 1]])
    Image.fromarray(np.array([[0, 7, 9]], np.uint8)).save(tmp_path / "ann" / "a.png")
    Image.fromarray(np.zeros((1, 3, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    with pytest.raises(Exception, match=r"unknown label values 7, 9 .*l\.yaml"):
        reader.load(reader.list_items()[0])


def test_missing_masks_are_quarantined_unless_unlabelled(tmp_path: Path) -> None:
    write_streets(tmp_path, {"train": 3}, unlabelled=2)
    strict = write_layout(tmp_path / "strict.yaml", splits=["train"])
    url = str(tmp_path / "s.zarr")
    summary = ingest.ingest_dataset("layout", str(strict), url, "strict", size=32)
    assert (summary["ingested"], summary["quarantined"], summary["unlabelled"]) == (3, 2, 0)
    q = store.open_dataset(url, "strict").quarantine
    assert q["reason"].str.contains("no mask file .*unlabelled: true").all()


BAD_LAYOUTS = [
    ({"ignore": [3]}, "ignore[0]: 3 is the label value of class 'sidewalk'"),
    ({"background": "sea"}, "background: 'sea' is not one of the classes"),
    ({"images": "{split}/images/x.jpg"}, "images: needs {stem} exactly once"),
    ({"masks": "../{split}/{stem}.png"}, "masks: must be relative to root"),
    ({"images": "{split}/{name}/{stem}.jpg"}, "images: unknown placeholder {name}"),
    ({"images": "images/{stem}.jpg"}, "images: 'images/{stem}.jpg' has no {split}"),
    ({"classes": ["a", "b", "a"]}, "classes: class 'a' is named twice"),
    ({"colour": "blue"}, "colour: unknown key (value 'blue')"),
    ({"ignore": [70000]}, "ignore[0]: 70000 is not a label value"),
    ({"remap": {4: "boat"}}, "remap.4: 'boat' is neither a class nor 'ignore'"),
    ({"palette": {"sky": [1, 2]}}, "palette.sky: [1, 2] is not a colour"),
    ({"root": "nowhere"}, "root: 'nowhere' resolves to"),
    ({"splits": "train"}, "splits: Input should be a valid list (got 'train')"),
]


@pytest.mark.parametrize(("keys", "message"), BAD_LAYOUTS)
def test_bad_layout_names_file_key_and_value(tmp_path: Path, keys: dict, message: str) -> None:
    layout = write_layout(tmp_path / "bad.yaml", **keys)
    with pytest.raises(LayoutError) as err:
        load_layout(layout)
    text = str(err.value)
    assert text.startswith(f"{layout}: ") and message in text and "\n" not in text


def test_layout_file_errors(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="layout file .*missing.yaml does not exist"):
        load_layout(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("classes: [a, b\nimages: x\n")
    with pytest.raises(LayoutError, match=r"broken.yaml: not valid YAML at line 2"):
        load_layout(broken)
    no_bg = write_layout(tmp_path / "nobg.yaml")
    no_bg.write_text(no_bg.read_text().replace("background: null\n", ""))
    with pytest.raises(LayoutError, match="background: required key is missing"):
        load_layout(no_bg)
    (tmp_path / "train" / "images").mkdir(parents=True)
    empty = write_layout(tmp_path / "empty.yaml")
    with pytest.raises(LayoutError, match="splits: 'dev' is not one of"):
        LayoutReader(empty, "dev")
    with pytest.raises(Exception, match="no file under .* matches"):
        LayoutReader(empty, "train").list_items()
    with pytest.raises(Exception, match="needs the folder .*val/images"):
        LayoutReader(empty, "val").list_items()


def test_stems_may_span_folders(tmp_path: Path) -> None:
    """Cityscapes: leftImg8bit/{split}/<city>/<stem>_leftImg8bit.png."""
    for city in ("aachen", "bonn"):
        for d in (f"leftImg8bit/train/{city}", f"gtFine/train/{city}"):
            (tmp_path / d).mkdir(parents=True)
        stem = f"{city}/{city}_000000_000019"
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(
            tmp_path / f"leftImg8bit/train/{stem}_leftImg8bit.png")
        Image.fromarray(np.ones((4, 4), np.uint8)).save(
            tmp_path / f"gtFine/train/{stem}_gtFine_labelIds.png")
    layout = write_layout(tmp_path / "cs.yaml", images="leftImg8bit/{split}/{stem}_leftImg8bit.png",
                          masks="gtFine/{split}/{stem}_gtFine_labelIds.png", splits=["train"])
    reader = LayoutReader(layout, "train")
    items = reader.list_items()
    assert [i.id for i in items] == ["aachen/aachen_000000_000019", "bonn/bonn_000000_000019"]
    assert (reader.load(items[0])[1] == 2).all()


# --------------------------------------------------------------------------------------------
# the whole path: named novel classes, a test split, no background class


def test_train_and_evaluate_without_a_background_class(streets, tmp_path: Path) -> None:
    _, _, url, _, _ = streets
    cfg = TrainConfig(model="metasegnet", store=url, dataset="streets",
                      novel_classes=["car", "pedestrian"], test_split="test", steps=4,
                      batch_size=2, checkpoint_every=2, val_every=2, val_episodes=2,
                      test_episodes=6, test_shots=[1], min_pixels=FLOOR,
                      model_args={"embed_dim": 16, "global_dim": 32, "local_dim": 16},
                      experiment="test", out_dir=str(tmp_path / "runs"))
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.steps == 4 and result.labels["images"] == 24  # unlabelled images not counted
    model = build_model(cfg)
    model.load_state_dict(load_state(tmp_path / "run" / "checkpoints" / "best.pt")["model"])
    (scores,) = evaluate_fold(cfg, model, progress=False)
    assert scores.episodes == 6 and 0.0 <= scores.miou <= 1.0 and np.isfinite(scores.fbiou)
    assert set(scores.per_class) == {"car", "pedestrian"}
    assert torch.isfinite(torch.tensor(scores.miou))
# --------------------------------------------------------------------------------------------
# the CLI: a user error is one line, exit 2


def _fss(*args: str, env: dict | None = None, cwd: Path | None = None):
    exe = Path(sys.executable).with_name("fss")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def test_cli_bad_layout_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    bad = write_layout(tmp_path / "bad.yaml", ignore=[3])
    done = _fss("ingest", "--layout", str(bad), "--name", "x", "--store",
                str(tmp_path / "s.zarr"), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("fss: error: ") and str(bad) in lines[0] and "ignore[0]" in lines[0]
    # The same in-process (a subprocess costs seconds of imports): a missing file, --debug.
    from flows.cli import main

    assert main(["ingest", "--layout", str(tmp_path / "nope.yaml"), "--name", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.yaml does not exist" in err
    assert main(["--debug", "ingest", "--layout", str(bad), "--name", "x"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == lines[0]
    assert main(["ingest", "--layout", str(bad), "--root", ".", "--name", "x"]) == 2
    assert "drop --root" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_error_inside_a_flow_is_one_line(tmp_path: Path, prefect_api_url: str) -> None:
    """A wrong root surfaces inside the ingest flow: Prefect's own traceback is not shown."""
    done = _fss("ingest", "--source", "voc", "--root", str(tmp_path / "missing"), "--name",
                "x", "--store", str(tmp_path / "s.zarr"), "--workers", "1", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"fss: error: dataset root {tmp_path / 'missing'} is not a directory"], done.stderr


@pytest.mark.slow
def test_cli_ingests_a_layout(tmp_path: Path, prefect_api_url: str) -> None:
    write_streets(tmp_path, {"train": 4, "val": 2}, unlabelled=1)
    layout = write_layout(tmp_path / "streets.yaml", splits=["train", "val"], unlabelled=True)
    url = str(tmp_path / "s.zarr")
    done = _fss("ingest", "--layout", str(layout), "--name", "streets", "--store", url,
                "--size", "32", "--workers", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "ingested 7 (1 without a mask) + quarantined 0 = 7 of 7 listed" in done.stdout
    done = _fss("store", "inspect", url, "--json", cwd=tmp_path)
    info = next(iter(json.loads(done.stdout)["datasets"]["streets"].values()))
    assert info["classes"][0] == NO_BACKGROUND and info["unlabelled"] == {"train": 1}


def test_an_unexpected_error_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.cli as cli
    from flows.cli import data as data_cli

    def bug(args):
        raise KeyError("a bug, not a user error")

    monkeypatch.setattr(data_cli, "cmd_inspect", bug)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["store", "inspect", "nowhere.zarr"])
