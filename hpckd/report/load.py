"""Read a sweep folder into tables: one row per job, from its files only (nothing is recomputed).

What is read (all written atomically by the sweep, so a file is either whole or absent):

* ``sweep.json`` -- the jobs (key, name, stage, folder, deps, config_hash) and the optional ``study`` tag;
* per job folder, the state files ``sweep-<stage>.{started,done,error}.json`` (hpckd/sweep/jobs.py) and, for
  teachers and trials, ``results.json`` (config, metrics, history, eval, timings, ...);
* beside a trial's results, ``tstddev.json`` (``hpckd tstddev``, the augmentation study's T. stddev) when present.

A job's state is ``done`` (its ``done`` record has the planned config hash and its results are readable),
``failed`` (an ``error`` record, or done but unreadable results), ``blocked`` (not done, and a job it needs failed
or is blocked) or ``missing`` (never started, still running, or done for another config). The report reads no
scheduler: a job that is still running shows as missing, with when it started.

This module does not import :mod:`hpckd.sweep` (which sits above :mod:`hpckd.report` and calls it).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from hpckd.errors import UserError

STAGES = ("data", "teachers", "students", "evaluation")
STATE_ORDER = ("done", "failed", "blocked", "missing")
SEED_PART = re.compile(r"^seed-?\d+$")

# metrics.<key> of results.json -> column; the attention study's names in the report's headers (views.py)
METRIC_KEYS = ("accuracy", "accuracy_top5", "nll", "ece", "entropy", "top1_agreement", "predictive_kl",
               "mutual_information", "mutual_information_mm", "teacher_iou", "teacher_accuracy", "acc_gap",
               "train_accuracy", "train_top1_agreement", "tstddev")


class ReportError(UserError):
    """A sweep folder that cannot be reported: missing, no ``sweep.json``, unreadable ``sweep.json``."""


@dataclass
class Sweep:
    """What a report is made from: the jobs table, the trials' histories and reliability bins, sweep metadata."""

    root: Path
    name: str
    study: str | None
    source: str
    written: str
    jobs: pd.DataFrame  # one row per job of every stage
    trials: pd.DataFrame  # the students stage: one row per trial (and seed), with its metrics
    histories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # trial name -> per-epoch records
    reliability: dict[str, dict[str, list]] = field(default_factory=dict)  # trial name -> reliability bins
    extras: dict[str, dict[str, Any]] = field(default_factory=dict)  # other result files (A/B tests)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when it is missing, torn or not an object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_manifest(root: Path) -> dict[str, Any]:
    """``sweep.json`` of ``root``; one-line :class:`ReportError` when the folder or the file is not there."""
    if not root.is_dir():
        raise ReportError(f"{root} does not exist or is not a folder; give a sweep's out_dir (the folder with sweep.json)")
    path = root / "sweep.json"
    if not path.is_file():
        raise ReportError(f"{root} is not a sweep folder (no sweep.json); run `hpckd sweep run CONFIG` first")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ReportError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("jobs"), list):
        raise ReportError(f"{path} has no list of jobs; is it a sweep.json written by `hpckd sweep`?")
    return manifest


def job_folder(root: Path, entry: dict[str, Any]) -> Path:
    """The job's folder: as recorded, relative to the sweep when not absolute, and for a sweep folder that was
    moved or copied (its recorded absolute paths gone) the same place under ``root``."""
    recorded = Path(str(entry.get("folder", "")))
    if not recorded.is_absolute():
        return root / recorded
    if recorded.exists():
        return recorded
    return root / recorded.parent.name / recorded.name


def _state(folder: Path, stage: str, expected_hash: str | None) -> tuple[str, str, dict[str, Any] | None]:
    """(state, detail, results) of one job from its files, as the sweep's own status reads them."""
    done = read_json(folder / f"sweep-{stage}.done.json")
    error = read_json(folder / f"sweep-{stage}.error.json")
    started = read_json(folder / f"sweep-{stage}.started.json")
    needs_results = stage in ("teachers", "students")
    results = read_json(folder / "results.json") if stage != "data" else None
    if results is not None and not isinstance(results.get("metrics"), dict):
        results = None
    if done is not None and (expected_hash is None or done.get("config_hash") == expected_hash):
        if needs_results and results is None:
            return "failed", f"done, but results.json is missing or not valid JSON (in {folder})", None
        return "done", "", results
    if error is not None:
        return "failed", str(error.get("error", "failed (no error line recorded)")), results
    if done is not None:
        return "missing", "done for a different config (would run again)", None
    if started is not None:
        return "missing", f"started {started.get('time', '?')}, no result yet (still running, or ended without one)", None
    return "missing", "not run yet", None


