"""Inline teacher serving: frozen teachers, exact reload from checkpoints, per-teacher views, and teacher_parallel
on two real gloo ranks returning exactly what plain mode returns."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hpckd.data.batch import Batch
from hpckd.errors import CheckpointError, ConfigError
from hpckd.models import create
from hpckd.teachers import ServingConfig, TeacherSet, TeacherSource
from hpckd.teachers.serving import check_serving
from hpckd.checkpoint import save_checkpoint

CLASSES = 6


def _teacher(seed: int, arch: str = "resnet8", **kwargs) -> nn.Module:
    """A teacher with non-trivial BatchNorm statistics, so that eval vs train mode makes a visible difference."""
    torch.manual_seed(seed)
    model = create(arch, CLASSES, **kwargs)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def _batch(n: int, seed: int, teacher_views: tuple[int, ...] = (1,)) -> Batch:
    g = torch.Generator().manual_seed(seed)
    views = {"student": torch.randn(n, 3, 32, 32, generator=g)}
    for k in teacher_views:
        views[f"teacher{k}"] = torch.randn(n, 3, 32, 32, generator=g)
    return Batch(views=views, labels=torch.randint(0, CLASSES, (n,), generator=g), index=torch.arange(n))


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Independent reference: a copy of the teacher in eval mode, plain forward under no_grad."""
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        return ref(x)


def _save(path: Path, model: nn.Module, arch: str, **extra) -> Path:
    save_checkpoint(path, {"model": model.state_dict(), "arch": arch, "num_classes": CLASSES, "config": {},
                           "meta": {"aug": "strong", "val_acc": 0.5}, **extra})
    return path


# ------------------------------------------------------------------------------------------------ one process
def test_teachers_never_carry_gradients_nor_change_batchnorm_statistics():
    models = [_teacher(0), _teacher(1)]
    buffers_before = [{k: v.clone() for k, v in m.named_buffers()} for m in models]
    batch = _batch(4, seed=0)
    expected = [_reference(models[0], batch.view("teacher0")), _reference(models[1], batch.view("teacher1"))]
    teachers = TeacherSet.from_models(models, "cpu")
    models[1].train()  # someone flips a teacher to training mode: serving must still use eval statistics
    got = teachers(batch)
    for m, before in zip(models, buffers_before):
        assert all(torch.equal(before[k], v) for k, v in m.named_buffers())  # incl. num_batches_tracked
        assert not any(p.requires_grad for p in m.parameters())
    for g, e in zip(got, expected):
        assert g.dtype == torch.float32 and not g.requires_grad and g.shape == (4, CLASSES)
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    # the logits are ordinary tensors: a student loss built on them back-propagates to the student only
    student = torch.randn(4, CLASSES, requires_grad=True)
    loss = sum(-(torch.softmax(t / 4, -1) * torch.log_softmax(student / 4, -1)).sum() for t in got)
    loss.backward()
    assert student.grad is not None and all(p.grad is None for m in models for p in m.parameters())


def test_each_teacher_reads_its_own_view_or_the_students():
    models = [_teacher(2), _teacher(3), _teacher(4)]
    batch = _batch(3, seed=1, teacher_views=(1,))
    got = TeacherSet.from_models(models, "cpu")(batch)
    torch.testing.assert_close(got[0], _reference(models[0], batch.views["student"]), rtol=0, atol=0)
    torch.testing.assert_close(got[1], _reference(models[1], batch.views["teacher1"]), rtol=0, atol=0)
    torch.testing.assert_close(got[2], _reference(models[2], batch.views["student"]), rtol=0, atol=0)
    assert not torch.allclose(got[1], _reference(models[1], batch.views["student"]))


def test_from_checkpoints_reloads_exactly_and_builds_arch_kwargs(tmp_path):
    """A teacher checkpoint carries arch and class count; LayerNorm pre-activation teachers (fidelity study Sec. 5.2)
    need builder keywords, read from ``arch_kwargs`` or ``config.model.kwargs``."""
    bn = _teacher(5, "resnet20")
    ln = _teacher(6, "preresnet20", norm="ln")
    wide = _teacher(7, "wrn_16_2")
    paths = [
        _save(tmp_path / "bn.pt", bn, "resnet20"),
        _save(tmp_path / "ln.pt", ln, "preresnet20", arch_kwargs={"norm": "ln"}),
        tmp_path / "wide.pt",
    ]
    save_checkpoint(paths[2], {"model": wide.state_dict(), "arch": "wrn_16_2", "num_classes": CLASSES,
                               "config": {"model": {"arch": "wrn_16_2", "kwargs": {"drop_rate": 0.3}}}, "meta": {}})
    teachers = TeacherSet.from_checkpoints(paths, "cpu")
    assert isinstance(teachers, TeacherSource) and len(teachers) == 3 and teachers.num_classes == CLASSES
    assert teachers.metas[0] == {"aug": "strong", "val_acc": 0.5}
    assert teachers.teachers[2].model.layers[0].drop_rate == 0.3
    batch = _batch(5, seed=2, teacher_views=())
    got = teachers(batch)
    for g, model in zip(got, (bn, ln, wide)):
        torch.testing.assert_close(g, _reference(model, batch.views["student"]), rtol=0, atol=0)
    teachers.check_num_classes(CLASSES)
    with pytest.raises(ConfigError, match=r"teacher 0 \(.*bn.pt, resnet20\) predicts 6 classes but the dataset has 10"):
        teachers.check_num_classes(10)


