"""One line instead of a traceback -- and the traceback, with its cause, when asked for (HPCKD_DEBUG=1 or
--traceback). Covers usage errors, errors raised inside DataLoader workers and inside the ranks of a 2-process run
(one line for all ranks, not one per rank plus torchrun's report), DALI decode errors, a stale index cache and
skipped images."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from hpckd.config import IMAGENET_MEAN, IMAGENET_STD
from hpckd.data.aug import train_policy
from hpckd.data.dali import DaliLoader
from hpckd.data.index import build_index
from hpckd.data.sharding import ShardSpec
from hpckd.data.sources import FileSource
from hpckd.data.torch_loader import TorchLoader
from hpckd.errors import DataError
from tests.helpers import assert_one_line_error, make_undecodable, run_hpckd, tiny_run_args


@pytest.fixture
def data_copy(tmp_path, tiny_root) -> Path:
    """A private copy of the tiny set, without the index caches other tests wrote next to it."""
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root, ignore=shutil.ignore_patterns(".hpckd-index-*"))
    return root


# ------------------------------------------------------------------------------------------- usage errors


def test_eval_without_arguments_says_the_checkpoint_is_required():
    line = assert_one_line_error(run_hpckd("eval"), "the following arguments are required: checkpoint")
    assert "overrides" not in line
    assert run_hpckd("eval").returncode == 2


@pytest.mark.parametrize("value", ["0", "-32"])
def test_models_image_size_must_be_positive(value):
    proc = run_hpckd("models", "resnet8", f"--image-size={value}")
    assert_one_line_error(proc, "--image-size", f"must be >= 1, got {value}")
    assert proc.returncode == 2


def test_models_image_size_too_small_for_the_network():
    proc = run_hpckd("models", "resnet8", "--image-size", "2")
    assert_one_line_error(proc, "--image-size 2 is too small for these models")
    assert proc.returncode == 2


def test_a_malformed_override_value_is_one_line():
    proc = run_hpckd("train", "optim.lr=[1")
    assert_one_line_error(proc, "optim.lr")
    assert proc.returncode == 2


# ------------------------------------------------------------------------------- errors keep their cause


@pytest.mark.parametrize("how", [{"args": ("--traceback",), "env": {}}, {"args": (), "env": {"HPCKD_DEBUG": "1"}}],
                         ids=["--traceback", "HPCKD_DEBUG=1"])
def test_debug_prints_the_chained_traceback(how):
    args = [*how["args"], "data", "synth", "--out", "/tmp/never-written", "--size", "big"]
    proc = run_hpckd(*args, env=how["env"])
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr
    # The cause (int("big") failing) is chained into the user error, not cut off with `from None`.
    assert "ValueError: invalid literal for int()" in proc.stderr
    assert "The above exception was the direct cause of the following exception" in proc.stderr
    assert proc.stderr.rstrip().endswith("hpckd.errors.DataError: --size 'big': expected HxW such as 32x32 or 375x500")
    assert_one_line_error(run_hpckd("data", "synth", "--out", "/tmp/never-written", "--size", "big"), "--size 'big'")


# --------------------------------------------------------------------------------------------- data errors


def read_one_epoch(loader_class, index) -> None:
    """One training epoch of the weak CIFAR policy over ``index`` (batch 8, one thread, CPU)."""
    loader = loader_class(index.files, index.labels, {"student": train_policy("cifar", "weak", 32)}, batch_size=8,
                          shard=ShardSpec(), train=True, seed=0, num_threads=1, device=torch.device("cpu"),
                          mean=IMAGENET_MEAN, std=IMAGENET_STD)
    list(loader)


def test_decode_error_in_a_dataloader_worker_is_one_line_naming_the_file(data_copy):
    index = build_index(data_copy / "train", cache="off")
    victim = Path(index.files[3])
    make_undecodable(victim)
    with pytest.raises(DataError) as raised:
        read_one_epoch(TorchLoader, index)
    message = str(raised.value)
    assert message.startswith(f"cannot decode {victim} (") and "\n" not in message, message
    assert "Traceback" not in message and "worker" not in message
    assert "Caught DataError in DataLoader worker process 0" in str(raised.value.__cause__)  # kept as the cause


def test_dali_decode_error_names_the_file_and_keeps_the_dali_error_as_cause(data_copy):
    index = build_index(data_copy / "train", cache="off")
    victim = Path(index.files[5])
    make_undecodable(victim)
    with pytest.raises(DataError) as raised:
        read_one_epoch(DaliLoader, index)
    assert str(raised.value).startswith(f"cannot decode {victim} (fix or remove it")
    assert isinstance(raised.value.__cause__, RuntimeError) and "decoders.image" in str(raised.value.__cause__)


def test_dali_read_error_is_not_called_a_decode_error(data_copy):
    index = build_index(data_copy / "train", cache="off")
    gone = Path(index.files[2])
    gone.unlink()  # removed after indexing: a read failure, not a decode failure
    loader = DaliLoader(index.files, index.labels, {"student": train_policy("cifar", "weak", 32)}, batch_size=8,
                        shard=ShardSpec(), train=True, seed=0, num_threads=1, device=torch.device("cpu"),
                        mean=IMAGENET_MEAN, std=IMAGENET_STD)
    with pytest.raises(DataError, match=f"^cannot read {gone} \\(No such file or directory\\)$"):
        list(loader)


class FirstReadFails(FileSource):
    """The real image files, except that the first read of one sample fails the way a broken storage layer might
    (not an OSError, not a decode problem): an error hpckd must not pass off as the user's bad image."""

    def __init__(self, files: list[str], failing: int) -> None:
        super().__init__(files)
        self.failing, self.failed = failing, False

    def read(self, i: int):
        if i == self.failing and not self.failed:
            self.failed = True
            raise RuntimeError("storage layer: request 17 aborted")
        return super().read(i)


