"""The sweep config: a base experiment plus axes, expanded into trials (students) and the teachers they share.

A sweep YAML is typed by :class:`SweepConfig` (OmegaConf, like the experiment config); every mistake is one
:class:`~hpckd.errors.ConfigError` line. :func:`plan_sweep` expands it into a :class:`Plan`:

* **cells** -- the attention study's grid (every assignment of the ``letters`` to the teacher roles and the
  student: ``T1sT2wSs``), its student-only baselines (``Sw``, ``Ss``) and any explicit ``trials``;
* **variations** -- the product of ``datasets`` x ``seeds`` x every entry of ``axes`` (each adds ``_<label>`` to
  the trial name; a data set or seed only when there are several);
* every (cell, variation) is a trial; its teachers are deduplicated by their full experiment config (arch, aug,
  seed, data and everything else), so a teacher is trained once and shared by every trial that uses it.

Every trial's and teacher's experiment config is built and validated with
:func:`hpckd.train.experiment.load_experiment` here, before anything is written or submitted.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hpckd.config.loading import describe_config_error
from hpckd.errors import ConfigError, UserError
from hpckd.config.migrate import check_renamed_keys
from hpckd.train.experiment import load_experiment, validate_experiment

SWEEP_DIR_TOKEN = "{sweep}"  # replaced by the sweep folder's absolute path in every override
EVALUATIONS = ("val_augmented", "train")
AXIS_TARGETS = ("students", "all")
STAGE_NAMES = ("data", "teachers", "logits", "students", "evaluation", "report")
STUDIES = ("attention", "augmentation", "fidelity", "response")  # the report's views (hpckd.report)
DEFAULT_LETTERS = {"n": "none", "w": "weak", "s": "strong"}  # the attention study's policies


@dataclass
class Resources:
    """sbatch resources of one stage (SLURM only; the local executor reads ``cpus_per_task``)."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 0  # 0: one task per GPU (gpus_per_node), at least one
    cpus_per_task: int = 1
    mem_gb: float = 0.0  # 0: the partition's default
    time_min: int = 60
    partition: Optional[str] = None  # noqa: UP045 (OmegaConf needs Optional)
    account: Optional[str] = None  # noqa: UP045
    qos: Optional[str] = None  # noqa: UP045
    constraint: Optional[str] = None  # noqa: UP045
    array_parallelism: int = 0  # 0: no %P limit on the array
    max_array_size: int = 1000  # the cluster's MaxArraySize: larger arrays are split
    sbatch: dict[str, Any] = field(default_factory=dict)  # extra sbatch options, e.g. {exclusive: true}
    setup: list[str] = field(default_factory=list)  # lines run before the job (module load, source venv)
    signal_delay_s: int = 120  # SIGUSR2 this long before the time limit: checkpoint and requeue
    max_requeues: int = 3  # time-outs/preemptions a job may be requeued after, then it fails

    @property
    def ntasks(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)


@dataclass
class Stages:
    data: Resources = field(default_factory=lambda: Resources(time_min=30))
    teachers: Resources = field(default_factory=Resources)
    students: Resources = field(default_factory=Resources)
    evaluation: Resources = field(default_factory=lambda: Resources(time_min=30))
    logits: Resources = field(default_factory=lambda: Resources(time_min=60))
    report: Resources = field(default_factory=lambda: Resources(time_min=30))


@dataclass
class SynthData:
    """Generate this ImageFolder set at the data set's ``data.root`` in the data stage unless it is complete."""

    classes: int = 10
    per_class: int = 100
    val_per_class: int = 20
    size: str = "32x32"
    seed: int = 0


@dataclass
class DigitsData:
    """scikit-learn's 1,797 8x8 handwritten digits, written at ``data.root`` as an ImageFolder in the data stage
    (:func:`hpckd.data.digits.ensure_digits`): 10 classes, ``size`` x ``size`` PNGs, a stratified val split."""

    size: int = 32
    val_fraction: float = 0.2
    seed: int = 0


