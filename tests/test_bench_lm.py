"""The LM benchmark's pure helpers: a leak from validation into training, or a baseline that prunes the
wrong units or lands off its FLOPs target, would make the comparison with STR meaningless."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from baselines import lowest, uniform_counts  # noqa: E402
from lm_data import split_files, stdlib_files, windows  # noqa: E402


def test_held_out_files_are_every_20th_and_disjoint(tmp_path):
    for i in range(45):
        (tmp_path / f"m{i:02d}.py").write_text(str(i))
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "third.py").write_text("x")
    (tmp_path / "notes.txt").write_text("x")
    files = stdlib_files(tmp_path)
    assert [p.name for p in files] == [f"m{i:02d}.py" for i in range(45)]  # sorted, .py only, no site-packages
    train, val = split_files(files)
    assert [p.name for p in val] == ["m00.py", "m20.py", "m40.py"]
    assert len(train) == 42 and not set(train) & set(val)


def test_windows_are_seeded_contiguous_and_in_range():
    stream = torch.arange(100, dtype=torch.uint8)
    a = windows(stream, 50, 9, torch.Generator().manual_seed(3))
    b = windows(stream, 50, 9, torch.Generator().manual_seed(3))
    assert a.shape == (50, 10) and a.dtype == torch.int64 and torch.equal(a, b)
    assert bool((a[:, 1:] - a[:, :-1] == 1).all())  # contiguous bytes: inputs and their next-byte targets
    many = windows(stream, 500, 9, torch.Generator().manual_seed(0))
    assert int(many[:, 0].min()) == 0 and int(many[:, -1].max()) == 99  # every start is reachable, none overruns
    with pytest.raises(ValueError, match="shorter"):
        windows(stream[:5], 1, 9, torch.Generator())


def test_lowest_prunes_exactly_n_smallest_with_ties_by_position():
    scores = torch.tensor([3.0, 1.0, 1.0, 5.0, 0.5])
    assert lowest(scores, 2).tolist() == [False, True, False, False, True]
    assert lowest(scores, 3).tolist() == [False, True, True, False, True]
    assert not lowest(scores, 0).any()


def test_uniform_counts_land_the_target_with_the_same_fraction_per_kind():
    # 4 layers, 4 kv groups costing 10 each, 100 neurons costing 1 each, 40 FLOPs nobody can remove
    dense = 4 * (4 * 10 + 100 * 1) + 40
    k, n = uniform_counts(4, 100, 4, 10.0, 1.0, dense, 0.5)
    assert k == round(n / 100 * 4)  # heads follow the neurons' fraction, rounded to whole groups
    assert abs(4 * (10 * k + n) / dense - 0.5) <= 4 / dense  # within one neuron per layer of the target
    k, n = uniform_counts(4, 100, 4, 10.0, 1.0, dense, 0.99)
    assert k == 3  # never every group of a layer
