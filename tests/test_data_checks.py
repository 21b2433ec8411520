"""Bad data and damaged files: one clear line, never a silent cast, never advice to load unsafely (issue 13)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from strfx.data import load_data
from strfx.errors import DataError, StrfxError

ROOT = Path(__file__).resolve().parents[1]


def _arrays(**over: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    base = {"x_train": rng.integers(0, 256, (20, 8, 8), dtype=np.uint8), "y_train": np.arange(20) % 3,
            "x_test": rng.integers(0, 256, (6, 8, 8), dtype=np.uint8), "y_test": np.arange(6) % 3}
    return {**base, **over}


def _save(tmp_path: Path, **over: np.ndarray) -> str:
    path = tmp_path / "d.npz"
    np.savez(path, **_arrays(**over))
    return f"npz:{path}"


@pytest.mark.parametrize("key", ["x_train", "x_test"])
@pytest.mark.parametrize("bad, words", [
    (np.nan, "NaN"), (np.inf, "inf"), (300.0, "0..300"),
])
def test_float_images_with_nan_inf_or_above_255_are_refused(tmp_path: Path, key: str, bad: float, words: str) -> None:
    x = _arrays()[key].astype(np.float32)
    x[0, 0, 0] = bad
    with pytest.raises(DataError) as err:
        load_data(_save(tmp_path, **{key: x}))
    msg = str(err.value)
    assert f"{key} has dtype float32" in msg and words in msg and "uint8" in msg and "\n" not in msg


def test_float_images_in_range_are_refused_too_and_small_ints_are_converted(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"x_test has dtype float64 \(values 0\.\.1\).*\(x \* 255\)"):
        load_data(_save(tmp_path, x_test=np.linspace(0, 1, 6 * 64).reshape(6, 8, 8)))
    d = load_data(_save(tmp_path, x_test=_arrays()["x_test"].astype(np.int64)))  # ints within 0..255: fine
    assert d.val.images.dtype == torch.uint8
    with pytest.raises(DataError, match=r"x_test \(int64\) has values -1\.\.255, outside 0\.\.255"):
        load_data(_save(tmp_path, x_test=np.full((6, 8, 8), 255, dtype=np.int64) - np.eye(8, dtype=np.int64)[None] * 256))


def test_non_zip_npz_never_mentions_loading_unsafely(tmp_path: Path) -> None:
    for name, content in [("junk.npz", b"not a zip at all"), ("pickled.npz", b"\x80\x04\x95junk")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError) as err:
            load_data(f"npz:{tmp_path / name}")
        msg = str(err.value)
        assert "not an .npz archive" in msg and "unsafe" not in msg and "allow_pickle" not in msg
    np.save(tmp_path / "one.npy", np.zeros(3))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    with pytest.raises(DataError, match="single .npy array"):
        load_data(f"npz:{tmp_path / 'one.npz'}")


def test_corrupt_or_foreign_weights_never_suggest_weights_only_false(tmp_path: Path) -> None:
    from strfx.safeload import load_tensors

    import datetime

    files = ["garbage.pt", "foreign.pt", "truncated.pt"]
    (tmp_path / "garbage.pt").write_bytes(b"garbage")
    torch.save({"obj": datetime.date(2020, 1, 1)}, tmp_path / "foreign.pt")  # an object weights_only refuses
    torch.save({"w": torch.zeros(1000)}, tmp_path / "full.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:500])
    for name in files:
        with pytest.raises(StrfxError) as err:
            load_tensors(tmp_path / name, "weights file", "write it again")
        msg = str(err.value)
        assert msg.startswith(f"weights file {tmp_path / name} is corrupt or unreadable (") and msg.endswith(
            "; write it again"), msg
        assert "weights_only" not in msg and "unsafe" not in msg.lower() and "\n" not in msg


def test_corrupt_run_weights_through_the_cli_is_one_safe_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    from click.testing import CliRunner

    from strfx.cli import main

    ok = CliRunner().invoke(main, ["transform", str(ROOT / "examples" / "lenet300.py"), "--mode", "unstructured",
                                   "-o", str(out)])
    assert ok.exit_code == 0, ok.output
    (out / "weights.pt").write_bytes(b"PK\x03\x04 not really a zip")
    bad = subprocess.run([sys.executable, "-m", "strfx", "shrink", str(out), "-o", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    lines = [ln for ln in (bad.stdout + bad.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "weights file" in lines[0] and "corrupt or unreadable" in lines[0], lines
    assert "weights_only" not in lines[0] and "Warning" not in bad.stderr