@dataclass
class DatasetSpec:
    overrides: list[str] = field(default_factory=list)  # e.g. [data.root=/data/cifar100, data.format=cifar100]
    synth: Optional[SynthData] = None  # noqa: UP045
    digits: Optional[DigitsData] = None  # noqa: UP045
    train_images: int = 0  # for the GPU-hours estimate (0: from synth, else unknown)
    num_classes: int = 0  # for the MAC count (0: from synth, else 1000)


@dataclass
class TeacherSpec:
    overrides: list[str] = field(default_factory=list)  # e.g. [model.arch=resnet20, seed=1]
    seed_offset: int = 0  # with `seeds`: this teacher's seed = the trial's seed + seed_offset


@dataclass
class GridSpec:
    """The attention study: every assignment of ``letters`` to the teacher ``roles`` and the student."""

    roles: list[str] = field(default_factory=list)  # teacher names (keys of `teachers`), e.g. [T1, T2]
    letters: dict[str, str] = field(default_factory=dict)  # letter -> policy; empty: DEFAULT_LETTERS
    teacher_letters: dict[str, list[str]] = field(default_factory=dict)  # per role (default: every letter)
    student_letters: list[str] = field(default_factory=list)  # default: every letter
    baselines: list[str] = field(default_factory=list)  # student-only trials S<letter>, trained with CE alone


@dataclass
class TrialSpec:
    name: str = "???"
    teachers: list[str] = field(default_factory=list)  # keys of `teachers`; none: trained alone (`hpckd train`)
    overrides: list[str] = field(default_factory=list)


@dataclass
class AxisSpec:
    name: str = "???"  # the label in trial names: `_<name><value>`
    key: Optional[str] = None  # noqa: UP045  dotted experiment key that `values` set
    values: list[Any] = field(default_factory=list)
    named: dict[str, list[str]] = field(default_factory=dict)  # value label -> overrides (several keys at once)
    to: str = "students"  # students | all (teachers too: a data set, a teacher width)


@dataclass
class EstimateSpec:
    """GPU-hours = 3 x forward MACs (forward + backward) x images x epochs / throughput (+ teacher forwards)."""

    tmacs_per_gpu_s: float = 40.0  # sustained 10^12 MAC/s of one GPU (a stated assumption: about 25% of an A100's bf16 peak)


@dataclass
class MiniSpec:
    """``--mini``: the same study, small (tiny models, few epochs, small data) so that it runs in the tests."""

    overrides: list[str] = field(default_factory=list)  # experiment overrides applied last to every job
    datasets: dict[str, DatasetSpec] = field(default_factory=dict)  # replaces `datasets` when given
    trials: list[str] = field(default_factory=list)  # fnmatch patterns: keep only matching trials
    evaluate: Optional[list[str]] = None  # noqa: UP045  replaces `evaluate` when given
    stages: dict[str, Resources] = field(default_factory=dict)  # replaces these stages' resources


@dataclass
class SweepConfig:
    name: str = "sweep"
    study: Optional[str] = None  # noqa: UP045  attention | augmentation | fidelity | response: the report's views
    out_dir: str = "runs/sweep"
    base: Any = None  # an experiment YAML path (relative to the sweep YAML) or an inline mapping
    teacher_overrides: list[str] = field(default_factory=list)
    student_overrides: list[str] = field(default_factory=list)
    datasets: dict[str, DatasetSpec] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)
    teachers: dict[str, TeacherSpec] = field(default_factory=dict)
    grid: Optional[GridSpec] = None  # noqa: UP045
    trials: list[TrialSpec] = field(default_factory=list)
    axes: list[AxisSpec] = field(default_factory=list)
    trial_overrides: dict[str, list[str]] = field(default_factory=dict)  # trial-name pattern -> overrides
    evaluate: list[str] = field(default_factory=list)  # val_augmented | train: the evaluation stage
    stages: Stages = field(default_factory=Stages)
    estimate: EstimateSpec = field(default_factory=EstimateSpec)
    local_parallel: int = 0  # local executor: jobs at a time (0: CPUs // cpus_per_task)
    report: bool = True  # the last stage: hpckd.report.write_report of the sweep folder
    mini: Optional[MiniSpec] = None  # noqa: UP045  the override set of `--mini`


