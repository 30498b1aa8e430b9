"""Errors a user's disk, paths or files cause are one line and exit 2 (issue 12): a full disk,
a read-only file system, no permission, a file in the way, a bad checkpoint file. Real
processes where the fault can be made real (/dev/full, a truncated checkpoint); the rest
through `main` with the fault injected."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tasks.data.synth import VERSION


def _fss(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("fss")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=180,
                          cwd=cwd)


def _one_line(done: subprocess.CompletedProcess) -> str:
    """The one error line (a progress bar may share the terminal line it starts on)."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in re.split(r"[\r\n]", done.stderr) if "fss: error: " in line]
    assert len(lines) == 1 and done.stderr.count("fss: error: ") == 1, done.stderr
    return lines[0][lines[0].index("fss: error: "):]


def test_bad_checkpoint_files_are_one_line(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096))
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.arange(50_000, dtype=torch.float32)}, "config": {}}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path in (garbage, truncated):
        line = _one_line(_fss("evaluate", "--checkpoint", str(path), cwd=tmp_path))
        assert line.startswith(f"fss: error: {path}: not a readable checkpoint ("), line


class _Payload:
    """A pickle that would run code when loaded without weights_only."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("content", [b"", b"\x80\x04K", "payload", "not-a-dict", "no-model"])
def test_load_state_names_the_file(tmp_path: Path, content) -> None:
    from tasks.fewshot.training import load_state

    path = tmp_path / "x.pt"
    if content == "payload":
        path.write_bytes(pickle.dumps({"model": _Payload()}, protocol=2))
    elif content == "not-a-dict":
        torch.save(torch.zeros(3), path)
    elif content == "no-model":
        torch.save({"w": torch.zeros(3)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=f"^{path}: not a") as err:
        load_state(path)
    assert "\n" not in str(err.value)
    if content == b"":
        assert "(an empty file)" in str(err.value)
    if content == "payload":
        assert "system" in str(err.value)  # torch's refusal, in one line


def test_disk_full_and_a_file_in_the_way_are_one_line(tmp_path: Path) -> None:
    """``fss data synth`` into a folder where the first image is /dev/full (a real ENOSPC,
    whose write() names no file), then where a folder it makes is a file (FileExistsError)."""
    params = {"n_train": 1, "n_val": 1, "size": 64, "seed": 0, "version": VERSION}
    args = ("data", "synth", "--train", "1", "--val", "1", "--size", "64")
    full = tmp_path / "full"
    (full / "voc" / "JPEGImages").mkdir(parents=True)
    (full / ".synth_params.json").write_text(json.dumps(params))  # an unfinished run: resumed
    first = full / "voc" / "JPEGImages" / "synth_train_000000.jpg"
    first.symlink_to("/dev/full")
    line = _one_line(_fss(*args, "--out", str(full), cwd=tmp_path))
    assert line.startswith(f"fss: error: {first}: No space left on device (free some space"), line

    blocked = tmp_path / "blocked"
    (blocked / "voc").mkdir(parents=True)
    (blocked / ".synth_params.json").write_text(json.dumps(params))
    (blocked / "voc" / "JPEGImages").write_text("a file where a folder goes")
    line = _one_line(_fss(*args, "--out", str(blocked), cwd=tmp_path))
    assert line == f"fss: error: {blocked / 'voc' / 'JPEGImages'}: File exists", line


@pytest.mark.parametrize(("exc", "expected"), [
    (OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro/store.zarr"),
     "/mnt/ro/store.zarr: Read-only file system (write the store, runs and reports "
     "somewhere writable)"),
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/store.zarr"),
     "/data/store.zarr: Permission denied"),
    (FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), "/a", None, "/b"),
     "/a -> /b: File exists"),
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
     "No space left on device (free some space and rerun: finished shards, checkpoints and "
     "points are kept)"),
])
def test_disk_and_path_errors_through_main(exc: OSError, expected: str, capsys,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.cli as cli
    from flows.cli import data as data_cli

    def fail(args):
        raise exc

    monkeypatch.setattr(data_cli, "cmd_inspect", fail)
    assert cli.main(["store", "inspect", "x.zarr"]) == 2
    assert capsys.readouterr().err == f"fss: error: {expected}\n"
    assert cli.main(["--debug", "store", "inspect", "x.zarr"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == f"fss: error: {expected}"


def test_other_os_errors_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.cli as cli
    from flows.cli import data as data_cli

    def fail(args):
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    monkeypatch.setattr(data_cli, "cmd_inspect", fail)
    with pytest.raises(ConnectionResetError):
        cli.main(["store", "inspect", "x.zarr"])


# ---------------------------------------------------------------------------------------------
# A full disk loses nothing: the rerun after it completes what was cut off


def test_a_disk_full_mid_ingest_loses_nothing(synth_root: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills while shard 1's original masks are written (after its images and
    masks): the ingest stops with ENOSPC, shard 0 stays done, shard 1 is not marked done; the
    rerun writes shards 1.. and the version equals a lone ingest's, label for label."""
    import numpy as np
    import zarr

    from tasks.data import ingest, store

    voc = str(synth_root / "voc")
    kw = dict(splits=["train", "val"], size=32, shard_size=16)
    reference = str(tmp_path / "reference.zarr")
    ingest.ingest_dataset("voc", voc, reference, "d", **kw)
    url = str(tmp_path / "s.zarr")
    real_set = zarr.storage.LocalStore.set

    async def full_disk(self, key, value):
        if key.endswith("original_masks/c/1"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await real_set(self, key, value)

    # The store writes whole shard files itself (store._KeyWriter) and metadata through zarr:
    # the disk fills on either path.
    real_put = store._KeyWriter.put

    def full_disk_put(self, key, parts):
        if key.endswith("original_masks/c/1"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_put(self, key, parts)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", full_disk)
    monkeypatch.setattr(store._KeyWriter, "put", full_disk_put)
    with pytest.raises(OSError) as err:
        ingest.ingest_dataset("voc", voc, url, "d", **kw)
    assert err.value.errno == errno.ENOSPC
    monkeypatch.setattr(zarr.storage.LocalStore, "set", real_set)
    monkeypatch.setattr(store._KeyWriter, "put", real_put)
    with pytest.raises(store.StoreError, match="no completed version"):
        store.open_dataset(url, "d")
    again = ingest.ingest_dataset("voc", voc, url, "d", **kw)
    assert again["complete"] and again["shards_skipped"] == 1
    assert again["shards_written"] == again["shards"] - 1
    ds, ref = store.open_dataset(url, "d"), store.open_dataset(reference, "d")
    assert ds.ids == ref.ids and ds.version == ref.version
    for image_id in ds.ids:
        for read in ("image", "mask", "original_mask"):
            np.testing.assert_array_equal(getattr(ds, read)(image_id),
                                          getattr(ref, read)(image_id))


def test_a_disk_full_mid_checkpoint_keeps_the_previous_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.fewshot import training

    path = tmp_path / "checkpoints" / "last.pt"
    training.save_checkpoint(path, {"model": {"w": torch.ones(3)}, "step": 2})
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 half a zip")  # cut off where the disk filled
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError):
        training.save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "step": 4})
    monkeypatch.setattr(torch, "save", real_save)
    state = training.load_state(path)
    assert state["step"] == 2 and torch.equal(state["model"]["w"], torch.ones(3))
