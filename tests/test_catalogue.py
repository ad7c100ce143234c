"""The catalogue frame, its long form, atomic CSV writing and reading back."""
import os

import numpy as np
import pytest

from headlens import HeadlensError
from headlens.catalogue import atomic_write, build_catalogue, read_catalogue
from headlens.detectors import DetectorResult, get_detector, head_frame


class FakeModelInfo:
    def as_dict(self):
        return {"name": "fake"}


class FakeModel:
    n_layers, n_heads, info = 2, 3, FakeModelInfo()


def test_build_catalogue_labels_statuses_and_roles(tmp_path):
    m = FakeModel()
    a = DetectorResult("induction", head_frame(m, "induction", np.arange(6).reshape(2, 3) / 6,
                                               {"prev_token": np.zeros((2, 3))}), labelled=[(1, 2)])
    na = get_detector("induction").not_applicable(m, "model too small")
    na.role = "other"
    na.frame = na.frame.rename(columns={"induction_score": "other_score"})
    b = DetectorResult("copy", head_frame(m, "copy", np.ones((2, 3))), labelled=[(1, 2), (0, 0)])
    cat = build_catalogue(m, [a, na, b], seed=7)
    f = cat.frame
    assert list(f.head_id) == ["L0H0", "L0H1", "L0H2", "L1H0", "L1H1", "L1H2"]
    assert f.loc[5, "roles"] == "induction;copy" and f.loc[0, "roles"] == "copy" and f.loc[1, "roles"] == ""
    assert f.other_status.iloc[0] == "not_applicable: model too small" and f.other_score.isna().all()
    assert cat.top("induction", 1).head_id.item() == "L1H2"
    long = cat.long()
    assert len(long) == 18 and set(long.role) == {"induction", "other", "copy"}
    with pytest.raises(HeadlensError, match="no role"):
        cat.top("successor")
    path = cat.to_csv(tmp_path / "c.csv")
    back = read_catalogue(path)
    assert back.meta["seed"] == 7 and list(back.frame.columns) == list(f.columns)
    assert back.frame.induction_label.tolist() == f.induction_label.tolist()


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "c.csv"
    path.write_text("old")

    def boom(*a):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write(path, "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["c.csv"]


def test_read_rejects_non_catalogues(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(HeadlensError, match="not a headlens catalogue"):
        read_catalogue(p)


def test_unknown_params_are_refused():
    with pytest.raises(HeadlensError, match="no parameter"):
        get_detector("induction", seqlen=3)