# ---------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Job:
    """One unit of work of a stage: a data set's index, a teacher, a trial (student) or a trial's evaluation."""

    stage: str  # data | teachers | logits | students | evaluation | report
    name: str
    folder: Path  # the run's out_dir (teachers, students) or the state folder (data, evaluation: the trial's)
    config: dict[str, Any]  # the full, validated experiment config (a plain container)
    mode: str  # train | distill | data | eval
    deps: tuple[str, ...]  # keys (stage/name) of the jobs it needs
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    # teachers, trials: the data stage's folder whose fingerprint.json their results must match to count as done
    # (set when the run reads exactly the data set the stage indexes; not part of the config hash)
    data_folder: Optional[Path] = field(default=None, hash=False, compare=False)  # noqa: UP045

    @property
    def key(self) -> str:
        return f"{self.stage}/{self.name}"

    @property
    def config_hash(self) -> str:
        return config_hash({"mode": self.mode, "config": self.config, "extra": self.extra})


@dataclass
class Plan:
    sweep: SweepConfig
    root: Path
    source: str  # the sweep YAML's path, or "<inline>"
    jobs: dict[str, Job]  # key -> job, in stage order
    spec_hash: str = ""  # the normalised sweep's content (spec_hash): a folder belongs to one sweep
    mini: bool = False  # planned with the sweep's `mini` override set

    def stage(self, stage: str) -> list[Job]:
        return [job for job in self.jobs.values() if job.stage == stage]

    @property
    def trials(self) -> list[Job]:
        return self.stage("students")

    @property
    def teachers(self) -> list[Job]:
        return self.stage("teachers")

    def dependents(self, key: str) -> list[Job]:
        return [job for job in self.jobs.values() if key in job.deps]


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- loading


def load_sweep(path: str | Path | None, overrides: list[str] = (), inline: dict | None = None,
               mini: bool = False) -> tuple[SweepConfig, Path]:
    """The typed sweep config from a YAML file (or ``inline``) plus dotted overrides (with its ``mini`` override set
    applied when ``mini``); and the folder relative paths of ``base`` are read from."""
    schema = OmegaConf.structured(SweepConfig)
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"sweep config not found: {file}")
        try:
            loaded = OmegaConf.load(file)
        except Exception as exc:  # yaml errors
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"{file}: not valid YAML ({first})") from exc
        where, folder = str(file), file.resolve().parent
    else:
        loaded, where, folder = OmegaConf.create(inline or {}), "<inline>", Path.cwd()
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{where}: top level must be a mapping of sweep keys")
    try:
        cfg = OmegaConf.merge(schema, loaded)
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{where}: {describe_config_error(exc, SweepConfig)}") from exc
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{where}: required value missing for {', '.join(missing)}")
    sweep = OmegaConf.to_object(cfg)
    if mini:
        apply_mini(sweep, where)
    _check_sweep(sweep, where)
    return sweep, folder


def apply_mini(s: SweepConfig, where: str) -> None:
    """Replace what the ``mini`` override set replaces (data sets, evaluations, stage resources); its experiment
    overrides and trial patterns are applied by :func:`plan_sweep`."""
    if s.mini is None:
        raise ConfigError(f"{where} has no `mini:` override set, so --mini has nothing to apply; add one "
                          f"(overrides, datasets, trials, evaluate, stages) or drop --mini")
    m = s.mini
    if m.datasets:
        s.datasets = dict(m.datasets)
    if m.evaluate is not None:
        s.evaluate = list(m.evaluate)
    for stage, resources in m.stages.items():
        if stage not in STAGE_NAMES:
            raise ConfigError(f"{where}: mini.stages: unknown stage {stage!r}; use {', '.join(STAGE_NAMES)}")
        setattr(s.stages, stage, resources)