def test_a_dali_error_that_is_no_decode_failure_keeps_its_message(data_copy):
    index = build_index(data_copy / "train", cache="off")
    loader = DaliLoader(FirstReadFails(index.files, failing=4), index.labels,
                        {"student": train_policy("cifar", "weak", 32)}, batch_size=8, shard=ShardSpec(), train=True,
                        seed=0, num_threads=1, device=torch.device("cpu"), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    with pytest.raises(RuntimeError, match="^storage layer: request 17 aborted$") as raised:
        list(loader)
    assert not isinstance(raised.value, DataError)  # not relabelled "DALI failed while reading data" or "cannot decode"


@pytest.mark.slow
def test_an_image_changed_after_indexing_hints_at_refreshing_the_cache(data_copy, tmp_path):
    assert run_hpckd("train", *tiny_run_args(data_copy, tmp_path / "first")).returncode == 0  # indexes and caches
    cache = data_copy / ".hpckd-index-train.json.gz"
    assert cache.is_file()
    victim = data_copy / "train" / "class_001" / "00003.jpg"
    make_undecodable(victim)  # rewritten in place: the folder's mtime, which the cache checks, stays
    proc = run_hpckd("train", *tiny_run_args(data_copy, tmp_path / "second"))
    assert_one_line_error(proc, f"cannot decode {victim}", f"{victim} changed after it was indexed (cached in {cache})",
                          "deleting that file or setting data.index_cache=off")


def test_skipped_images_are_one_hpckd_warning_line(data_copy, tmp_path):
    (data_copy / "train" / "class_000" / "00002.jpg").write_bytes(b"not a jpeg")
    proc = run_hpckd("data", "shard", "--src", str(data_copy / "train"), "--out", str(tmp_path / "shards"),
                     "--on-bad-image", "skip", env={"PYTHONWARNINGS": "default"})
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hpckd: warning: "), proc.stderr
    assert "skipped 1 bad image(s)" in lines[0] and "00002.jpg" in lines[0] and "UserWarning" not in proc.stderr


# --------------------------------------------------------------------------------- errors inside the ranks


@pytest.mark.slow
@pytest.mark.dist
def test_a_decode_error_in_one_rank_of_two_is_one_line_and_exit_2(data_copy, tmp_path):
    """Only the rank that reads the file meets the error; the other one then loses its peer. The user sees the
    first rank's line, once: no second rank's error, no torchrun failure report, no DataLoader traceback."""
    victim = data_copy / "train" / "class_001" / "00003.jpg"
    make_undecodable(victim)  # passes the index-time check that the wrapper runs before starting the ranks
    proc = run_hpckd("train", *tiny_run_args(data_copy, tmp_path / "run", "dist.nproc_per_node=2"), timeout=300)
    line = assert_one_line_error(proc, f"cannot decode {victim}")
    assert proc.returncode == 2
    assert "torch.distributed" not in proc.stderr and "ChildFailedError" not in proc.stderr
    assert not (tmp_path / "run" / "results.json").exists()
    assert line.count("cannot decode") == 1
