"""Running a planned sweep: write every job's config, submit the stage graph, report status, cancel.

Layout of a sweep folder (``out_dir`` of the sweep config)::

    sweep.json                 what was planned (jobs, dependencies, config hashes); written by the driver
    datasets/<dataset>/        the data stage: config.yaml, index.json, state files (images: at its data.root)
    teachers/<teacher>/        a teacher's run (out_dir): config.yaml, last.pt, results.json, ... state files
    trials/<trial>/            a trial's run (out_dir), its evaluation's state files too
    submitit/<stage>/          submitit's pickles and the job logs

On SLURM every stage is submitted at once: one array per distinct dependency set (one for the teachers of a data
set, one per teacher combination for the students, ...), each with ``--dependency=afterok:<exactly the jobs it
needs>`` and ``--kill-on-invalid-dep=yes`` (a job whose dependency failed is ended, and reported blocked).
Locally (and in-process with ``debug``) the stages run in order, each keeping ``local_parallel`` jobs running
(a job starts as soon as a slot is free). ``--wait`` follows a SLURM sweep with a table of progress bars redrawn
in place on a terminal, or one progress line per change otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import submitit
import yaml
from omegaconf import OmegaConf

from hpckd.errors import ConfigError, UserError
from hpckd.io import atomic_write_json, atomic_write_text
from hpckd.sweep.executor import (JobFailed, cancel_on_signals, collect_results, make_executor,
                                  with_requeue_limit)
from hpckd.sweep.jobs import (DataJob, EvalJob, LogitsJob, SweepReportJob, SweepTrainJob, clear_state, data_changed,
                              now, read_state, store_data_changed, write_state)
from hpckd.sweep.spec import STAGE_NAMES, Job, Plan, Resources

STATES = ("new", "pending", "running", "requeued", "done", "failed", "blocked")
ACTIVE = ("pending", "running", "requeued")
# sacct base states -> sweep states
_SLURM_STATES = {"PENDING": "pending", "RUNNING": "running", "COMPLETING": "running", "CONFIGURING": "running",
                 "REQUEUED": "requeued", "REQUEUE_FED": "requeued", "REQUEUE_HOLD": "requeued",
                 "PREEMPTED": "requeued", "RESIZING": "running", "SUSPENDED": "running"}


# ------------------------------------------------------------------------------------------- executors


def default_executor() -> str:
    return "slurm" if shutil.which("sbatch") else "local"


def check_executor(kind: str) -> None:
    if kind == "slurm" and not (shutil.which("sbatch") and shutil.which("sacct")):
        raise UserError("executor 'slurm' needs the SLURM client tools (sbatch, sacct, scancel) on PATH; "
                        "use --executor local on a machine without SLURM")


def slurm_parameters(r: Resources) -> dict[str, Any]:
    """The submitit SLURM parameters of a stage's resources (what the sbatch header will say)."""
    params: dict[str, Any] = {"timeout_min": r.time_min, "cpus_per_task": r.cpus_per_task,
                              "tasks_per_node": r.ntasks, "nodes": r.nodes, "partition": r.partition,
                              "account": r.account, "qos": r.qos, "constraint": r.constraint,
                              "signal_delay_s": r.signal_delay_s}
    if r.gpus_per_node:
        params["gpus_per_node"] = r.gpus_per_node
    if r.mem_gb:
        params["mem"] = f"{int(r.mem_gb * 1024)}M"
    if r.array_parallelism:
        params["array_parallelism"] = r.array_parallelism
    if r.setup:
        params["setup"] = list(r.setup)
    return params


def sbatch_summary(r: Resources) -> str:
    parts = [f"{r.nodes}x{r.ntasks} task(s)", f"{r.cpus_per_task} cpu/task"]
    if r.gpus_per_node:
        parts.append(f"{r.gpus_per_node} gpu/node")
    if r.mem_gb:
        parts.append(f"{r.mem_gb:g} GB")
    parts.append(f"{r.time_min} min")
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(r, key):
            parts.append(f"{key}={getattr(r, key)}")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------- plan


def stage_groups(plan: Plan, stage: str, jobs: Sequence[Job] | None = None) -> list[tuple[tuple[str, ...], list[Job]]]:
    """The arrays a stage is submitted as: jobs grouped by their dependency set, split at MaxArraySize."""
    limit = getattr(plan.sweep.stages, stage).max_array_size
    groups: dict[tuple[str, ...], list[Job]] = {}
    for job in plan.stage(stage) if jobs is None else jobs:
        # An evaluation follows its trial's array task by task (aftercorr): grouped as the trials are.
        deps = plan.jobs[job.deps[0]].deps if stage == "evaluation" else job.deps
        groups.setdefault(tuple(sorted(deps)), []).append(job)
    return [(deps, members[i:i + limit]) for deps, members in groups.items() for i in range(0, len(members), limit)]