def _check_sweep(s: SweepConfig, where: str) -> None:
    def bad(message: str) -> None:
        raise ConfigError(f"{where}: {message}")

    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", s.name):
        bad(f"name {s.name!r} may hold only letters, digits and _ . + -")
    if s.study is not None and s.study not in STUDIES:
        bad(f"study: unknown study {s.study!r}; use {', '.join(STUDIES)} (or leave it out)")
    for ds_name, ds in s.datasets.items():
        if ds.synth is not None and ds.digits is not None:
            bad(f"datasets.{ds_name}: give synth or digits, not both")
        if ds.digits is not None and (ds.digits.size < 8 or not 0 < ds.digits.val_fraction < 1):
            bad(f"datasets.{ds_name}.digits: size must be >= 8 and val_fraction in (0, 1)")
    for item in s.evaluate:
        if item not in EVALUATIONS:
            bad(f"evaluate: unknown evaluation {item!r}; use {', '.join(EVALUATIONS)}")
    for axis in s.axes:
        if axis.to not in AXIS_TARGETS:
            bad(f"axes.{axis.name}.to must be one of {', '.join(AXIS_TARGETS)}, got {axis.to!r}")
        if bool(axis.values) == bool(axis.named):
            bad(f"axes.{axis.name}: give either values (with key) or named, not both or neither")
        if axis.values and not axis.key:
            bad(f"axes.{axis.name}: values need a key (the dotted experiment key they set)")
    names = [axis.name for axis in s.axes]
    if len(set(names)) != len(names):
        bad(f"axes: names must be unique, got {names}")
    if s.grid is not None:
        g = s.grid
        # Set here, not as the schema default: OmegaConf merges mappings, so a user's {w, s} would keep n.
        g.letters = dict(g.letters) or dict(DEFAULT_LETTERS)
        if not g.roles and not g.baselines:
            bad("grid: give roles (teacher names, e.g. [T1, T2]) and/or baselines")
        for role in g.roles:
            if role not in s.teachers:
                bad(f"grid.roles: {role!r} is not a key of teachers ({', '.join(s.teachers) or 'none defined'})")
        for role, letters in g.teacher_letters.items():
            if role not in g.roles:
                bad(f"grid.teacher_letters: {role!r} is not one of grid.roles")
            _check_letters(letters, g.letters, f"grid.teacher_letters.{role}", where)
        _check_letters(g.student_letters, g.letters, "grid.student_letters", where)
        _check_letters(g.baselines, g.letters, "grid.baselines", where)
    for trial in s.trials:
        for t in trial.teachers:
            teacher_ref(s, t, f"{where}: trials.{trial.name}.teachers")
    for stage in STAGE_NAMES:
        r: Resources = getattr(s.stages, stage)
        if min(r.nodes, r.cpus_per_task, r.time_min, r.max_array_size) < 1 or r.gpus_per_node < 0:
            bad(f"stages.{stage}: nodes, cpus_per_task, time_min and max_array_size must be >= 1")
    if s.local_parallel < 0:
        bad("local_parallel must be >= 0")
    if s.estimate.tmacs_per_gpu_s <= 0:
        bad("estimate.tmacs_per_gpu_s must be > 0")


def teacher_ref(s: SweepConfig, text: str, where: str = "sweep") -> tuple[str, Optional[str]]:  # noqa: UP045
    """A trial's teacher: a key of ``teachers`` (as defined), or a key plus a grid letter (``T1w``: T1 with the
    grid's ``w`` policy, the same teacher the grid trains)."""
    if text in s.teachers:
        return text, None
    if s.grid is not None and text[:-1] in s.teachers and text[-1:] in s.grid.letters:
        return text[:-1], text[-1]
    raise ConfigError(f"{where}: {text!r} is not a key of teachers ({', '.join(s.teachers) or 'none defined'})"
                      + (" nor a key plus a grid letter" if s.grid is not None else ""))


def _check_letters(letters: list[str], known: dict[str, str], what: str, where: str) -> None:
    for letter in letters:
        if letter not in known:
            raise ConfigError(f"{where}: {what}: unknown letter {letter!r}; grid.letters defines {', '.join(known)}")


# ---------------------------------------------------------------------------------------------- expansion


