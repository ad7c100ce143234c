"""What a checkpoint holds: tensors and plain data, read with ``torch.load(weights_only=True)``. A detector
result round-trips exactly through ``to_state``/``from_state`` (the frame's column order, dtypes and NaN
bit for bit), the chunk results of every resumable sweep load back equal, and a file that would run code
when unpickled, or is cut short, or is someone else's, is refused without being loaded."""
import contextlib
import json
import os
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from headlens.errors import HeadlensError
from headlens.results import CausalCheck, DetectorResult
from headlens.runtime import checkpoint


class Planted:
    """Unpickled, it runs a shell command (touches ``marker``): what a file planted in a shared folder
    could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_detector_result_round_trips_exactly(tmp_path):
    frame = pd.DataFrame({
        "layer": np.array([0, 0, 1]), "head": np.array([0, 1, 0]),
        "x_score": [0.1, np.nan, -3e-12], "x_lo": np.array([1.5, np.nan, 2], np.float32),
        "x_label": [True, False, True], "x_note": ["a", None, "c"],
        "x_mixed": pd.Series(["a", 1, None], dtype=object), "x_count": pd.array([1, None, 3], dtype="Int64")})
    causal = CausalCheck("loss", ["L0H0"], 1.0, 2.5, [1.1, np.float64(0.9)], [["L0H1"], ["L1H0"]],
                         worse="higher", ablation="mean", extra={"clean_logprob": -0.5}, raw=torch.rand(4, 3))
    result = DetectorResult("x", frame, [(0, 0), (1, 0)], reason="weak", causal=causal,
                            params={"seq_len": 10, "depths": (0.0, 0.5), "preset": "default"},
                            info={"n": np.int64(3), "rate": np.float32(0.25), "ok": np.bool_(True),
                                  "ids": np.array([1, 2]), "per_task": {"days": 4}, "seconds": 1.5,
                                  "weights": torch.ones(2), "other": object()})
    path = tmp_path / "x.pt"
    torch.save(result.to_state(), path)
    back = DetectorResult.from_state(torch.load(path, weights_only=True))
    pd.testing.assert_frame_equal(back.frame, frame, check_exact=True)
    assert list(back.frame.dtypes) == list(frame.dtypes) and back.frame.columns.equals(frame.columns)
    assert back.frame.to_csv(float_format="%.6g") == frame.to_csv(float_format="%.6g")
    assert np.isnan(back.frame["x_score"][1]) and back.frame["x_score"][2] == -3e-12
    assert json.dumps(back.causal.to_dict()) == json.dumps(causal.to_dict())   # NaN fields: compared as text
    assert back.causal.format() == causal.format()
    assert torch.equal(back.causal.raw, causal.raw)
    assert back.labelled == [(0, 0), (1, 0)] and back.params == result.params and back.reason == "weak"
    info = dict(back.info)
    assert torch.equal(info.pop("weights"), torch.ones(2)) and info.pop("other").startswith("<object object")
    assert info == {"n": 3, "rate": 0.25, "ok": True, "ids": [1, 2], "per_task": {"days": 4}, "seconds": 1.5}
    assert type(info["n"]) is int and type(info["rate"]) is float and type(info["ok"]) is bool


# The results of one chunk of each resumable sweep: run_variants ({variant: metric}), patching's direct
# effects ([n, ...]) and retrieval's needle runs ([(generated ids, top-1 positions)] per batch).
CHUNK_RESULTS = {0: {3: torch.rand(2, 3), 4: torch.tensor(0.5)}, 1: torch.rand(2, 5),
                 2: [([5, 7, 2], torch.randint(-1, 9, (3, 2, 4))), ([], torch.zeros(0, 2, 4, dtype=torch.long))]}


def test_chunk_results_of_each_resumable_sweep_load_back_equal(tmp_path):
    store = checkpoint.ChunkStore(tmp_path / "x.chunks", every_s=0, load=True)
    call = store.call("k")
    for i, result in CHUNK_RESULTS.items():
        call.add(i, result)
    again = checkpoint.ChunkStore(tmp_path / "x.chunks", every_s=0, load=True).call("k")
    assert again.done.keys() == CHUNK_RESULTS.keys()
    assert again.done[0].keys() == {3, 4} and all(torch.equal(again.done[0][v], CHUNK_RESULTS[0][v]) for v in (3, 4))
    assert torch.equal(again.done[1], CHUNK_RESULTS[1])
    assert [(ids, top1.shape) for ids, top1 in again.done[2]] == [([5, 7, 2], (3, 2, 4)), ([], (0, 2, 4))]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(again.done[2], CHUNK_RESULTS[2]))
    assert checkpoint.ChunkStore(tmp_path / "x.chunks", every_s=0, load=True).call("other").done == {}


@pytest.mark.parametrize("kind", ["torch.save", "pickle"])
def test_a_planted_pickle_is_refused_unread(tmp_path, kind):
    marker, path = tmp_path / "ran", tmp_path / "induction.pt"
    content = {"format": checkpoint.FORMAT, "role": "induction", "state": Planted(marker)}
    if kind == "torch.save":
        torch.save(content, path)
    else:
        path.write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(checkpoint.Damaged, match=f"^it holds {'posix.system' if kind == 'torch.save' else 'objects'}"
                                                 ", not only tensors and plain data$"):
        checkpoint._load(path)
    assert not marker.exists()
    with contextlib.suppress(RuntimeError):      # the plant works: unpickled, it runs its command
        torch.load(path, weights_only=False)
    assert marker.exists()


def test_damaged_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "induction.pt"
    torch.save({"format": checkpoint.FORMAT, "key": "k", "results": {0: torch.ones(3)}}, path)
    assert checkpoint._load(path)["results"][0].sum() == 3
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(checkpoint.Damaged, match=r"^PytorchStreamReader failed reading zip archive: failed "
                                                 r"finding central directory$"):
        checkpoint._load(path)
    for foreign in ({"weight": torch.ones(2)}, [1, 2]):       # a model's state dict, anything else
        torch.save(foreign, path)
        with pytest.raises(checkpoint.Damaged, match="^not a headlens checkpoint file$"):
            checkpoint._load(path)
    path.write_bytes(b"")
    with pytest.raises(checkpoint.Damaged):
        checkpoint._load(path)


def test_checkpoint_load_runs_a_damaged_or_foreign_detector_again(tmp_path):
    frame = pd.DataFrame({"layer": [0], "head": [0], "x_score": [0.5]})
    result = DetectorResult("x", frame, [(0, 0)], params={"k": 1}, info={"seconds": 0.1})
    ckpt = checkpoint.Checkpoint(tmp_path, {}, resume=True)
    ckpt.save(result)
    back = ckpt.load("x", {"k": 1}, DetectorResult.from_state)
    assert back.frame.equals(frame) and back.labelled == [(0, 0)] and back.info == {"seconds": 0.1}
    with pytest.raises(HeadlensError, match=r"other x parameters \(k\)"):
        ckpt.load("x", {"k": 2}, DetectorResult.from_state)
    good = ckpt.path("x").read_bytes()
    for bad in (good[:100],                                                    # cut short
                {"format": checkpoint.FORMAT, "role": "y", "state": result.to_state()},   # another role's
                {"format": checkpoint.FORMAT, "role": "x", "state": {"params": {"k": 1}}}):  # unreadable state
        if isinstance(bad, bytes):
            ckpt.path("x").write_bytes(bad)
        else:
            torch.save(bad, ckpt.path("x"))
        assert ckpt.load("x", {"k": 1}, DetectorResult.from_state) is None
