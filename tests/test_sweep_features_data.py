"""The sweep's data-related features, run for real on tiny data in this process (debug executor):

* the digits data set kind writes scikit-learn's digits as an ImageFolder whose images decode to the digits' values;
* a finished job counts as done only while its data set's fingerprint matches the one it trained on: a changed data
  set re-runs the data stage and the jobs that read it, an unchanged one re-runs nothing;
* the logits stage writes one logit store per distinct (teachers, data, views), and the students read it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hpckd.sweep.jobs import read_fingerprints, read_state
from hpckd.teachers.store import StoreError
from hpckd.sweep.runner import make_call, run_sweep, sweep_status
from hpckd.sweep.spec import plan_sweep


def test_digits_decode_to_the_digits_values_with_a_stratified_split(tmp_path):
    from sklearn.datasets import load_digits

    from hpckd.data.digits import DigitsSpec, ensure_digits

    root = tmp_path / "digits"
    spec = DigitsSpec(size=16, val_fraction=0.25, seed=1)
    assert ensure_digits(root, spec).startswith("wrote scikit-learn's digits")
    digits = load_digits()
    seen: dict[str, list[int]] = {"train": [], "val": []}
    for split in seen:
        for path in sorted((root / split).glob("digit_*/*.png")):
            i, label = int(path.stem), int(path.parent.name.split("_")[1])
            assert label == digits.target[i]
            expected = np.rint(digits.images[i] * 255 / 16).astype(np.uint8).repeat(2, 0).repeat(2, 1)  # 8 -> 16 px
            pixels = np.asarray(Image.open(path))
            assert pixels.shape == (16, 16, 3) and all(np.array_equal(pixels[..., c], expected) for c in range(3))
            seen[split].append(i)
    assert sorted(seen["train"] + seen["val"]) == list(range(1797))  # every sample once
    counts = np.bincount(digits.target, minlength=10)
    val_counts = np.bincount(digits.target[seen["val"]], minlength=10)
    assert val_counts.tolist() == [int(round(n * 0.25)) for n in counts]  # stratified, per class
    files = {p: p.stat().st_mtime_ns for p in root.rglob("*.png")}
    assert ensure_digits(root, spec) == "already there"  # idempotent: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.png")} == files
    other = tmp_path / "other"
    ensure_digits(other, spec)  # deterministic: the same split again
    assert sorted(p.relative_to(other) for p in other.rglob("*.png")) == sorted(p.relative_to(root) for p in files)
    (root / ".hpckd-digits.json").unlink()  # a set a killed writer left without its marker is written again
    assert ensure_digits(root, spec).startswith("wrote")


def tiny_sweep(tmp_path: Path, **extra) -> dict:
    return {"name": "tiny", "out_dir": str(tmp_path / "sweep"), "report": False,
            "base": {"data": {"batch_size": 16, "eval_batch_size": 8, "loader": "torch", "num_workers": 0},
                     "model": {"arch": "resnet8"}, "optim": {"epochs": 1, "lr": 0.05}},
            "datasets": {"tiny": {"overrides": ["data.root={sweep}/data"],
                                  "synth": {"classes": 4, "per_class": 8, "val_per_class": 2, "size": "32x32"}}},
            "teachers": {"T1": {"overrides": ["seed=1"]}}, **extra}


def mtimes(plan) -> dict[str, int]:
    return {job.key: (job.folder / "results.json").stat().st_mtime_ns for job in [*plan.teachers, *plan.trials]}


def test_a_changed_data_set_reruns_what_read_it(tmp_path, one_torch_thread):
    config = tiny_sweep(tmp_path, trials=[{"name": "kd", "teachers": ["T1"]}])
    plan = plan_sweep(None, inline=config)
    run_sweep(plan, "debug", echo=lambda line: None)
    data = tmp_path / "sweep" / "datasets" / "tiny"
    before = read_fingerprints(data)
    for job in [*plan.teachers, *plan.trials]:
        ran = json.loads((job.folder / "results.json").read_text())["data"]
        assert (ran["train_fingerprint"], ran["val_fingerprint"]) == (before["train"], before["val"])
    first = mtimes(plan)

    run_sweep(plan_sweep(None, inline=config), "debug", echo=lambda line: None)  # unchanged: nothing runs
    assert mtimes(plan) == first and read_fingerprints(data) == before

    images = tmp_path / "sweep" / "data" / "train" / "class_000"
    shutil.copy(sorted(images.iterdir())[0], images / "extra.jpg")  # one more training image
    assert [r.state for r in sweep_status(plan.root)] == ["done"] * 3  # status alone does not index the data
    run_sweep(plan_sweep(None, inline=config), "debug", echo=lambda line: None)
    after = read_fingerprints(data)
    assert after["train"] != before["train"] and after["val"] == before["val"]
    assert json.loads((data / "index.json").read_text())["train"] == 4 * 8 + 1  # the data stage indexed it again
    for job in [*plan.teachers, *plan.trials]:
        results = json.loads((job.folder / "results.json").read_text())
        assert results["data"]["train_fingerprint"] == after["train"]  # trained again, on the new data
        (stale,) = job.folder.glob("stale-*")  # the old run is kept aside, not deleted
        assert json.loads((stale / "results.json").read_text())["data"]["train_fingerprint"] == before["train"]
    assert all(mtimes(plan)[k] != first[k] for k in first)
    assert [r.state for r in sweep_status(plan.root)] == ["done"] * 3


def test_students_read_one_logit_store_per_teachers_data_and_views(tmp_path, one_torch_thread):
    config = tiny_sweep(tmp_path, student_overrides=["serving.mode=cached", "loss.name=kd"],
                        trials=[{"name": "tau2", "teachers": ["T1"], "overrides": ["loss.tau=2"]},
                                {"name": "tau4", "teachers": ["T1"], "overrides": ["loss.tau=4"]},
                                {"name": "strong", "teachers": ["T1"], "overrides": ["aug=strong"]},
                                {"name": "alone", "overrides": ["serving.mode=inline"]}])
    plan = plan_sweep(None, inline=config)
    stores = plan.stage("logits")
    # tau changes only the student's loss: tau2 and tau4 share one store; strong augmentation is another view
    assert len(stores) == 2
    by_trial = {j.name: j.config["serving"]["store"] for j in plan.trials}
    assert by_trial["tau2"] == by_trial["tau4"] != by_trial["strong"] and by_trial["alone"] is None
    assert {by_trial["tau2"], by_trial["strong"]} == {s.extra["store"] for s in stores}
    for store in stores:
        assert store.deps == ("data/tiny", "teachers/T1")
        users = [j.name for j in plan.trials if store.key in j.deps]
        assert users in (["tau2", "tau4"], ["strong"])

    run_sweep(plan, "debug", echo=lambda line: None)
    assert all(r.state == "done" for r in sweep_status(plan.root))
    for store in stores:
        folder = Path(store.extra["store"])
        index = json.loads((folder / "index.json").read_text())  # complete
        assert index and read_state(store.folder, "logits", "done")["config_hash"] == store.config_hash
    for trial in plan.trials:
        ran = json.loads((trial.folder / "results.json").read_text())["config"]["serving"]
        assert (ran["mode"], ran["store"]) == (("inline", None) if trial.name == "alone" else
                                               ("cached", by_trial[trial.name]))
    # the data set changes: the stores are written again from the new data (the old ones kept aside), the
    # students train again from them
    images = tmp_path / "sweep" / "data" / "train" / "class_001"
    shutil.copy(sorted(images.iterdir())[0], images / "extra.jpg")
    run_sweep(plan_sweep(None, inline=config), "debug", echo=lambda line: None)
    assert all(r.state == "done" for r in sweep_status(plan.root))
    new_fp = read_fingerprints(plan.root / "datasets" / "tiny")["train"]
    for store in stores:
        manifest = json.loads((Path(store.extra["store"]) / "manifest.json").read_text())
        assert manifest["key"]["data_fingerprint"] == new_fp
        (old,) = store.folder.glob("stale-*-store")
        assert json.loads((old / "manifest.json").read_text())["key"]["data_fingerprint"] != new_fp
    for trial in plan.trials:
        assert json.loads((trial.folder / "results.json").read_text())["data"]["train_fingerprint"] == new_fp
    # the students depend on the store for real: without its shards, training tau2 again fails on the store
    tau2 = plan.jobs["students/tau2"]
    for shard in (Path(by_trial["tau2"]) / "shards").glob("*.shard"):
        shard.unlink()
    for name in ("results.json", "last.pt"):
        (tau2.folder / name).unlink()
    shutil.rmtree(tau2.folder / "checkpoints")
    with pytest.raises(StoreError) as info:
        make_call(tau2, threads=1)()
    assert by_trial["tau2"] in str(info.value)