@dataclass(frozen=True)
class _Cell:
    name: str
    teachers: tuple[tuple[str, Optional[str]], ...]  # noqa: UP045  (teacher key, grid letter or None)
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class _Variation:
    parts: tuple[str, ...]  # name suffix parts
    teacher_parts: tuple[str, ...]  # the parts that change teachers
    dataset: str
    students: tuple[str, ...]
    teachers: tuple[str, ...]
    seed: Optional[int]  # noqa: UP045


def cells(s: SweepConfig) -> list[_Cell]:
    """The grid's trials, its baselines and the explicit trials, in that order."""
    out: list[_Cell] = []
    g = s.grid
    if g is not None:
        letters = list(g.letters)
        per_role = [g.teacher_letters.get(role) or letters for role in g.roles]
        students = g.student_letters or letters
        if g.roles:
            for assignment in itertools.product(*per_role, students):
                *teacher_letters, student = assignment
                name = "".join(f"{r}{x}" for r, x in zip(g.roles, teacher_letters)) + f"S{student}"
                out.append(_Cell(name, tuple(zip(g.roles, teacher_letters)), (f"aug={g.letters[student]}",)))
        for letter in g.baselines:
            out.append(_Cell(f"S{letter}", (), (f"aug={g.letters[letter]}",)))
    for trial in s.trials:
        out.append(_Cell(trial.name, tuple(teacher_ref(s, t) for t in trial.teachers), tuple(trial.overrides)))
    names = [c.name for c in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"sweep: trial name(s) {', '.join(duplicates)} given more than once")
    if not out:
        raise ConfigError("sweep: no trials (give grid and/or trials)")
    return out


def variations(s: SweepConfig) -> list[_Variation]:
    """datasets x seeds x axes, each with its name parts and overrides."""
    datasets = list(s.datasets.items()) or [("default", DatasetSpec())]
    seeds: list[Optional[int]] = list(s.seeds) or [None]  # noqa: UP045
    axis_values = [_axis_values(axis) for axis in s.axes]
    out = []
    for (ds_name, ds), seed, *picks in itertools.product(datasets, seeds, *axis_values):
        parts, teacher_parts = [], []
        students, teachers = list(ds.overrides), list(ds.overrides)
        if len(datasets) > 1:
            parts.append(ds_name)
            teacher_parts.append(ds_name)
        if seed is not None:
            students.append(f"seed={seed}")
            if len(seeds) > 1:
                parts.append(f"seed{seed}")
                teacher_parts.append(f"seed{seed}")
        for axis, (label, overrides) in zip(s.axes, picks):
            parts.append(f"{axis.name}{label}")
            students.extend(overrides)
            if axis.to == "all":
                teachers.extend(overrides)
                teacher_parts.append(f"{axis.name}{label}")
        out.append(_Variation(tuple(parts), tuple(teacher_parts), ds_name, tuple(students), tuple(teachers), seed))
    return out


def _axis_values(axis: AxisSpec) -> list[tuple[str, list[str]]]:
    if axis.named:
        return [(_label(label), list(overrides)) for label, overrides in axis.named.items()]
    return [(_label(value), [f"{axis.key}={_yaml_value(value)}"]) for value in axis.values]


def _label(value: Any) -> str:
    """A value as it appears in a trial name (file-name safe, stable)."""
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "x"


def _yaml_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)