def _config(results: dict[str, Any] | None) -> dict[str, Any]:
    cfg = (results or {}).get("config")
    return cfg if isinstance(cfg, dict) else {}


def _get(mapping: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


def _number(value: Any) -> float:
    if isinstance(value, bool) or value is None:
        return math.nan
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):  # {"value": ...} records (normalized_accuracy, tstddev.json)
        for key in ("value", "tstddev"):
            if key in value:
                return _number(value[key])
    return math.nan


def group_name(name: str) -> str:
    """The trial without its seed: ``T1sT2wSs_seed3`` -> ``T1sT2wSs`` (the sweep adds ``seed<N>`` as a part)."""
    parts = name.split("_")
    kept = [p for i, p in enumerate(parts) if i == 0 or not SEED_PART.match(p)]
    return "_".join(kept)


def da_label(cfg: dict[str, Any]) -> str:
    """The data augmentation a student trained with: its batch-level scheme (mixup, cutmix, cutmix_pick with its
    pick criterion) when one is set, else its augmentation policy (``aug``)."""
    ops = cfg.get("batch_ops") or {}
    scheme = str(ops.get("scheme") or "none")
    if scheme == "none":
        return str(cfg.get("aug") or "?")
    if scheme == "cutmix_pick" and ops.get("pick_criterion"):
        return f"cutmix_pick({ops['pick_criterion']})"
    return scheme


def _reliability(results: dict[str, Any] | None) -> dict[str, list] | None:
    """Reliability-diagram bins stored with a run's results (edges, counts, accuracy, confidence), if any."""
    for where in (("reliability",), ("metrics", "reliability"), ("eval", "val", "reliability")):
        found = _get(results, *where)
        if isinstance(found, dict) and "student" in found and isinstance(found["student"], dict):
            found = found["student"]
        if isinstance(found, dict) and {"counts", "accuracy", "confidence"} <= set(found):
            return found
    return None


def _independent_agreement(results: dict[str, Any] | None) -> float:
    """Top-1 agreement of this run with another independently trained model (``hpckd eval --against``), the
    fidelity study's independent-student baseline (Sec. 3.2): mean over the ``val_vs_*`` records."""
    values = [_number(_get(v, "top1_agreement")) for k, v in (_get(results, "eval") or {}).items()
              if k.startswith("val_vs_") and isinstance(v, dict)]
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _model_size(results: dict[str, Any] | None) -> tuple[float, float]:
    model = _get(results, "model") or {}
    return _number(model.get("params")), _number(model.get("macs", model.get("flops")))


def trial_row(root: Path, entry: dict[str, Any], state: str, detail: str, results: dict[str, Any] | None,
              teacher_archs: dict[str, str]) -> dict[str, Any]:
    """One trial's row: identity, state, what it was configured with, and every metric it stored."""
    cfg = _config(results)
    name = str(entry.get("name"))
    deps = [str(d) for d in entry.get("deps", [])]
    teachers = [d.split("/", 1)[1] for d in deps if d.startswith("teachers/")]
    dataset = next((d.split("/", 1)[1] for d in deps if d.startswith("data/")), "")
    metrics = (results or {}).get("metrics") or {}
    ev = (results or {}).get("eval") or {}
    loss = str(_get(cfg, "loss", "name") or ("ce" if (results or {}).get("mode") == "train" else ""))
    row: dict[str, Any] = {
        "trial": name, "group": group_name(name), "state": state, "detail": detail,
        "seed": cfg.get("seed", math.nan), "dataset": dataset, "teachers": "+".join(teachers),
        "n_teachers": len(teachers) if teachers or results is None else len(cfg.get("teachers") or []),
        "teacher_arch": "+".join(dict.fromkeys(teacher_archs.get(t, "?") for t in teachers)) or "-",
        "student_arch": str(_get(cfg, "model", "arch") or ""), "aug": str(cfg.get("aug") or ""),
        "da": da_label(cfg) if cfg else "", "loss": loss, "kd": "CE" if loss == "ce" or not teachers else "KD",
        "half_split": str(_get(cfg, "batch_ops", "half_split") or "none"),
        "replace": str(_get(cfg, "loss", "targets", "replace") or "none"),
        "manipulate": str(_get(cfg, "loss", "targets", "manipulate") or "none"),
        "subset": str(_get(cfg, "loss", "targets", "subset") or "all"),
        "epochs": _number(_get(cfg, "optim", "epochs")),
        "folder": str(job_folder(root, entry)),
    }
    for key in METRIC_KEYS:
        row[key] = _number(metrics.get(key))
    # the exact post-hoc passes (hpckd eval / the evaluation stage) win over the running per-epoch values
    row["affinity"] = _number(ev.get("val_affinity", metrics.get("affinity")))
    if not math.isnan(_number(ev.get("acc_gap"))):
        row["acc_gap"] = _number(ev.get("acc_gap"))
    if not math.isnan(_number(_get(ev, "train", "top1_agreement"))):
        row["train_top1_agreement"] = _number(_get(ev, "train", "top1_agreement"))
    row["independent_agreement"] = _independent_agreement(results)
    row["normalized_accuracy"] = _number((results or {}).get("normalized_accuracy"))
    tstd = read_json(Path(row["folder"]) / "tstddev.json")
    if tstd is not None:
        row["tstddev"] = _number(tstd.get("tstddev"))
    elif not math.isnan(_number((results or {}).get("tstddev"))):
        row["tstddev"] = _number((results or {}).get("tstddev"))
    timings = (results or {}).get("timings") or {}
    world = _number((results or {}).get("world_size"))
    row["total_s"] = _number(timings.get("total_s"))
    row["gpu_hours"] = row["total_s"] * (1.0 if math.isnan(world) else world) / 3600.0
    row["params"], row["macs"] = _model_size(results)
    row["image_size"] = _number(_get(cfg, "data", "image_size"))
    row["num_classes"] = float(len(_get(results, "data", "classes") or [])) or math.nan
    return row