def gpu_hours(plan: Plan) -> tuple[float, dict[str, float], list[str]]:
    """Estimated GPU-hours: 3 x forward MACs (forward + backward) per image x images x epochs for each trained
    model, plus the teachers' forward MACs per student image, divided by ``estimate.tmacs_per_gpu_s``. Returns the
    total, the split per stage, and the data sets whose size is unknown (left out)."""
    from hpckd.models import count_macs, create

    cache: dict[tuple, int] = {}

    def macs(cfg: dict[str, Any], classes: int) -> int:
        key = (cfg["model"]["arch"], classes, cfg["data"]["image_size"], json.dumps(cfg["model"]["kwargs"]))
        if key not in cache:
            cache[key] = count_macs(create(key[0], classes, **cfg["model"]["kwargs"]), key[2])
        return cache[key]

    per_stage = {"teachers": 0.0, "students": 0.0}
    unknown: set[str] = set()
    rate = plan.sweep.estimate.tmacs_per_gpu_s * 1e12
    for stage in per_stage:
        for job in plan.stage(stage):
            ds_name = next(d.split("/", 1)[1] for d in job.deps if d.startswith("data/"))
            images, classes = dataset_size(plan, ds_name)
            if not images:
                unknown.add(ds_name)
                continue
            work = 3 * macs(job.config, classes)
            for dep in job.deps:
                if dep.startswith("teachers/"):
                    work += macs(plan.jobs[dep].config, classes)
            per_stage[stage] += work * images * job.config["optim"]["epochs"] / rate / 3600
    return sum(per_stage.values()), per_stage, sorted(unknown)


def dataset_size(plan: Plan, name: str) -> tuple[int, int]:
    spec = plan.sweep.datasets.get(name)
    if spec is None:
        return 0, 1000
    images = spec.train_images or (spec.synth.classes * spec.synth.per_class if spec.synth else 0)
    if not images and spec.digits:  # scikit-learn's 1,797 digits, less the val split
        images = round(1797 * (1 - spec.digits.val_fraction))
    classes = spec.num_classes or (spec.synth.classes if spec.synth else 10 if spec.digits else 1000)
    return images, classes