def plan_sweep(path: str | Path | None, overrides: list[str] = (), inline: dict | None = None,
               out_dir: str | Path | None = None, experiment_overrides: list[str] = (), mini: bool = False) -> Plan:
    """Load, expand and validate a sweep; every job's experiment config is checked with ``load_experiment``.

    ``overrides`` are dotted sweep keys (``out_dir=...``); ``experiment_overrides`` go on every teacher's and
    trial's experiment config after the sweep's own (e.g. ``optim.epochs=2`` for a smoke run). ``mini`` applies the
    sweep's ``mini`` override set (its experiment overrides last of all, its data sets, evaluations and stage
    resources instead of the sweep's, only the trials matching its patterns and the teachers those use) and writes
    to ``<out_dir>-mini`` unless ``out_dir`` is given."""
    sweep, folder = load_sweep(path, overrides, inline, mini=mini)
    if out_dir is not None:
        sweep.out_dir = str(out_dir)
    elif mini:
        sweep.out_dir = str(sweep.out_dir).rstrip("/") + "-mini"
    root = Path(sweep.out_dir).resolve()
    base = _base_experiment(sweep.base, folder)
    jobs: dict[str, Job] = {}
    source = str(Path(path).resolve()) if path is not None else "<inline>"
    last = [*experiment_overrides, *(sweep.mini.overrides if mini else [])]
    keep = list(sweep.mini.trials) if mini else []

    def expand(items: list[str]) -> list[str]:
        return [item.replace(SWEEP_DIR_TOKEN, str(root)) for item in items]

    checked = _Validator(base)

    def validated(what: str, items: list[str], teachers: list[str] = (), **identity: str) -> dict[str, Any]:
        try:
            return checked(expand(items), list(teachers), identity)
        except UserError as exc:
            raise ConfigError(f"sweep {sweep.name}: {what}: {exc}") from exc

    vs = variations(sweep)
    all_names = [("_".join((cell.name, *v.parts)), cell, v) for cell in cells(sweep) for v in vs]
    for pattern in sweep.trial_overrides:  # checked against the whole grid: --mini may keep none of its trials
        if not any(fnmatch.fnmatchcase(name, pattern) for name, _, _ in all_names):
            raise ConfigError(f"sweep {sweep.name}: trial_overrides: {pattern!r} matches no trial")
    for pattern in keep:
        if not any(fnmatch.fnmatchcase(name, pattern) for name, _, _ in all_names):
            raise ConfigError(f"sweep {sweep.name}: mini.trials: {pattern!r} matches no trial")
    kept = [item for item in all_names if not keep or any(fnmatch.fnmatchcase(item[0], p) for p in keep)]

    data_keys: dict[str, str] = {}
    for ds_name in dict.fromkeys(v.dataset for _, _, v in kept):
        ds = sweep.datasets.get(ds_name, DatasetSpec())
        cfg = validated(f"data set {ds_name}", [*ds.overrides, *last])
        extra = {"synth": dataclasses.asdict(ds.synth) if ds.synth else None}
        if ds.digits is not None:  # only when set: a sweep without it keeps its data jobs' config hashes
            extra["digits"] = dataclasses.asdict(ds.digits)
        # datasets/<name> holds the stage's state; the images live at data.root (e.g. {sweep}/data)
        jobs[f"data/{ds_name}"] = Job("data", ds_name, root / "datasets" / ds_name, cfg, "data", (), extra)
        data_keys[ds_name] = f"data/{ds_name}"

    def data_folder(cfg: dict[str, Any], data_key: str) -> Optional[Path]:  # noqa: UP045
        data_job = jobs[data_key]
        return data_job.folder if cfg["data"] == data_job.config["data"] else None

    auto_store = str(root / "logits" / AUTO_STORE)
    teacher_by_config: dict[str, str] = {}
    stores: dict[str, str] = {}  # store identity -> logits job key
    for name, cell, v in kept:
        teacher_keys = []
        for teacher, letter in cell.teachers:
            tname = "_".join((teacher + (letter or ""), *v.teacher_parts))
            spec = sweep.teachers[teacher]
            items = [*sweep.teacher_overrides, *v.teachers, *spec.overrides]
            if letter is not None:
                items.append(f"aug={sweep.grid.letters[letter]}")
            if v.seed is not None:
                items.append(f"seed={v.seed + spec.seed_offset}")
            items.extend(last)
            identity = config_hash(items)
            if identity not in teacher_by_config:
                tcfg = validated(f"teacher {tname}", items)
                key = config_hash({k: val for k, val in tcfg.items() if k not in ("out_dir", "name")})
                same = next((k for k, job in jobs.items() if job.stage == "teachers"
                             and job.extra["identity"] == key), None)
                if same is None:
                    if f"teachers/{tname}" in jobs:  # same name, different config: keep both apart
                        tname = f"{tname}-{key[:6]}"
                    tfolder = root / "teachers" / tname
                    tcfg = validated(f"teacher {tname}", items, out_dir=str(tfolder), name=tname)
                    jobs[f"teachers/{tname}"] = Job("teachers", tname, tfolder, tcfg, "train",
                                                    (data_keys[v.dataset],), {"identity": key},
                                                    data_folder(tcfg, data_keys[v.dataset]))
                    same = f"teachers/{tname}"
                teacher_by_config[identity] = same
            teacher_keys.append(teacher_by_config[identity])
        folder_t = root / "trials" / name
        # A student that reads teacher logits from a store (serving.mode=cached) and names none gets the sweep's:
        # the logits stage writes it once for every trial with the same teachers, data and views.
        items = [f"serving.store={auto_store}", *sweep.student_overrides, *v.students, *cell.overrides]
        for pattern, extra_items in sweep.trial_overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                items.extend(extra_items)
        items.extend(last)
        cfg = validated(f"trial {name}", items, [str(jobs[k].folder / "last.pt") for k in teacher_keys],
                        out_dir=str(folder_t), name=name)
        deps = [data_keys[v.dataset], *teacher_keys]
        if cfg["serving"]["store"] == auto_store:
            if cfg["serving"]["mode"] != "cached" or not cfg["teachers"]:
                cfg["serving"]["store"] = None  # inline teachers (or none): no store
            else:
                identity = store_identity(cfg)
                if identity not in stores:
                    sname = f"{'+'.join(k.split('/', 1)[1] for k in teacher_keys)}_{identity[:8]}"
                    sfolder = root / "logits" / sname
                    scfg = copy.deepcopy(cfg)
                    scfg.update(out_dir=str(sfolder), name=sname)
                    scfg["serving"]["store"] = str(sfolder / "store")
                    jobs[f"logits/{sname}"] = Job("logits", sname, sfolder, scfg, "logits",
                                                  (data_keys[v.dataset], *teacher_keys),
                                                  {"store": str(sfolder / "store"), "epochs": cfg["optim"]["epochs"],
                                                   "teachers": [jobs[k].config_hash for k in teacher_keys]},
                                                  data_folder(scfg, data_keys[v.dataset]))
                    stores[identity] = f"logits/{sname}"
                cfg["serving"]["store"] = jobs[stores[identity]].extra["store"]
                deps.append(stores[identity])
        mode = "distill" if cfg["teachers"] else "train"
        # A trial whose teacher (or store) would be trained (written) differently is a different trial: their config
        # hashes are part of its own, so it runs again (the checkpoint paths in its config alone stay the same).
        needs = {"needs": [jobs[d].config_hash for d in deps[1:]]} if deps[1:] else {}
        jobs[f"students/{name}"] = Job("students", name, folder_t, cfg, mode, tuple(deps), needs,
                                       data_folder=data_folder(cfg, data_keys[v.dataset]))
    trials = [job for job in jobs.values() if job.stage == "students"]
    if sweep.evaluate:
        for trial in trials:
            jobs[f"evaluation/{trial.name}"] = Job("evaluation", trial.name, trial.folder, trial.config, "eval",
                                                   (trial.key,), {"evaluate": list(sweep.evaluate)})
    if sweep.report:
        # After everything that can finish (SLURM: afterany), so a sweep with failed trials still gets its report.
        deps = tuple(key for key, job in jobs.items() if job.stage in ("students", "evaluation"))
        jobs["report/report"] = Job("report", "report", root, {}, "report", deps,
                                    {"inputs": config_hash([jobs[d].config_hash for d in deps])})
    order = {stage: i for i, stage in enumerate(STAGE_NAMES)}
    ordered = dict(sorted(jobs.items(), key=lambda item: order[item[1].stage]))
    return Plan(sweep, root, source, ordered, spec_hash(sweep, base, experiment_overrides, mini), mini)