def test_bad_teacher_files_are_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        TeacherSet.from_checkpoints([tmp_path / "missing.pt"], "cpu")
    _save(tmp_path / "r8.pt", _teacher(0), "resnet20")  # resnet8 weights labelled resnet20
    with pytest.raises(CheckpointError, match=r"teacher 0 checkpoint .*r8.pt does not fit resnet20"):
        TeacherSet.from_checkpoints([tmp_path / "r8.pt"], "cpu")
    save_checkpoint(tmp_path / "c3.pt", {"model": create("resnet8", 3).state_dict(), "arch": "resnet8",
                                         "num_classes": 3, "config": {}, "meta": {}})
    _save(tmp_path / "c6.pt", _teacher(1), "resnet8")
    with pytest.raises(CheckpointError, match="same classes"):
        TeacherSet.from_checkpoints([tmp_path / "c6.pt", tmp_path / "c3.pt"], "cpu")


def test_serving_config_validates_and_parallel_falls_back_without_a_process_group():
    with pytest.raises(ConfigError, match="all_to_all, all_gather"):
        check_serving(ServingConfig(exchange="broadcast"))
    assert not dist.is_initialized()
    teachers = TeacherSet.from_models([_teacher(0), _teacher(1)], "cpu", ServingConfig(teacher_parallel=True))
    assert not teachers.parallel and teachers.owned == [0, 1]
    assert len(teachers(_batch(2, seed=3))) == 2


def test_compiled_teachers_serve_the_same_logits():
    """The compile option wraps each teacher with torch.compile (the eager backend keeps this test fast on CPU)."""
    model = _teacher(8)
    batch = _batch(3, seed=4, teacher_views=())
    teachers = TeacherSet.from_models([model], "cpu", ServingConfig(compile=True, compile_backend="eager"))
    assert teachers._runners[0] is not model and getattr(teachers._runners[0], "_orig_mod", None) is model
    model.train()
    (got,) = teachers(batch)
    assert not model.training  # put back in eval mode through the compiled wrapper
    torch.testing.assert_close(got, _reference(model, batch.views["student"]), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ two ranks
WORLD = 2
SIZES = (5, 3)  # uneven local batches, as a last batch can be


def _parallel_worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)
    try:
        paths = [f"{tmp}/t{k}.pt" for k in range(3)]
        batch = _batch(SIZES[rank], seed=10 + rank, teacher_views=(1,))
        out: dict = {"plain": TeacherSet.from_checkpoints(paths, "cpu")(batch)}
        for exchange in ("all_to_all", "all_gather"):
            cfg = ServingConfig(teacher_parallel=True, exchange=exchange)
            teachers = TeacherSet.from_checkpoints(paths, "cpu", cfg)
            out[exchange] = [teachers(batch), teachers(batch)]  # a second call reuses the same set
            out[f"{exchange}_owned"] = teachers.owned
            out[f"{exchange}_held"] = [t.model is not None for t in teachers.teachers]
        # one teacher over two ranks: rank 1 runs nothing but still takes part in every collective
        single = TeacherSet.from_checkpoints(paths[:1], "cpu", ServingConfig(teacher_parallel=True))
        out["single"] = single(batch)
        out["single_plain"] = TeacherSet.from_checkpoints(paths[:1], "cpu")(batch)
        torch.save(out, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_teacher_parallel_equals_plain_mode_on_two_gloo_ranks(tmp_path):
    models = [_teacher(20), _teacher(21), _teacher(22)]
    for k, m in enumerate(models):
        _save(tmp_path / f"t{k}.pt", m, "resnet8")
    mp.spawn(_parallel_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        batch = _batch(SIZES[rank], seed=10 + rank, teacher_views=(1,))
        # plain mode is right: it matches each teacher run directly on this rank's own view
        for k, (got, model) in enumerate(zip(out["plain"], models)):
            assert got.shape == (SIZES[rank], CLASSES)
            torch.testing.assert_close(got, _reference(model, batch.view(f"teacher{k}")), rtol=1e-5, atol=1e-6)
        # and teacher_parallel returns exactly the same bits, for both exchanges and repeated calls
        for exchange in ("all_to_all", "all_gather"):
            assert out[f"{exchange}_owned"] == ([0, 2] if rank == 0 else [1])
            assert out[f"{exchange}_held"] == ([True, False, True] if rank == 0 else [False, True, False])
            for call in out[exchange]:
                assert len(call) == 3
                for got, plain in zip(call, out["plain"]):
                    assert torch.equal(got, plain), (rank, exchange)
        assert torch.equal(out["single"][0], out["single_plain"][0])
