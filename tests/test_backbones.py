"""Backbones: torchvision key compatibility, dilation, output strides, checkpoint loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.backbones import LAYERS, Backbone, load_checkpoint, resnet50, small_resnet

BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def torchvision_resnet50_keys(with_fc: bool) -> list[str]:
    """torchvision.models.resnet50().state_dict() keys, spelled out from its layout."""
    keys = ["conv1.weight", *(f"bn1.{s}" for s in BN_SUFFIXES)]
    for i, n_blocks in enumerate((3, 4, 6, 3), start=1):
        for b in range(n_blocks):
            p = f"layer{i}.{b}"
            for j in (1, 2, 3):
                keys += [f"{p}.conv{j}.weight", *(f"{p}.bn{j}.{s}" for s in BN_SUFFIXES)]
            if b == 0:
                keys += [f"{p}.downsample.0.weight"]
                keys += [f"{p}.downsample.1.{s}" for s in BN_SUFFIXES]
    if with_fc:
        keys += ["fc.weight", "fc.bias"]
    return keys


# ResNet-50s take ~1 s each to initialise on 2 cores: build each variant once per module.
@pytest.fixture(scope="module")
def r50() -> Backbone:
    torch.manual_seed(0)
    return resnet50()


@pytest.fixture(scope="module")
def r50_dilated() -> Backbone:
    return resnet50(dilated=True)


@pytest.fixture(scope="module")
def r50_state(r50: Backbone) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in r50.state_dict().items()}


def _scrambled(m: Backbone) -> Backbone:
    """Zero every tensor so that a successful load is visible."""
    with torch.no_grad():
        for v in m.state_dict().values():
            v.zero_()
    return m


def test_resnet50_keys_match_torchvision(r50: Backbone, r50_state: dict[str, torch.Tensor]) -> None:
    assert len(torchvision_resnet50_keys(with_fc=True)) == 320
    expected = torchvision_resnet50_keys(with_fc=False)
    assert len(expected) == 318
    assert list(r50_state) == expected
    shapes = {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer3.5.bn3.running_var": (1024,),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
    }
    for k, shape in shapes.items():
        assert tuple(r50_state[k].shape) == shape
    n_params = sum(p.numel() for p in r50.parameters())
    assert n_params == 25_557_032 - (2048 * 1000 + 1000)  # torchvision count minus fc


def test_resnet50_dilation_follows_torchvision(r50: Backbone, r50_dilated: Backbone) -> None:
    # replace_stride_with_dilation=[False, True, True]: the first block of a dilated stage keeps
    # the previous dilation; later blocks use the new one.
    m = r50_dilated
    expected = {
        "layer2": (2, [1, 1, 1, 1]),
        "layer3": (1, [1, 2, 2, 2, 2, 2]),
        "layer4": (1, [2, 4, 4]),
    }
    for name, (stride0, dilations) in expected.items():
        layer = getattr(m, name)
        assert layer[0].conv2.stride == (stride0, stride0)
        assert [blk.conv2.dilation[0] for blk in layer] == dilations
        assert [blk.conv2.padding[0] for blk in layer] == dilations
    assert m.strides == {"layer1": 4, "layer2": 8, "layer3": 8, "layer4": 8}
    assert r50.strides == {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}


@pytest.mark.parametrize("size", [64, 65])
def test_dilated_output_stride_8(size: int, r50_dilated: Backbone) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    for m in (small_resnet(dilated=True), r50_dilated):
        with torch.no_grad():
            out = m.eval()(x)
        assert list(out) == list(LAYERS)
        side = -(-size // 8)  # ceil: "same" padding keeps the border cell
        for name in ("layer2", "layer3", "layer4"):
            assert out[name].shape[-2:] == (side, side)
        for name in LAYERS:
            assert out[name].shape[1] == m.channels[name]


def test_small_resnet_size_and_strides() -> None:
    m = small_resnet()
    n = sum(p.numel() for p in m.parameters())
    assert 0.5e6 <= n <= 2e6
    assert m.channels == {"layer1": 32, "layer2": 64, "layer3": 128, "layer4": 256}
    plain = small_resnet(width=16, dilated=False)
    assert plain.strides == {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
    out = plain(torch.randn(2, 3, 64, 64))
    assert out["layer4"].shape == (2, 128, 2, 2)


def _assert_same_weights(m: Backbone, state: dict[str, torch.Tensor]) -> None:
    got = m.state_dict()
    for k, v in state.items():
        assert torch.equal(got[k], v), k


def test_load_moco_v2_checkpoint(
    tmp_path: Path, r50_dilated: Backbone, r50_state: dict[str, torch.Tensor]
) -> None:
    moco = {f"module.encoder_q.{k}": v for k, v in r50_state.items()}
    # MoCo v2's MLP head on the query encoder, the momentum encoder and the queue.
    moco["module.encoder_q.fc.0.weight"] = torch.zeros(2048, 2048)
    moco["module.encoder_q.fc.0.bias"] = torch.zeros(2048)
    moco["module.encoder_q.fc.2.weight"] = torch.zeros(128, 2048)
    moco["module.encoder_q.fc.2.bias"] = torch.zeros(128)
    moco["module.encoder_k.conv1.weight"] = torch.zeros(64, 3, 7, 7)
    moco["module.queue"] = torch.zeros(128, 16)
    moco["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    path = tmp_path / "moco_v2.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": moco}, path)

    m = _scrambled(r50_dilated)  # dilation changes no parameter shape
    report = load_checkpoint(m, path)
    assert report.prefix == "module.encoder_q."
    assert report.loaded == sorted(torchvision_resnet50_keys(with_fc=False))
    assert not report.missing and not report.unexpected and not report.mismatched
    assert sorted(report.ignored) == sorted(
        [k for k in moco if ".fc." in k or "encoder_k" in k or "queue" in k]
    )
    _assert_same_weights(m, r50_state)


def test_load_torchvision_checkpoint(
    tmp_path: Path, r50_dilated: Backbone, r50_state: dict[str, torch.Tensor]
) -> None:
    official = dict(
        r50_state, **{"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}
    )
    path = tmp_path / "resnet50.pth"
    torch.save(official, path)
    m = _scrambled(r50_dilated)
    report = load_checkpoint(m, path)
    assert report.prefix == ""
    assert set(report.loaded) | set(report.ignored) == set(torchvision_resnet50_keys(with_fc=True))
    assert report.ignored == ["fc.weight", "fc.bias"]
    _assert_same_weights(m, r50_state)


@pytest.fixture
def small_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return small_resnet().state_dict()


def test_mismatch_and_missing_raise(tmp_path: Path, small_state: dict[str, torch.Tensor]) -> None:
    bad = dict(small_state)
    bad["conv1.weight"] = torch.zeros(32, 3, 3, 3)
    del bad["layer4.0.bn2.weight"]
    bad["head.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save({"model": bad}, path)

    with pytest.raises(ValueError) as err:
        load_checkpoint(small_resnet(), path)
    msg = str(err.value)
    assert "conv1.weight" in msg and "layer4.0.bn2.weight" in msg and "head.weight" in msg

    torch.manual_seed(2)
    m = small_resnet()
    init_conv1 = m.conv1.weight.detach().clone()
    report = load_checkpoint(m, path, strict=False)
    assert report.missing == ["layer4.0.bn2.weight"]
    assert report.unexpected == ["head.weight"]
    assert len(report.mismatched) == 1 and report.mismatched[0].startswith("conv1.weight")
    assert torch.equal(m.conv1.weight, init_conv1)  # refused, left as initialised
    assert torch.equal(m.layer3[0].conv1.weight, small_state["layer3.0.conv1.weight"])
    assert len(report.loaded) == len(small_state) - 2


def test_prefixes_and_old_checkpoints(tmp_path: Path, small_state: dict[str, torch.Tensor]) -> None:
    ddp = {f"module.{k}": v for k, v in small_state.items()}
    torch.save(ddp, tmp_path / "ddp.pth")
    report = load_checkpoint(small_resnet(), tmp_path / "ddp.pth")
    assert report.prefix == "module." and report.ok

    # Explicit prefix; keys outside it are ignored. Old checkpoints lack num_batches_tracked.
    custom = {f"backbone.{k}": v for k, v in small_state.items() if "num_batches" not in k}
    custom["decoder.weight"] = torch.zeros(1)
    torch.save({"state_dict": custom}, tmp_path / "custom.pth")
    m = small_resnet()
    report = load_checkpoint(m, tmp_path / "custom.pth", prefix="backbone.")
    assert report.ignored == ["decoder.weight"]
    assert report.defaulted and all(k.endswith("num_batches_tracked") for k in report.defaulted)
    assert torch.equal(m.layer2[0].conv2.weight, small_state["layer2.0.conv2.weight"])
