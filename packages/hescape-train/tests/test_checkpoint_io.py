"""Atomic files, metrics logs cut back to a checkpoint, checkpoints that keep the best and the last, random states
restored exactly, and files that are refused rather than unpickled."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import torch
from hescape.train.atomic import atomic_write, atomic_write_json, atomic_write_text
from hescape.train.checkpoint import SIDE, WEIGHTS, Checkpointer, load_model_checkpoint, read_checkpoint
from hescape.train.errors import HescapeConfigError
from hescape.train.metrics import MetricsLog
from hescape.train.state import TrainState, capture_rng, restore_rng


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    p = tmp_path / "results.json"
    atomic_write_json(p, {"a": 1, "nan": float("nan")})
    assert json.loads(p.read_text()) == {"a": 1, "nan": None}  # strict JSON: NaN written as null

    def failing(tmp):
        with open(tmp, "w") as f:
            f.write("half a fi")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(p, failing)
    assert json.loads(p.read_text()) == {"a": 1, "nan": None}  # the old file, whole
    assert [x.name for x in tmp_path.iterdir()] == ["results.json"]  # no temporary left behind
    atomic_write_text(p, "new\n")
    assert p.read_text() == "new\n" and oct(p.stat().st_mode & 0o777) != oct(0o600)


def test_metrics_log_truncates_to_a_checkpoint(tmp_path):
    log = MetricsLog(tmp_path, "steps")
    log.write({"step": 1, "loss": 2.5, "name": "a,b"})
    log.write({"step": 2, "loss": float("nan"), "name": "c"})
    log.sync()
    sizes = log.sizes()
    saved = {f: (tmp_path / f).read_bytes() for f in sizes}
    log.write({"step": 3, "loss": 1.0, "name": "d"})  # after the checkpoint
    log.close()
    with open(tmp_path / "steps.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a torn line
    again = MetricsLog(tmp_path, "steps")
    again.truncate(sizes)
    assert {f: (tmp_path / f).read_bytes() for f in sizes} == saved
    again.write({"step": 3, "loss": 0.5, "name": "e", "extra": 1})  # same columns as the header; extras JSON only
    again.close()
    rows = (tmp_path / "steps.csv").read_text().splitlines()
    assert rows == ["step,loss,name", '1,2.5,"a,b"', "2,nan,c", "3,0.5,e"]
    recs = [json.loads(x) for x in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3] and recs[1]["loss"] is None and recs[2]["extra"] == 1
    short = MetricsLog(tmp_path, "steps")
    with pytest.raises(HescapeConfigError, match="records were lost"):
        short.truncate({"steps.jsonl": 10**6})
    short.close()


def test_rng_states_round_trip():
    g = torch.Generator().manual_seed(7)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # leaves a cached Gaussian in the legacy state
    state = capture_rng({"augment": g})
    blob = torch.load(_saved(state), weights_only=True)  # plain values and tensors only

    def draw():
        return (random.random(), np.random.normal(), torch.rand(3).tolist(), torch.rand(2, generator=g).tolist())

    first = draw()
    restore_rng(blob, {"augment": g})
    assert draw() == first


def _saved(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def _state(step: int) -> TrainState:
    torch.manual_seed(step)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    model[1].weight = model[1].weight  # (a plain parameter; nothing shared)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return TrainState(model=model, optimizer=opt, generators={"augment": torch.Generator().manual_seed(9)},
                      step=step, epoch=step // 2, batch=step % 2, epoch_losses=[0.5, 0.25])


def test_checkpointer_keeps_best_and_last(tmp_path):
    ck = Checkpointer(tmp_path)
    facts = {"genes": ["A", "B"], "model_cfg": {"x": 1}}
    meta = {"model_cfg": json.dumps({"x": 1}), "genes": json.dumps(["A", "B"])}
    s1 = _state(1)
    s1.best_dir, s1.best_epoch, s1.best_score = ck.name_for(1), 1, -3.0
    ck.save(s1, facts, meta)
    for step in (2, 3):
        s = _state(step)
        s.best_dir, s.best_epoch, s.best_score = ck.name_for(1), 1, -3.0
        ck.save(s, facts, meta)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["index.json", "step-00000001",
                                                                            "step-00000003"]
    index = json.loads((tmp_path / "checkpoints" / "index.json").read_text())
    assert index["last"] == "step-00000003" and index["best"] == "step-00000001"
    # the last checkpoint restores weights, optimiser moments and the generator exactly
    last = read_checkpoint(tmp_path, "last")
    fresh = _state(0)
    fresh.model.load_state_dict(last["state_dict"])
    fresh.load_side_state(last)
    ref = _state(3)
    assert all(torch.equal(a, b) for a, b in zip(fresh.model.state_dict().values(), ref.model.state_dict().values(),
                                                 strict=True))
    for p_ref, p_new in zip(ref.optimizer.param_groups[0]["params"], fresh.optimizer.param_groups[0]["params"],
                            strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(ref.optimizer.state[p_ref][key], fresh.optimizer.state[p_new][key])
    assert (fresh.step, fresh.epoch, fresh.batch, fresh.epoch_losses) == (3, 1, 1, [0.5, 0.25])
    assert torch.equal(torch.rand(4, generator=fresh.generators["augment"]),
                       torch.rand(4, generator=torch.Generator().manual_seed(9)))
    # leftovers of a killed write are removed; the checkpoints index.json names stay
    (tmp_path / "checkpoints" / ".tmp-step-00000004-x").mkdir()
    (tmp_path / "checkpoints" / "step-00000004").mkdir()
    ck.clean()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["index.json", "step-00000001",
                                                                            "step-00000003"]
    # a run directory given as model.init_checkpoint means its best checkpoint; metadata carries the panel
    got = load_model_checkpoint(tmp_path)
    assert got["genes"] == ["A", "B"] and got["model_cfg"] == {"x": 1} and got["source"].parent.name == "step-00000001"


def test_unsafe_or_mismatched_files_are_refused(tmp_path, capsys):
    ck = Checkpointer(tmp_path)
    s = _state(2)
    ck.save(s, {}, {"model_cfg": "{}", "genes": "[]"})
    d = tmp_path / "checkpoints" / "step-00000002"

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    (d / SIDE).write_bytes(pickle.dumps({"format": "x", "obj": Payload()}, protocol=2))
    with pytest.raises(HescapeConfigError, match="cannot load safely"):
        read_checkpoint(tmp_path)
    assert "code ran" not in capsys.readouterr().out
    (tmp_path / "o").mkdir()
    other = Checkpointer(tmp_path / "o")
    ck_state = _state(5)
    other.save(ck_state, {}, {"model_cfg": "{}", "genes": "[]"})
    (d / SIDE).write_bytes((tmp_path / "o/checkpoints/step-00000005" / SIDE).read_bytes())  # a side file of step 5
    with pytest.raises(HescapeConfigError, match="from step 2 but state.pt from step 5"):
        read_checkpoint(tmp_path)
    (d / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(HescapeConfigError, match="cannot load safely"):
        load_model_checkpoint(d)