AUTO_STORE = "_sweep_store_"  # the placeholder serving.store of a student the sweep gives a logit store


def store_identity(cfg: dict[str, Any]) -> str:
    """What a trial's logit store depends on, from its config (the teachers, the data, every view, the batch ops,
    the seed, the micro-batch, precision, epochs); trials with equal identities read one store. It leaves out
    only what cannot change the stored teacher outputs (the student model, its loss, names, optimiser settings
    other than the accumulation steps and the epochs)."""
    kept = {k: v for k, v in cfg.items() if k not in ("model", "loss", "out_dir", "name", "optim", "serving")}
    kept["optim"] = {k: cfg["optim"].get(k) for k in ("accum_steps", "epochs")}
    kept["serving"] = {k: v for k, v in cfg["serving"].items() if k != "store"}
    return config_hash(kept)


def spec_hash(sweep: SweepConfig, base: dict | None, experiment_overrides: Sequence[str], mini: bool) -> str:
    """The content of a sweep, normalised: what it trains (base, data sets, teachers, grid, trials, axes,
    overrides, evaluations, the mini set when applied). Left out: where it writes and how jobs are placed (out_dir,
    stage resources, local_parallel, the estimate) and the report's study tag, which may change between runs of
    one sweep folder."""
    spec = dataclasses.asdict(sweep)
    for key in ("out_dir", "stages", "estimate", "local_parallel", "study", "base", "mini", "report"):
        spec.pop(key, None)
    spec.update(base=base, experiment_overrides=list(experiment_overrides),
                mini=({k: v for k, v in dataclasses.asdict(sweep.mini).items() if k != "stages"} if mini else None))
    return config_hash(spec)


