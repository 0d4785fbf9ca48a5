"""What a sweep job runs, and the small state files each job keeps in its own folder.

A job's folder is its run's ``out_dir`` (teachers, trials), ``datasets/<name>`` (data stage) or ``logits/<name>``
(logits stage; the store is its ``store/``); the evaluation stage uses its trial's folder and the report stage the
sweep folder itself. State files, all written atomically, are ``sweep-<stage>.<kind>.json``:

* ``job``     -- written by the driver when it submits: executor, job id, array id, log paths, submit time;
* ``started`` -- written by the job when it starts (attempt count: a requeued job starts again);
* ``done``    -- written by the job after its work succeeded, with the config hash it ran (and, for teachers,
  trials and stores, the data set's state folder whose ``fingerprint.json`` its results must still match);
* ``error``   -- written by the job when its work raised: the error line and the log path.

No file is shared between jobs, so a 1,000-trial sweep never has jobs rewriting one state file.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path
from typing import Any

import submitit

from hpckd.io import atomic_write_json, atomic_write_text
from hpckd.train.job import TrainJob

STATE_KINDS = ("job", "started", "done", "error")


def state_path(folder: Path, stage: str, kind: str) -> Path:
    return Path(folder) / f"sweep-{stage}.{kind}.json"


def read_state(folder: Path, stage: str, kind: str) -> dict[str, Any] | None:
    """A state file's record, or None when it is missing or unreadable (a torn file counts as missing)."""
    try:
        record = json.loads(state_path(folder, stage, kind).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_state(folder: Path, stage: str, kind: str, record: dict[str, Any]) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    atomic_write_json(state_path(folder, stage, kind), record)


def clear_state(folder: Path, stage: str, kinds: tuple[str, ...] = STATE_KINDS) -> None:
    for kind in kinds:
        state_path(folder, stage, kind).unlink(missing_ok=True)


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _job_id() -> str | None:
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID") or None


def _is_main_task() -> bool:
    try:
        return submitit.JobEnvironment().global_rank == 0
    except RuntimeError:  # not inside a submitit job (debug executor, tests): one process
        return True


class _Recorded:
    """Writes ``started`` / ``done`` / ``error`` around the work of a stage job (rank 0 of a multi-task job)."""

    folder: str
    stage: str
    config_hash: str
    threads: int

    def _record(self, work) -> dict[str, Any]:
        import torch

        # The stage's cpus_per_task, set in the job's own process (again after a requeue), not every core.
        torch.set_num_threads(max(1, self.threads))
        folder, main = Path(self.folder), _is_main_task()
        if main:
            previous = read_state(folder, self.stage, "started") or {}
            write_state(folder, self.stage, "started", {
                "time": now(), "host": socket.gethostname(), "pid": os.getpid(), "job_id": _job_id(),
                "attempt": int(previous.get("attempt", 0)) + 1})
            state_path(folder, self.stage, "error").unlink(missing_ok=True)
        try:
            result = work()
        except BaseException as exc:
            if main and not isinstance(exc, (SystemExit, KeyboardInterrupt)):
                line = (str(exc).strip().splitlines() or [""])[0]
                write_state(folder, self.stage, "error", {"time": now(), "error": f"{type(exc).__name__}: {line}",
                                                          "job_id": _job_id()})
            raise
        if main:
            record = {"time": now(), "config_hash": self.config_hash, "job_id": _job_id()}
            if getattr(self, "data_folder", None):  # whose fingerprint.json the sweep's done-check compares with
                record["data_folder"] = self.data_folder
            write_state(folder, self.stage, "done", record)
        return result


class SweepTrainJob(_Recorded, TrainJob):
    """A teacher or a trial: ``hpckd train``/``distill`` of the config stored in its folder. Checkpointable (a
    :class:`~hpckd.train.job.TrainJob`): on preemption or time-out it checkpoints, is requeued and resumes."""

    def __init__(self, mode: str, folder: str | os.PathLike, stage: str, config_hash: str, threads: int = 1,
                 data_folder: str | None = None) -> None:
        TrainJob.__init__(self, mode, str(Path(folder) / "config.yaml"), [])
        self.folder, self.stage, self.config_hash, self.threads = str(folder), stage, config_hash, threads
        self.data_folder = data_folder

    def __call__(self) -> dict[str, Any]:
        if self.data_folder:
            set_aside_stale_run(Path(self.folder), Path(self.data_folder))
        return self._record(lambda: TrainJob.__call__(self))


FINGERPRINTS = "fingerprint.json"  # in a data set's state folder: {train, val} fingerprints of its data now


def read_fingerprints(data_folder: Path) -> dict[str, str] | None:
    try:
        record = json.loads((Path(data_folder) / FINGERPRINTS).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "train" in record else None


def results_fingerprints(results: dict[str, Any]) -> dict[str, str]:
    data = results.get("data") if isinstance(results.get("data"), dict) else {}
    return {"train": data.get("train_fingerprint"), "val": data.get("val_fingerprint")}


def data_changed(folder: Path, data_folder: Path) -> bool:
    """The run in ``folder`` finished on other data than its data set holds now (their fingerprints differ)."""
    now_fp = read_fingerprints(data_folder)
    try:
        results = json.loads((Path(folder) / "results.json").read_text())
    except (OSError, ValueError):
        return False
    if now_fp is None or not isinstance(results, dict):
        return False
    ran = results_fingerprints(results)
    return any(ran[split] and ran[split] != now_fp.get(split) for split in ("train", "val"))


def set_aside_stale_run(folder: Path, data_folder: Path) -> Path | None:
    """A run finished on data that has changed since is started afresh: its outputs (checkpoints, results, logs;
    not its config and state files) move to ``stale-<time>/`` in its folder, kept for the user, never deleted."""
    if not data_changed(folder, data_folder):
        return None
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    aside = folder / f"stale-{stamp}"
    aside.mkdir()
    for entry in folder.iterdir():
        if entry.name == "config.yaml" or entry.name.startswith(("sweep-", "stale-")):
            continue
        os.rename(entry, aside / entry.name)
    return aside


class DataJob(_Recorded):
    """The data stage for one data set: generate it (``synth``, ``digits``) unless complete, then build and check
    its index once (cached next to the data), before any trial reads it; records the data's fingerprints
    (``fingerprint.json``), which a finished run's results must match to count as done."""

    def __init__(self, folder: str | os.PathLike, config_hash: str, synth: dict | None, threads: int = 1,
                 digits: dict | None = None) -> None:
        self.folder, self.stage, self.config_hash, self.synth, self.threads = (str(folder), "data", config_hash,
                                                                              synth, threads)
        self.digits = digits

    def __call__(self) -> dict[str, Any]:
        return self._record(self._work)

    def _work(self) -> dict[str, Any]:
        from hpckd.data.datasets import load_splits
        from hpckd.data.synth import SynthSpec, parse_size
        from hpckd.train.experiment import load_experiment

        cfg = load_experiment(str(Path(self.folder) / "config.yaml"))
        made = "not generated"
        if self.synth:
            h, w = parse_size(self.synth["size"])
            made = ensure_synth(cfg.data.root, SynthSpec(
                classes=self.synth["classes"], per_class=self.synth["per_class"],
                val_per_class=self.synth["val_per_class"], height=h, width=w, seed=self.synth["seed"]))
        if getattr(self, "digits", None):
            from hpckd.data.digits import DigitsSpec, ensure_digits

            made = ensure_digits(cfg.data.root, DigitsSpec(**self.digits))
        train, val = load_splits(cfg.data)  # builds (and caches) the index; fails on unreadable data
        fingerprints = {"train": train.fingerprint(), "val": val.fingerprint()}
        summary = {"root": cfg.data.root, "train": len(train), "val": len(val), "synth": made,
                   "fingerprints": fingerprints}
        atomic_write_json(Path(self.folder) / FINGERPRINTS, fingerprints)
        atomic_write_text(Path(self.folder) / "index.json", json.dumps(summary) + "\n")
        return summary


def ensure_synth(root: str | os.PathLike, spec) -> str:
    """Generate the data set ``spec`` (a :class:`hpckd.data.synth.SynthSpec`) at ``root`` unless the complete set
    is there already (a set that a killed job left half-written is generated again); says what it did."""
    from hpckd.data.synth import is_complete, write_imagefolder

    if is_complete(root, spec):
        return "already there"
    counts = write_imagefolder(root, spec)
    return (f"generated {counts['train']} train / {counts['val']} val JPEGs ({spec.classes} classes, "
            f"{spec.height}x{spec.width})")


class EvalJob(_Recorded):
    """The evaluation stage of a trial: the augmented validation pass (Affinity's D'_val) and/or the train split,
    stored in the trial's ``results.json`` by :func:`hpckd.train.evaluation.evaluate_checkpoint`."""

    def __init__(self, folder: str | os.PathLike, config_hash: str, evaluate: list[str], threads: int = 1) -> None:
        self.folder, self.stage, self.config_hash, self.evaluate, self.threads = (str(folder), "evaluation",
                                                                                 config_hash, list(evaluate), threads)

    def __call__(self) -> dict[str, Any]:
        return self._record(self._work)

    def _work(self) -> dict[str, Any]:
        from hpckd import dist
        from hpckd.train.evaluation import evaluate_checkpoint

        checkpoint = Path(self.folder) / "last.pt"
        out: dict[str, Any] = {}
        # val_augmented: the clean and the augmented pass, so that their Affinity is stored too (Eq. 5)
        passes = {"val_augmented": [("val", False), ("val", True)], "train": [("train", False)]}
        for item in self.evaluate:
            for split, augmented in passes[item]:
                out.update(evaluate_checkpoint(checkpoint, split=split, augmented=augmented))
        dist.shutdown()
        return {key: value.get("accuracy") for key, value in out.items() if isinstance(value, dict)}


class LogitsJob(_Recorded, submitit.helpers.Checkpointable):
    """The logits stage: ``hpckd teachers cache`` of a store that students read (``serving.mode=cached``), written
    once for every trial with the same teachers, data and views (:func:`hpckd.sweep.spec.store_identity`). A
    requeued job continues: finished shards are skipped (:func:`hpckd.teachers.store_writer.cache`)."""

    def __init__(self, folder: str | os.PathLike, config_hash: str, store: str, epochs: int, threads: int = 1,
                 data_folder: str | None = None) -> None:
        self.folder, self.stage, self.config_hash, self.threads = str(folder), "logits", config_hash, threads
        self.store, self.epochs, self.data_folder = str(store), int(epochs), data_folder

    def __call__(self) -> dict[str, Any]:
        return self._record(self._work)

    def _work(self) -> dict[str, Any]:
        from hpckd import dist
        from hpckd.teachers.store_writer import cache
        from hpckd.train.experiment import load_experiment

        cfg = load_experiment(str(Path(self.folder) / "config.yaml"))
        info = dist.init(cfg.dist.device)
        set_aside_stale_store(cfg, Path(self.store), self.epochs, info)
        folder = cache(cfg, epochs=self.epochs, out=self.store, log=lambda line: print(line, flush=True))
        dist.shutdown()
        return {"store": str(folder)}


def set_aside_stale_store(cfg: Any, store: Path, epochs: int, info: Any) -> Path | None:
    """A store written for other teachers or data (a teacher or the data set changed since) is moved to
    ``stale-<time>-store`` beside it, so the writer starts a new one instead of refusing the folder."""
    from hpckd import dist
    from hpckd.teachers.store import key_difference
    from hpckd.teachers.store_writer import make_plan

    aside = None
    manifest = store / "manifest.json"
    if info.is_main and manifest.is_file():
        found = json.loads(manifest.read_text())
        plan = make_plan(cfg, epochs, 0, str(store), 0, info.device.type)
        if key_difference(plan.key, found.get("key", {})) is not None or found.get("layout") != plan.manifest["layout"]:
            aside = store.parent / f"stale-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}-store"
            os.rename(store, aside)
    if info.distributed:
        dist.barrier()  # every rank writes into the new store
    return aside


def store_data_changed(store: Path, data_folder: Path) -> bool:
    """The logit store was written from other data than its data set holds now."""
    now_fp = read_fingerprints(data_folder)
    try:
        key = json.loads((Path(store) / "manifest.json").read_text()).get("key", {})
    except (OSError, ValueError):
        return False
    return now_fp is not None and key.get("data_fingerprint") not in (None, now_fp.get("train"))


class SweepReportJob(_Recorded):
    """The report stage: :func:`hpckd.report.write_report` of the sweep folder (``<root>/report/``), after every
    trial and evaluation that could finish; its state files are ``<root>/sweep-report.*.json``."""

    def __init__(self, root: str | os.PathLike, config_hash: str = "", threads: int = 1) -> None:
        self.folder, self.stage, self.config_hash, self.threads = str(root), "report", config_hash, threads

    def __call__(self) -> dict[str, Any]:
        return self._record(self._work)

    def _work(self) -> dict[str, Any]:
        from hpckd.report import write_report

        return {"report": str(write_report(self.folder))}