def format_plan(plan: Plan, max_listed: int = 40) -> str:
    s = plan.sweep
    lines = [f"sweep {s.name}: {len(plan.trials)} trial(s), {len(plan.teachers)} distinct teacher(s), "
             f"{len(plan.stage('data'))} data set(s) -> {plan.root}", "",
             f"{'stage':<11} {'jobs':>5} {'arrays':>6}  sbatch resources per job"]
    for stage in STAGE_NAMES:
        jobs = plan.stage(stage)
        if jobs:
            arrays = stage_groups(plan, stage)
            lines.append(f"{stage:<11} {len(jobs):>5} {len(arrays):>6}  {sbatch_summary(getattr(s.stages, stage))}")
    lines.append("")
    for title, jobs in (("teachers", plan.teachers), ("trials", plan.trials)):
        shown = []
        for job in jobs[:max_listed]:
            c = job.config
            teachers = [d.split("/", 1)[1] for d in job.deps if d.startswith("teachers/")]
            via = f" <- {'+'.join(teachers)}" if teachers else (" (alone)" if title == "trials" else "")
            shown.append(f"  {job.name:<24} {c['model']['arch']}, aug {c['aug']}, seed {c['seed']}, "
                         f"{c['optim']['epochs']} epochs, data {c['data']['root']}{via}")
        more = f"  ... and {len(jobs) - max_listed} more" if len(jobs) > max_listed else None
        lines += [f"{title}:", *shown, *([more] if more else [])]
    total, per_stage, unknown = gpu_hours(plan)
    note = f"; data set(s) of unknown size left out: {', '.join(unknown)} (set datasets.NAME.train_images)" if unknown else ""
    lines.append(f"estimate: {total:.3g} GPU-hours (teachers {per_stage['teachers']:.3g}, students "
                 f"{per_stage['students']:.3g}) from MACs (forward + backward = 3x forward, plus teacher forwards) "
                 f"at a stated {s.estimate.tmacs_per_gpu_s:g} TMAC/s per GPU{note}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- writing the sweep


def check_folder(plan: Plan) -> None:
    """The folder belongs to this sweep: its ``sweep.json`` was written by a sweep of the same content (the
    normalised spec's hash, :func:`hpckd.sweep.spec.spec_hash`), whatever either is named; one line otherwise."""
    manifest_path = plan.root / "sweep.json"
    if not manifest_path.is_file():
        return
    try:
        old = json.loads(manifest_path.read_text())
    except ValueError:
        old = {}
    recorded = old.get("spec_hash")
    if recorded is None:  # written before spec hashes: the name is all there is to compare
        differs = old.get("name") not in (None, plan.sweep.name)
    else:
        differs = recorded != plan.spec_hash
    if differs:
        raise ConfigError(f"{plan.root} holds sweep {old.get('name')!r}, made by another config "
                          f"({old.get('source')}; its content differs from {plan.source}): give this sweep "
                          f"({plan.sweep.name!r}) its own out_dir, or remove {manifest_path} to reuse the folder")


def check_data(plan: Plan) -> None:
    """A data set indexed by an earlier run whose files have changed since: its fingerprints are recorded anew
    (``fingerprint.json``, which finished runs are checked against) and its data stage runs again."""
    from hpckd.data.datasets import load_splits
    from hpckd.sweep.jobs import FINGERPRINTS, read_fingerprints

    for job in plan.stage("data"):
        recorded = read_fingerprints(job.folder)
        if recorded is None or not is_done(job.folder, "data", job.config_hash):
            continue  # never indexed: the data stage will
        try:
            train, val = load_splits(OmegaConf.create(job.config)["data"])
            current = {"train": train.fingerprint(), "val": val.fingerprint()}
        except UserError:
            current = {}  # unreadable now: the data stage runs again and reports why
        if current != {k: recorded.get(k) for k in ("train", "val")}:
            if current:
                atomic_write_json(job.folder / FINGERPRINTS, current)
            clear_state(job.folder, "data", ("done",))


def prepare(plan: Plan) -> None:
    """Check the folder belongs to this sweep, then write ``sweep.json`` and every job's ``config.yaml``."""
    manifest_path = plan.root / "sweep.json"
    check_folder(plan)
    check_data(plan)
    plan.root.mkdir(parents=True, exist_ok=True)
    manifest = {"name": plan.sweep.name, "study": plan.sweep.study, "source": plan.source, "written": now(),
                "spec_hash": plan.spec_hash, "mini": plan.mini,
                "jobs": [{"key": j.key, "stage": j.stage, "name": j.name, "folder": str(j.folder),
                          "deps": list(j.deps), "config_hash": j.config_hash} for j in plan.jobs.values()]}
    atomic_write_json(manifest_path, manifest)
    atomic_write_text(plan.root / "sweep.yaml", OmegaConf.to_yaml(OmegaConf.structured(plan.sweep)))
    report = plan.jobs.get("report/report")
    if report is not None and any(not is_done(j.folder, j.stage, j.config_hash) for j in plan.jobs.values()
                                  if j is not report):
        clear_state(report.folder, report.stage, ("done",))  # something runs again: so does the report, after it
    for job in plan.jobs.values():
        if job.stage in ("evaluation", "report"):
            continue  # evaluates its trial's config; reads the sweep folder
        job.folder.mkdir(parents=True, exist_ok=True)
        path = job.folder / "config.yaml"
        text = yaml.safe_dump(job.config, sort_keys=False)  # plain YAML: OmegaConf.to_yaml is 20x slower
        if not path.is_file() or path.read_text() != text:
            atomic_write_text(path, text)


def make_call(job: Job, threads: int) -> Callable[[], Any]:
    if job.stage == "data":
        return DataJob(job.folder, job.config_hash, job.extra.get("synth"), threads, job.extra.get("digits"))
    if job.stage == "evaluation":
        return EvalJob(job.folder, job.config_hash, job.extra["evaluate"], threads)
    if job.stage == "logits":
        return LogitsJob(job.folder, job.config_hash, job.extra["store"], job.extra["epochs"], threads,
                         str(job.data_folder) if job.data_folder else None)
    if job.stage == "report":
        return SweepReportJob(job.folder, job.config_hash, threads)
    return SweepTrainJob(job.mode, job.folder, job.stage, job.config_hash, threads,
                         str(job.data_folder) if job.data_folder else None)


# ------------------------------------------------------------------------------------------- status


@dataclasses.dataclass
class Row:
    stage: str
    name: str
    state: str
    job_id: str = "-"
    elapsed: str = "-"
    detail: str = ""
    log: str = ""


def is_done(folder: Path, stage: str, expected_hash: str) -> bool:
    """The job's work finished for exactly this config (and a training run's results are readable, and were
    computed on the data its data set holds now: the fingerprints match; the report's report.html is there)."""
    done = read_state(folder, stage, "done")
    if done is None or done.get("config_hash") != expected_hash:
        return False
    if stage in ("teachers", "students"):
        try:
            results = json.loads((Path(folder) / "results.json").read_text())
        except (OSError, ValueError):
            return False
        if done.get("data_folder") and data_changed(Path(folder), Path(done["data_folder"])):
            return False
        return isinstance(results, dict) and isinstance(results.get("metrics"), dict)
    if stage == "report":
        return (Path(folder) / "report" / "report.html").is_file()
    if stage == "logits" and done.get("data_folder"):
        return not store_data_changed(Path(folder) / "store", Path(done["data_folder"]))
    return True


def load_manifest(root: str | Path) -> list[dict[str, Any]]:
    path = Path(root) / "sweep.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise UserError(f"{root} is not a sweep folder (no sweep.json); run `hpckd sweep run CONFIG` first") from exc
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    return manifest["jobs"]


def slurm_states(job_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
    """``{array task id: (state, elapsed)}`` for the given array/job ids: one ``sacct`` call."""
    if not job_ids:
        return {}
    try:
        out = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State,Elapsed", "-j", ",".join(job_ids)],
                             check=True, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise UserError(f"cannot query SLURM accounting (sacct): {exc}") from exc
    states: dict[str, tuple[str, str]] = {}
    pending_ranges: dict[str, tuple[str, str]] = {}
    for line in out.splitlines():
        fields = line.strip().split("|")
        if len(fields) < 3:
            continue
        job_id, state, elapsed = fields[0], fields[1].split()[0] if fields[1] else "UNKNOWN", fields[2]
        if "[" in job_id:
            pending_ranges.update(dict.fromkeys(expand_array_id(job_id), (state, elapsed)))
        else:
            states[job_id] = (state, elapsed)
    # A task's own record wins over the array's range record ("12_[0-3]"), which accounting may still list as
    # pending for a while after its tasks have started (slurmdbd is updated asynchronously).
    return {**pending_ranges, **states}


def expand_array_id(job_id: str) -> list[str]:
    """``12_[0-3%2]`` (a pending array's tasks, as sacct shows them) -> ``12_0 .. 12_3``; other ids unchanged."""
    match = re.fullmatch(r"(\d+)_\[([^\]]+)\]", job_id)
    if not match:
        return [job_id]
    base, spec = match.group(1), match.group(2).split("%")[0]
    tasks = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        tasks += [f"{base}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return tasks


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie (exited, not yet reaped) is not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _elapsed(start: str | None, end: str | None = None) -> str:
    if not start:
        return "-"
    t0 = datetime.datetime.fromisoformat(start)
    t1 = datetime.datetime.fromisoformat(end) if end else datetime.datetime.now().astimezone()
    seconds = max(0, int((t1 - t0).total_seconds()))
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _last_log_line(path: str) -> str:
    with contextlib.suppress(OSError):
        lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
        if lines:
            return lines[-1][:200]
    return ""


def sweep_status(root: str | Path, entries: list[dict[str, Any]] | None = None) -> list[Row]:
    """Every job's state; SLURM is asked once per stage (one ``sacct`` for all of a stage's arrays)."""
    entries = load_manifest(root) if entries is None else entries
    rows: dict[str, Row] = {}
    by_stage: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        by_stage.setdefault(entry["stage"], []).append(entry)
    for stage in STAGE_NAMES:
        stage_entries = by_stage.get(stage, [])
        records = {e["key"]: read_state(Path(e["folder"]), stage, "job") for e in stage_entries}
        # Only what the files do not settle is asked of the scheduler (a finished sweep needs no query at all).
        arrays = sorted({r["array_id"] for e in stage_entries if (r := records[e["key"]])
                         and r.get("executor") == "slurm"
                         and not is_done(Path(e["folder"]), stage, e["config_hash"])})
        scheduler = slurm_states(arrays) if arrays else {}
        for entry in stage_entries:
            rows[entry["key"]] = _row(entry, records[entry["key"]], scheduler)
    # A job that is not done and needs a failed or blocked job is blocked (SLURM ends it: kill-on-invalid-dep);
    # not the report, which runs after whatever could finish (afterany).
    for entry in entries:
        row = rows[entry["key"]]
        if entry["stage"] == "report":
            continue
        bad = [d for d in entry["deps"] if rows.get(d) and rows[d].state in ("failed", "blocked")]
        if bad and row.state not in ("done", "running"):
            row.state, row.detail = "blocked", f"needs {bad[0]}, which is {rows[bad[0]].state}"
    return [rows[e["key"]] for e in entries]


def _row(entry: dict[str, Any], job: dict[str, Any] | None, scheduler: dict[str, tuple[str, str]]) -> Row:
    folder, stage = Path(entry["folder"]), entry["stage"]
    row = Row(stage, entry["name"], "new")
    started, error = read_state(folder, stage, "started"), read_state(folder, stage, "error")
    if job:
        row.job_id, row.log = str(job.get("job_id", "-")), str(job.get("stderr", ""))
    if is_done(folder, stage, entry["config_hash"]):
        done = read_state(folder, stage, "done") or {}
        row.state, row.elapsed = "done", _elapsed((started or {}).get("time"), done.get("time"))
        return row
    done = read_state(folder, stage, "done")
    if done and done.get("config_hash") == entry["config_hash"] and not error:
        if done.get("data_folder") and (store_data_changed(folder / "store", Path(done["data_folder"]))
                                        if stage == "logits" else data_changed(folder, Path(done["data_folder"]))):
            row.detail = "its data set changed since it ran: runs again"
            return row
        if stage == "report":
            row.detail = f"{folder / 'report' / 'report.html'} is missing: runs again"
            return row
    if done and done.get("config_hash") == entry["config_hash"]:  # finished, but its results are unreadable
        row.state, row.detail = "failed", f"{folder / 'results.json'} is missing or not valid JSON; rerun to redo it"
        return row
    if error:
        row.state, row.detail = "failed", error.get("error", "")
        row.elapsed = _elapsed((started or {}).get("time"), error.get("time"))
        return row
    if not job:
        if done:
            row.detail = "done for a different config: runs again"
        return row
    if job.get("executor") == "slurm":
        state, elapsed = scheduler.get(row.job_id, ("UNKNOWN", "-"))
        row.elapsed = elapsed
        if state in _SLURM_STATES:
            row.state = _SLURM_STATES[state]
            if row.state == "pending" and started:  # it ran before: requeued after a preemption or time-out
                row.state = "requeued"
        elif state == "UNKNOWN":
            row.state, row.detail = "pending", "not in accounting yet"
        else:
            row.state = "failed"
            row.detail = f"{state}" + (f": {_last_log_line(row.log)}" if row.log else "")
        return row
    pid = job.get("pid")
    if pid and _pid_alive(int(pid)):
        row.state = "running" if started else "pending"
        row.elapsed = _elapsed((started or {}).get("time"))
    else:
        row.state = "failed"
        row.detail = "the job ended without a result" + (f": {_last_log_line(row.log)}" if row.log else "")
    return row


def format_status(rows: Sequence[Row]) -> str:
    counts = {state: sum(r.state == state for r in rows) for state in STATES}
    lines = [f"{'stage':<11} {'name':<24} {'state':<9} {'job':<12} {'elapsed':>9}  detail",
             "-" * 80]
    for r in rows:
        detail = r.detail + (f" (log: {r.log})" if r.state == "failed" and r.log else "")
        lines.append(f"{r.stage:<11} {r.name:<24} {r.state:<9} {r.job_id:<12} {r.elapsed:>9}  {detail}".rstrip())
    lines.append(", ".join(f"{n} {state}" for state, n in counts.items() if n))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- running


def run_sweep(plan: Plan, executor: str, *, wait: bool = False, poll_s: float = 5.0,
              echo: Callable[[str], None] = print) -> list[Row]:
    """Submit (SLURM) or run (local, debug) every job that is not done yet; returns the status rows."""
    check_executor(executor)
    prepare(plan)
    current = dict(zip(plan.jobs, sweep_status(plan.root)))
    if executor == "slurm":
        _submit_slurm(plan, current, echo)
        if wait:
            return follow(plan.root, poll_s, echo, live=echo is print and sys.stdout.isatty())
        return sweep_status(plan.root)
    _run_in_order(plan, current, executor, echo)
    return sweep_status(plan.root)


def _todo(job: Job, row: Row) -> bool:
    """Submit this job? Not when done, nor when it is queued or running already (never start it twice)."""
    return row.state not in ("done", *ACTIVE)


def _record_submission(job: Job, submitted: submitit.Job, executor: str) -> None:
    job_id = str(submitted.job_id)
    record = {"executor": executor, "job_id": job_id, "array_id": job_id.split("_")[0], "submitted": now(),
              "config_hash": job.config_hash, "stdout": str(submitted.paths.stdout),
              "stderr": str(submitted.paths.stderr)}
    if executor == "local":  # submitit's local job id is its controller's pid (the leader of its session)
        record["pid"] = int(job_id)
    write_state(job.folder, job.stage, "job", record)


def _submit_slurm(plan: Plan, current: dict[str, Row], echo: Callable[[str], None]) -> None:
    job_ids: dict[str, str] = {key: row.job_id for key, row in current.items() if row.state in ACTIVE}
    for stage in STAGE_NAMES:
        todo = [job for job in plan.stage(stage) if _todo(job, current[job.key])]
        if not todo:
            continue
        resources: Resources = getattr(plan.sweep.stages, stage)
        for dependency, members in _dependency_groups(plan, stage, todo, job_ids):
            extra: dict[str, Any] = dict(resources.sbatch)
            if dependency:
                extra.update({"dependency": dependency, "kill_on_invalid_dep": "yes"})
            params = slurm_parameters(resources)
            params["additional_parameters"] = extra
            ex = make_executor("slurm", plan.root / "submitit" / stage, name=f"{plan.sweep.name}-{stage}", **params)
            # submitit takes the requeue limit at construction only (AutoExecutor(slurm_max_num_timeout=...)):
            # set it on the SLURM executor inside; past it a timed-out or preempted job fails instead of requeueing.
            getattr(ex, "_executor", ex).max_num_timeout = resources.max_requeues
            for job in members:
                clear_state(job.folder, job.stage)
            try:
                # submitit echoes sbatch's stderr; a failure is reported below in one line instead.
                with contextlib.redirect_stderr(io.StringIO()):
                    # Every requeue counts against max_requeues, preemptions too (submitit counts time-outs only).
                    submitted = ex.submit_array([with_requeue_limit(make_call(job, resources.cpus_per_task),
                                                                    resources.max_requeues,
                                                                    f"stages.{stage}.max_requeues")
                                                 for job in members])
            except (submitit.core.utils.FailedJobError, OSError, subprocess.SubprocessError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
                done = f"; {stage} and later stages were not submitted" + (
                    f" (earlier stages were: `hpckd sweep cancel {plan.root}` to withdraw them)" if job_ids else "")
                raise UserError(f"sbatch failed: {first}{done}") from exc
            for job, sub in zip(members, submitted):
                _record_submission(job, sub, "slurm")
                job_ids[job.key] = str(sub.job_id)
            first = str(submitted[0].job_id).split("_")[0]
            after = f" ({dependency})" if dependency else ""
            echo(f"{stage}: submitted {len(members)} job(s) as array {first}{after}")
    if not any(_todo(job, current[job.key]) for job in plan.jobs.values()):
        echo("nothing to submit: every job is done or queued")


def _dependency_groups(plan: Plan, stage: str, todo: list[Job],
                       job_ids: dict[str, str]) -> list[tuple[str, list[Job]]]:
    """The arrays to submit and each one's ``--dependency``: ``afterok`` on exactly the jobs its members need that
    are not done yet (the report: ``afterany``); an evaluation array whose tasks are its trials' array tasks 0..n-1 in order uses
    ``aftercorr`` (task i waits for trial task i only), otherwise each evaluation waits for its own trial."""
    if stage != "evaluation":
        # The report follows whatever could finish (afterany): a sweep with failed or blocked trials still gets one.
        kind = "afterany" if stage == "report" else "afterok"
        out = []
        for deps, members in stage_groups(plan, stage, todo):
            waits = [job_ids[d] for d in deps if d in job_ids]  # done dependencies need no waiting
            out.append((f"{kind}:" + ":".join(waits) if waits else "", members))
        return out
    by_array: dict[str, list[Job]] = {}
    for job in todo:
        trial_id = job_ids.get(job.deps[0], "")
        by_array.setdefault(trial_id.split("_")[0] if "_" in trial_id else trial_id, []).append(job)
    out = []
    limit = plan.sweep.stages.evaluation.max_array_size
    for array_id, members in by_array.items():
        tasks = [job_ids[job.deps[0]].partition("_")[2] for job in members] if array_id else []
        if not array_id:
            out += [("", members[i:i + limit]) for i in range(0, len(members), limit)]
        elif tasks == [str(i) for i in range(len(members))]:
            out.append((f"aftercorr:{array_id}", members))
        else:
            out += [(f"afterok:{job_ids[job.deps[0]]}", [job]) for job in members]
    return out


def _run_in_order(plan: Plan, current: dict[str, Row], executor: str, echo: Callable[[str], None]) -> None:
    states = {key: row.state for key, row in current.items()}
    for active in [key for key, state in states.items() if state in ACTIVE]:
        raise UserError(f"{active} is already running (another driver); wait for it or `hpckd sweep cancel "
                        f"{plan.root}`")
    for stage in STAGE_NAMES:
        jobs = plan.stage(stage)
        if not jobs:
            continue
        todo, blocked = [], []
        for job in jobs:
            if states[job.key] == "done":
                continue
            # The report runs after whatever could finish (SLURM: afterany), so a failed trial still gets one.
            if all(states.get(d) == "done" for d in job.deps) or job.stage == "report":
                todo.append(job)
            else:
                blocked.append(job)
                states[job.key] = "blocked"
        done = [job.name for job in jobs if states[job.key] == "done"]
        if done and not todo:
            echo(f"{stage}: already done: {', '.join(done)}")
        if blocked:
            echo(f"{stage}: blocked (a job it needs failed): {', '.join(j.name for j in blocked)}")
        resources: Resources = getattr(plan.sweep.stages, stage)
        parallel = plan.sweep.local_parallel or max(1, (os.cpu_count() or 1) // resources.cpus_per_task)
        for job in _run_window(plan, stage, todo, executor, parallel, echo):
            states[job.key] = "done" if is_done(job.folder, job.stage, job.config_hash) else "failed"
            if states[job.key] == "failed":
                error = read_state(job.folder, job.stage, "error") or {}
                echo(f"{stage}: {job.name} failed: {error.get('error', 'no result')}")


def _run_window(plan: Plan, stage: str, todo: list[Job], executor: str, parallel: int,
                echo: Callable[[str], None], poll_s: float = 0.5) -> list[Job]:
    """Run ``todo`` keeping ``parallel`` jobs running: a free slot is refilled as soon as a job ends (not chunks
    that wait for their slowest job). Returns the jobs in the order they ended. The debug executor runs each job
    in this process, one after another."""
    if not todo:
        return []
    resources: Resources = getattr(plan.sweep.stages, stage)
    ex = make_executor(executor, plan.root / "submitit" / stage, timeout_min=resources.time_min)
    width = max(1, min(parallel, len(todo)))
    # The cores are shared by the jobs that run at once.
    threads = max(1, (os.cpu_count() or 1) // width) if executor == "local" else 1
    queue, running, ended = list(todo), [], []
    submitted: list[submitit.Job] = []  # what a signal cancels: everything submitted so far
    with cancel_on_signals(submitted):
        while queue or running:
            while queue and len(running) < width:
                job = queue.pop(0)
                clear_state(job.folder, job.stage)
                echo(f"{stage}: running {job.name} on the {executor} executor")
                sub = ex.submit(make_call(job, threads))
                submitted.append(sub)
                _record_submission(job, sub, executor)
                running.append((job, sub))
                if executor == "debug":
                    break  # runs on first access, below: one at a time
            finished = [(job, sub) for job, sub in running if isinstance(sub, submitit.DebugJob) or sub.done()]
            if not finished:
                time.sleep(poll_s)  # polling the jobs' processes (submitit's done() reads their exit)
                continue
            for job, sub in finished:
                running.remove((job, sub))
                ended.append(job)
                try:
                    collect_results([sub], poll_s=poll_s)
                except JobFailed:
                    pass  # the job recorded its own error; the caller's rows say which
    return ended


def follow(root: Path, poll_s: float, echo: Callable[[str], None], live: bool = False) -> list[Row]:
    """``--wait``: follow the sweep until no job is queued or running. ``live`` (stdout is a terminal): a table with
    a progress bar per stage, redrawn in place (:func:`format_progress`); otherwise one progress line per change
    (:func:`progress_line`), which reads well in a log file."""
    last, drawn = None, 0
    while True:
        rows = sweep_status(root)
        if live:
            block = format_progress(rows)
            if block != last:
                sys.stdout.write(redraw(drawn, block))
                sys.stdout.flush()
                drawn, last = block.count("\n") + 1, block
        else:
            line = progress_line(rows)
            if line != last:
                echo(line)
                last = line
        if not any(r.state in ACTIVE for r in rows):
            return rows
        time.sleep(poll_s)  # the scheduler is polled: sacct has no way to notify


def redraw(previous_lines: int, block: str) -> str:
    """The text that replaces the ``previous_lines`` lines written last (cursor up, clear to the end) by
    ``block``."""
    up = f"\x1b[{previous_lines}F\x1b[J" if previous_lines else ""
    return up + block + "\n"


def _stage_counts(rows: Sequence[Row], stage: str) -> tuple[int, int, str]:
    mine = [r for r in rows if r.stage == stage]
    done = sum(r.state == "done" for r in mine)
    extra = ", ".join(f"{n} {s}" for s in ("running", "pending", "requeued", "failed", "blocked", "new")
                      if (n := sum(r.state == s for r in mine)))
    return done, len(mine), extra


def format_progress(rows: Sequence[Row], width: int = 24) -> str:
    """The live table of ``--wait`` on a terminal: per stage a bar of its done jobs (``#``), failed or blocked ones
    (``x``) and active ones (``>``), ``done/total``, and how many are in each other state."""
    lines = [f"{'stage':<11} {'progress':<{width + 2}} {'done':>9}  other"]
    for stage in STAGE_NAMES:
        mine = [r for r in rows if r.stage == stage]
        if not mine:
            continue
        done, total, extra = _stage_counts(rows, stage)
        bad = sum(r.state in ("failed", "blocked") for r in mine)
        active = sum(r.state in ACTIVE for r in mine)
        cells = [round(width * n / total) for n in (done, done + bad, done + bad + active)]
        bar = "#" * cells[0] + "x" * (cells[1] - cells[0]) + ">" * (cells[2] - cells[1])
        lines.append(f"{stage:<11} [{bar:<{width}}] {f'{done}/{total}':>9}  {extra}".rstrip())
    return "\n".join(lines)


def progress_line(rows: Sequence[Row]) -> str:
    parts = []
    for stage in STAGE_NAMES:
        if not any(r.stage == stage for r in rows):
            continue
        done, total, extra = _stage_counts(rows, stage)
        bar = "#" * round(10 * done / total)
        parts.append(f"{stage} [{bar:<10}] {done}/{total}" + (f" ({extra})" if extra else ""))
    return " | ".join(parts)


# ------------------------------------------------------------------------------------------- cancel


def cancel_sweep(root: str | Path, names: Sequence[str] = ()) -> list[str]:
    """Cancel the queued and running jobs of the sweep (or of the named trials/teachers, with their evaluation);
    returns the keys cancelled. SLURM jobs: one ``scancel``; local jobs: SIGTERM to their session (they checkpoint)."""
    entries = load_manifest(root)
    known = {e["name"] for e in entries}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"no trial or teacher named {unknown[0]!r} in {root}")
    rows = {e["key"]: row for e, row in zip(entries, sweep_status(root, entries))}
    chosen = [e for e in entries if not names or e["name"] in names]
    targets = [e for e in chosen if rows[e["key"]].state in ACTIVE]
    slurm_ids, keys = [], []
    for entry in targets:
        record = read_state(Path(entry["folder"]), entry["stage"], "job") or {}
        keys.append(entry["key"])
        if record.get("executor") == "slurm":
            slurm_ids.append(str(record["job_id"]))
        elif record.get("pid"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(record["pid"]), signal.SIGTERM)
    if slurm_ids:
        try:
            subprocess.run(["scancel", *slurm_ids], check=True, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            raise UserError(f"scancel failed: {exc}") from exc
    return keys


# ------------------------------------------------------------------------------------------- results


def read_results(folder: Path, name: str) -> dict[str, Any]:
    path = Path(folder) / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not valid JSON"
        raise UserError(f"cannot read the results of {name}: {path} ({reason}); delete {path.parent} and rerun "
                        f"to redo it") from exc
    if not isinstance(results, dict) or not isinstance(results.get("metrics"), dict):
        raise UserError(f"{path} holds no metrics (not a finished run's results); delete {path.parent} and rerun "
                        f"to redo it")
    return {**results, "name": name}


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The demo's table: trial, student val accuracy, top-1 agreement with the teacher ensemble."""
    lines = [f"{'trial':<14} {'student val acc':>15} {'top-1 agreement':>16}", "-" * 47]
    for r in rows:
        m = r["metrics"]
        agree = m.get("top1_agreement")
        shown = "-" if agree is None else f"{agree:.3f}"  # teachers have no teacher to agree with
        lines.append(f"{r['name']:<14} {m['accuracy']:>15.3f} {shown:>16}")
    return "\n".join(lines)


def results_table(plan: Plan, strict: bool = False) -> str:
    """The table of every finished teacher and trial; ``strict``: one error line if any job is not done."""
    if strict:
        rows = dict(zip(plan.jobs, sweep_status(plan.root)))
        for key, row in rows.items():
            if row.state != "done":
                log = f" (log: {row.log})" if row.log else ""
                raise UserError(f"{key} is {row.state}" + (f": {row.detail}" if row.detail else "") + log)
    rows = [read_results(job.folder, job.name) for job in [*plan.teachers, *plan.trials]
            if is_done(job.folder, job.stage, job.config_hash)]
    return format_table(rows)