class _Validator:
    """``load_experiment`` for many configs that differ from one base by a few overrides, in milliseconds each.

    Configs that differ only in ``out_dir``, ``name`` and the teachers' checkpoint paths (plain strings that no
    section check reads) are validated once: the others are copies with those fields set. The rest merge their
    overrides into the base loaded once (rather than rebuilding the schema per trial) and run every section's
    check (:func:`validate_experiment`); whatever fails there is loaded again the slow way, which words the error
    exactly as ``hpckd train`` would."""

    def __init__(self, base: dict | None) -> None:
        self.base = base
        self.loaded = load_experiment(None, [], base=base)
        self.cache: dict[tuple, dict[str, Any]] = {}

    def __call__(self, items: list[str], teachers: list[str], identity: dict[str, str]) -> dict[str, Any]:
        key = (*items, len(teachers))
        if key not in self.cache:
            placeholders = [f"/teacher-{i}/last.pt" for i in range(len(teachers))]
            full = [*items, *([f"teachers=[{','.join(f'{{checkpoint: {p}}}' for p in placeholders)}]"]
                              if teachers else [])]
            self.cache[key] = self._load(full)
        cfg = copy.deepcopy(self.cache[key])
        for field_name, value in identity.items():
            cfg[field_name] = value
        for entry, path in zip(cfg["teachers"], teachers):
            entry["checkpoint"] = path
        return cfg

    def _load(self, items: list[str]) -> dict[str, Any]:
        try:
            dotted = OmegaConf.from_dotlist(items)
            check_renamed_keys(dotted, "sweep")
            cfg = validate_experiment(OmegaConf.merge(self.loaded, dotted))
        except Exception:  # noqa: BLE001  any failure: the reference path gives the one-line error
            cfg = load_experiment(None, items, base=self.base)
        return OmegaConf.to_container(cfg, resolve=True)


def _base_experiment(base: Any, folder: Path) -> dict | None:
    """The base experiment as a plain mapping (read from its YAML when ``base`` is a path)."""
    if base is None:
        return None
    if isinstance(base, str):
        path = Path(base) if Path(base).is_absolute() else folder / base
        if not path.is_file():
            raise ConfigError(f"sweep base: experiment config not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"{path}: not valid YAML ({first})") from exc
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path}: top level must be a mapping of config keys")
        return OmegaConf.to_container(loaded)
    if isinstance(base, dict):
        return base
    raise ConfigError(f"sweep base must be an experiment YAML path or a mapping, got {type(base).__name__}")