def _blocked(entries: list[dict[str, Any]], states: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """A job not done whose dependency failed or is blocked is blocked (what the sweep reports, too)."""
    out = dict(states)
    for entry in entries:  # sweep.json lists jobs in stage order, so a dependency is settled before its users
        key = entry["key"]
        bad = [d for d in entry.get("deps", []) if out.get(d, ("", ""))[0] in ("failed", "blocked")]
        if bad and out[key][0] == "missing":
            out[key] = ("blocked", f"needs {bad[0]}, which is {out[bad[0]][0]}")
    return out


def load_sweep(root: str | Path) -> Sweep:
    """Read the sweep folder ``root`` (see the module docstring); one-line :class:`ReportError` if it is not one."""
    root = Path(root).absolute()
    manifest = read_manifest(root)
    entries = [e for e in manifest["jobs"] if isinstance(e, dict) and "key" in e and "stage" in e]
    found: dict[str, tuple[str, str, dict[str, Any] | None]] = {}
    for entry in entries:
        found[entry["key"]] = _state(job_folder(root, entry), str(entry["stage"]), entry.get("config_hash"))
    states = _blocked(entries, {k: (s, d) for k, (s, d, _) in found.items()})
    teacher_archs = {str(e["name"]): str(_get(_config(found[e["key"]][2]), "model", "arch") or "?")
                     for e in entries if e["stage"] == "teachers"}
    jobs = pd.DataFrame([{"key": e["key"], "stage": e["stage"], "name": e.get("name"), "state": states[e["key"]][0],
                          "detail": states[e["key"]][1], "folder": str(job_folder(root, e))} for e in entries],
                        columns=["key", "stage", "name", "state", "detail", "folder"])
    rows, histories, reliability = [], {}, {}
    evaluation = {e["name"]: states[e["key"]] for e in entries if e["stage"] == "evaluation"}
    for entry in entries:
        if entry["stage"] != "students":
            continue
        state, detail = states[entry["key"]]
        results = found[entry["key"]][2]
        ev_state = evaluation.get(entry["name"])
        if state == "done" and ev_state is not None and ev_state[0] != "done":
            # trained, but its evaluation stage did not finish: the trial is not complete
            state, detail = ev_state[0], f"evaluation: {ev_state[1]}"
        rows.append(trial_row(root, entry, state, detail, results, teacher_archs))
        if results is not None and isinstance(results.get("history"), list):
            histories[str(entry["name"])] = [h for h in results["history"] if isinstance(h, dict)]
        bins = _reliability(results)
        if bins is not None:
            reliability[str(entry["name"])] = bins
    trials = pd.DataFrame(rows)
    return Sweep(root=root, name=str(manifest.get("name", root.name)), study=manifest.get("study") or None,
                 source=str(manifest.get("source", "")), written=str(manifest.get("written", "")), jobs=jobs,
                 trials=trials, histories=histories, reliability=reliability, extras=_extras(root))


def _extras(root: Path) -> dict[str, dict[str, Any]]:
    """Result files of the cross-run commands kept in the sweep folder: ``hpckd ab-test --output`` records
    (``ab*.json`` at the top or under ``ab/``)."""
    out = {}
    for path in sorted([*root.glob("ab*.json"), *root.glob("ab/*.json")]):
        record = read_json(path)
        if record is not None and {"p_value", "control", "treatment"} <= set(record):
            out[str(path.relative_to(root))] = record
    return out
