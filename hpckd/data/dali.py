"""NVIDIA DALI loaders: samples and their augmentation parameters fed by us, decoding and augmentation by DALI.

The loader decides the order (:mod:`hpckd.data.sharding`) and draws every random choice of every view up front
(:mod:`hpckd.data.params`); one ``fn.external_source`` feeds, per batch, the encoded images (or raw pixels), their
sample ids and those parameters. DALI decodes (``device='mixed'``: nvJPEG on the GPU; CPU otherwise) and applies
each view's policy with the given parameters, on the GPU when there is one:

=============  ===============================================================================================
policy part    DALI op fed with the recorded parameter
=============  ===============================================================================================
rrc            ``fn.resize`` with ``roi_start``/``roi_end`` = the crop window (crop + resize in one pass)
pad_crop       ``fn.resize`` to size, ``fn.slice`` at the offset with zero padding out of bounds
flip           ``fn.flip(horizontal=flag)``, ``fn.flip(vertical=flag)``
rotate         ``fn.rotate(angle=...)``
jitter         ``fn.brightness_contrast`` about the grey mean (PIL's contrast), ``fn.saturation``
grayscale      ``fn.saturation`` with factor 0 (grey) or 1
hue            torchvision's RGB -> HSV -> RGB in DALI arithmetic (``fn.hue`` rotates in YIQ: not the same op)
auto           ``nvidia.dali.auto_aug.core.select`` over the suite with the recorded op id, magnitude bin and sign
cutout         ``fn.erase(anchor=...)``
=============  ===============================================================================================

Why not DALI's own random ops: they keep per-pipeline RNG state that advances per batch and cannot be queried
(no op reports the window ``fn.random_resized_crop`` chose, the stock ``rand_augment`` hides its op choice), so
neither exact resume nor replay by a logit store would be possible. With parameters as inputs, a sample's view is
a pure function of (seed, epoch, view, sample id), the same parameters the torch path draws; the pipeline is
built once and serves every epoch, and ``batch.aug[view]`` carries the parameters.

What DALI cannot do here: it cannot *report* parameters of its built-in random ops (hence this design), and the
colour-jitter order is fixed (brightness, contrast, saturation) where torchvision draws a random order. Every
parameter above is *accepted* as an input, so nothing needs the torch fallback; :mod:`hpckd.data.render_torch`
renders the same parameters on the device for replay without DALI (same meaning, not bit-identical pixels).

Cost of this design: files are read, image headers parsed (for the crop windows) and parameters drawn in Python,
about 0.1-0.2 ms per 375x500 JPEG on the 2-core development machine, mostly the file read (10-20 % of one core per
1,000 images/s). That work runs *ahead*, on one background thread per pass (:class:`ReadAhead`, threads named
``hpckd-read-ahead_*``): while DALI decodes and the training loop runs, it prepares the next ``read_ahead`` batches
(default 3: file bytes, ids, parameter arrays), and the ``fn.external_source`` callback, on the training thread
when DALI schedules a batch, only takes the next ready one. File reads release the GIL, so I/O overlaps compute;
header parsing and drawing still take the GIL, so they overlap best with the GPU and DALI's own (C++) threads.
One thread keeps the batches in order (it advances the pass's iterator, which also serves WebDataset streaming),
so they are exactly those of ``read_ahead=0`` (everything on the training thread, as before); an abandoned pass
joins the thread after at most the batch it is reading. On network file systems prefer WebDataset shards
(:mod:`hpckd.data.wds`), which DALI reads sequentially.
"""

from __future__ import annotations

import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache, partial
from typing import Callable, Generic, Iterator, Sequence, TypeVar

import numpy as np
import torch

from hpckd.data import autoaug
from hpckd.data.aug import Policy, resize_for_center_crop
from hpckd.data.batch import Batch, ImageFormat, host_array
from hpckd.data.params import sample_params, view_key
from hpckd.data.sharding import EpochLoader, ResumableEpochs, ShardSpec, check_trainable, epoch_order, steps_per_epoch
from hpckd.data.sources import Source, as_source, decode_rgb
from hpckd.data.index_cache import stale_hint
from hpckd.errors import DataError

__all__ = ["DaliLoader", "ReadAhead", "ShardSpec", "build_pipeline", "param_fields"]

READ_AHEAD = 3  # batches prepared ahead of DALI by default (0: on the training thread, in the callback)
READ_AHEAD_THREAD = "hpckd-read-ahead"  # name prefix of the read-ahead threads

# DALI announces renamed operators when its auto-augment module loads; nothing for our users to act on.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"nvidia\.dali\..*")
warnings.filterwarnings("ignore", message=r"WARNING: `nvidia\.dali\.fn\.experimental")


def _dali():
    try:
        import nvidia.dali as dali  # noqa: F401
    except ImportError as exc:
        raise DataError("data.loader=dali needs NVIDIA DALI: pip install nvidia-dali-cuda120 (or set data.loader=torch)") from exc
    return dali


def param_fields(policy: Policy) -> list[str]:
    """Names of the parameter arrays ``policy`` uses, in a fixed order (see :mod:`hpckd.data.params`)."""
    fields = []
    if policy.crop in ("rrc", "pad_crop"):
        fields.append("crop")
    if policy.flip:
        fields.append("flip")
    if policy.rotate > 0:
        fields.append("angle")
    if policy.has_jitter:
        fields.append("jitter")
    if policy.auto:
        fields += ["ops", "mags", "signs"]
    if policy.cutout > 0:
        fields.append("erase")
    # added later; kept after the others so that the earlier policies' outputs keep their order
    if policy.vflip:
        fields.append("vflip")
    if policy.hue > 0:
        fields.append("hue")
    if policy.grayscale > 0:
        fields.append("gray")
    return fields


@lru_cache(maxsize=None)
def _current_ops() -> dict:
    """DALI's sharpness and equalize augmentations rebuilt on the non-experimental ``fn.filter``/``fn.equalize``
    where this DALI has them (the stock ones call deprecated aliases and warn on every graph build)."""
    from nvidia.dali import fn
    from nvidia.dali.auto_aug import augmentations as a
    from nvidia.dali.auto_aug.core import augmentation

    ops = {}
    if hasattr(fn, "filter"):
        ops["sharpness"] = augmentation(lambda data, kernel: fn.filter(data, kernel), mag_range=(0, 0.9),
                                        randomly_negate=True, mag_to_param=a.sharpness_kernel, param_device="auto",
                                        name="sharpness")
    if hasattr(fn, "equalize"):
        ops["equalize"] = augmentation(lambda data, _: fn.equalize(data), name="equalize")
    return ops


@lru_cache(maxsize=None)
def dali_suite(auto: str) -> tuple:
    """The DALI augmentations of :mod:`hpckd.data.autoaug`'s suite for ``auto``, same order and magnitudes."""
    from nvidia.dali.auto_aug import augmentations as a

    ops = []
    for op in autoaug.suite_of(auto).ops:
        base = _current_ops().get(op.name) or getattr(a, op.name)
        if op.name in ("identity", "equalize", "auto_contrast", "invert"):
            ops.append(base)
        else:
            ops.append(base.augmentation(mag_range=(op.lo, op.hi), randomly_negate=op.signed))
    return tuple(ops)


def _jitter(images, factors, gpu: bool):
    """torchvision's ColorJitter (brightness, then contrast about the grey mean, then saturation).

    Brightness b then contrast c about the grey mean is ``b * (m + c * (x - m))`` with m the grey mean of the
    input (ITU-R 601 luma, as PIL). On the CPU that is one ``fn.brightness_contrast`` with ``contrast_center = m``;
    on the GPU m is a GPU value, which cannot be an operator argument, so the same formula runs as GPU arithmetic.
    """
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    channel_means = fn.reductions.mean(images, axis_names="HW")
    weights = types.Constant(np.array([0.299, 0.587, 0.114], dtype=np.float32), device="gpu" if gpu else "cpu")
    grey = fn.reductions.sum(channel_means * weights, axes=[0])
    if gpu:
        b, c = factors[0].gpu(), factors[1].gpu()
        images = fn.cast(dmath.clamp(b * (grey + c * (images - grey)), 0, 255), dtype=types.UINT8)  # rounds
    else:
        images = fn.brightness_contrast(images, brightness=factors[0], contrast=factors[1], contrast_center=grey)
    return fn.saturation(images, saturation=factors[2])


def _hue(images, shift, gpu: bool):
    """torchvision's ``adjust_hue`` (RGB -> HSV, rotate the hue by ``shift`` turns, HSV -> RGB, PIL's formulas) in
    DALI arithmetic, on HWC uint8 images. DALI's own ``fn.hue`` rotates in YIQ space, which differs from
    torchvision's ColorJitter by several grey levels on real photographs (the fidelity study uses ColorJitter's
    hue, App. A.1), so it is not used."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    def as_float(mask):
        return fn.cast(mask, dtype=types.FLOAT)

    x = fn.cast(images, dtype=types.FLOAT) / 255.0
    r, g, b = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    maxc = dmath.max(dmath.max(r, g), b)
    minc = dmath.min(dmath.min(r, g), b)
    eqc = as_float(maxc == minc)
    spread = maxc - minc
    sat = spread / (maxc + eqc * (1.0 - maxc))  # a grey pixel: spread 0, any non-zero divisor
    rc, gc, bc = ((maxc - c) / (spread + eqc) for c in (r, g, b))
    is_r = as_float(maxc == r)
    is_g = as_float(maxc == g) * (1.0 - is_r)
    is_b = (1.0 - is_r) * (1.0 - as_float(maxc == g))
    h = ((bc - gc) * is_r + (2.0 + rc - bc) * is_g + (4.0 + gc - rc) * is_b) / 6.0 + 1.0
    h = h + (shift.gpu() if gpu else shift)
    h = h - dmath.floor(h)
    h6 = h * 6.0
    sector = dmath.floor(h6)
    f = h6 - sector
    sector = sector - 6.0 * dmath.floor(sector / 6.0)
    v = maxc
    p_ = dmath.clamp((1.0 - sat) * v, 0.0, 1.0)
    q = dmath.clamp((1.0 - sat * f) * v, 0.0, 1.0)
    t = dmath.clamp((sat * f + 1.0 - sat) * v, 0.0, 1.0)
    m = [as_float(sector == float(k)) for k in range(6)]
    # which of (v, p, q, t) each channel takes in each of the 6 sectors (torchvision's table)
    red = m[0] * v + m[1] * q + m[2] * p_ + m[3] * p_ + m[4] * t + m[5] * v
    green = m[0] * t + m[1] * v + m[2] * v + m[3] * q + m[4] * p_ + m[5] * p_
    blue = m[0] * p_ + m[1] * p_ + m[2] * t + m[3] * v + m[4] * v + m[5] * q
    rgb = fn.stack(red, green, blue, axis=2)
    # torchvision's float -> uint8: floor(x * (256 - 1e-3))
    out = fn.cast(dmath.floor(rgb * (256.0 - 1e-3)), dtype=types.UINT8)
    return fn.reshape(out, layout="HWC")


def apply_policy(images, policy: Policy, p: dict, mean: Sequence[float], std: Sequence[float]):
    """DALI graph of ``policy`` on decoded HWC uint8 ``images`` with parameter nodes ``p``; normalised CHW float."""
    from nvidia.dali import fn, types

    s = policy.size
    crop = None
    linear = dict(interp_type=types.INTERP_LINEAR, antialias=True)
    if policy.crop == "rrc":
        window = fn.cast(p["crop"], dtype=types.FLOAT)
        start = window[0:2]
        images = fn.resize(images, size=(s, s), roi_start=start, roi_end=start + window[2:4], roi_relative=False, **linear)
    elif policy.crop == "pad_crop":
        images = fn.resize(images, size=(s, s), **linear)
        images = fn.slice(images, fn.cast(p["crop"][0:2], dtype=types.FLOAT), [float(s), float(s)], axes=[0, 1],
                          normalized_anchor=False, normalized_shape=False, out_of_bounds_policy="pad", fill_values=0)
    elif policy.crop == "center":
        images = fn.resize(images, resize_shorter=resize_for_center_crop(s), **linear)
        crop = (s, s)
    elif policy.crop == "resize":
        images = fn.resize(images, size=(s, s), **linear)
    if crop is not None:
        images = fn.crop(images, crop=crop)
    if policy.flip:
        images = fn.flip(images, horizontal=p["flip"])
    if policy.vflip:
        images = fn.flip(images, horizontal=0, vertical=p["vflip"])
    if policy.rotate > 0:
        images = fn.rotate(images, angle=p["angle"], keep_size=True, fill_value=0, interp_type=types.INTERP_LINEAR)
    if policy.has_jitter:
        images = _jitter(images, p["jitter"], gpu=images.device == "gpu")
    if policy.hue > 0:
        images = _hue(images, p["hue"], gpu=images.device == "gpu")
    if policy.grayscale > 0:
        images = fn.saturation(images, saturation=p["gray"])  # factor 0 = grey (ITU-R 601 luma), 1 = unchanged
    if policy.auto:
        images = _auto_program(images, policy, p)
    if policy.cutout > 0:
        images = fn.erase(images, anchor=p["erase"], shape=[float(policy.cutout)] * 2, axis_names="HW", fill_value=0)
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                    mean=[255.0 * m for m in mean], std=[255.0 * v for v in std])


def _auto_program(images, policy: Policy, p: dict):
    """Stage k applies suite op ``ops[k]`` at bin ``mags[k]`` with sign ``signs[k]`` (``core.select``)."""
    from nvidia.dali import types
    from nvidia.dali.auto_aug.core import select, signed_bin

    suite, bins = dali_suite(policy.auto), autoaug.suite_of(policy.auto).bins
    size = [policy.size, policy.size]
    for k in range(autoaug.stages(policy.auto, policy.ra_n)):
        sign = p["signs"][k]
        if policy.auto == "randaugment" and not policy.ra_sample_m:
            # The bin is the constant m: an int bin keeps DALI's magnitude table at 2 entries per op instead of
            # 2 * bins, which makes building the graph several times faster.
            images = select(list(suite), p["ops"][k], data=images, num_magnitude_bins=bins, fill_value=0, shape=size,
                            magnitude_bin=signed_bin(policy.ra_m, random_sign=sign))
        elif policy.auto.startswith("autoaugment"):
            # AutoAugment uses few (op, bin) pairs per stage: select among those, each with its constant bin.
            pairs, lookup = _autoaugment_pairs(policy.auto, k)
            choice = types.Constant(lookup)[p["ops"][k] * bins + p["mags"][k]]
            fixed = [_fixed_op(suite[op], bin_, bins, size) for op, bin_ in pairs]
            images = select(fixed, choice, images, sign)
        else:
            images = select(list(suite), p["ops"][k], data=images, num_magnitude_bins=bins, fill_value=0, shape=size,
                            magnitude_bin=signed_bin(p["mags"][k], random_sign=sign))
    return images


@lru_cache(maxsize=None)
def _autoaugment_pairs(auto: str, stage: int) -> tuple[list[tuple[int, int]], np.ndarray]:
    """The (op id, bin) pairs stage ``stage`` of the AutoAugment policy can run (identity first), and the
    (n_ops * bins,) int32 table mapping ``op * bins + bin`` to a position in that list."""
    suite = autoaug.suite_of(auto)
    table = autoaug.autoaugment_table("cifar" if auto == "autoaugment_cifar" else "imagenet")
    pairs = [(suite.index("identity"), 0)]
    for op, _, bin_ in table[:, stage, :]:
        pair = (int(op), int(bin_) if suite.ops[int(op)].hi != suite.ops[int(op)].lo else 0)
        if pair not in pairs:
            pairs.append(pair)
    lookup = np.zeros(len(suite.ops) * suite.bins, dtype=np.int32)
    for i, (op, bin_) in enumerate(pairs):
        if suite.ops[op].hi == suite.ops[op].lo:  # magnitude-free op: every bin maps to it
            lookup[op * suite.bins:(op + 1) * suite.bins] = i
        else:
            lookup[op * suite.bins + bin_] = i
    return pairs, lookup


def _fixed_op(aug, bin_: int, bins: int, size: list[int]):
    """``aug`` at the constant magnitude bin ``bin_`` as a select branch taking (images, sign)."""
    from nvidia.dali.auto_aug.core import signed_bin

    def branch(images, sign):
        return aug(images, magnitude_bin=signed_bin(bin_, random_sign=sign), num_magnitude_bins=bins, fill_value=0,
                   shape=size)

    return branch


Batches = Iterator[tuple[np.ndarray, list[np.ndarray]]]
Prepared = tuple[np.ndarray, tuple]  # (sample ids, the external source's outputs for that batch)
T = TypeVar("T")


def read_batches(source: Source, order: np.ndarray, start: int, batch_size: int) -> Batches:
    """(sample ids, data) of the batches of ``order`` from batch ``start`` on, read from ``source``."""
    for k in range(start * batch_size, len(order), batch_size):
        ids = order[k : k + batch_size]
        yield ids, [source.read(int(i)) for i in ids]


def close_iterator(batches: Iterator) -> None:
    """Release what an abandoned iterator holds (a generator's open pipeline or file); others need nothing."""
    close = getattr(batches, "close", None)
    if close is not None:
        close()


class ReadAhead(Generic[T]):
    """The results of successive ``produce()`` calls, computed up to ``depth`` calls ahead on one background thread.

    Pull-based: a call is submitted each time one result is handed out, so at most ``depth`` results wait and the
    thread idles instead of reading on when the consumer stops asking. A single worker runs the calls one after
    the other in submission order, which keeps the results in order and lets ``produce`` advance a generator
    (not thread-safe) that always runs on the same thread. An exception from ``produce`` is re-raised, as is, by
    the :meth:`next` that hands out its result.
    """

    def __init__(self, produce: Callable[[], T], depth: int, *, finish: Callable[[], None] = lambda: None,
                 name: str = READ_AHEAD_THREAD) -> None:
        if depth < 1:
            raise ValueError(f"read-ahead depth must be >= 1, got {depth}")
        self._produce, self._finish = produce, finish
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._ahead: deque[Future[T]] = deque(self._pool.submit(produce) for _ in range(depth))
        self.closed = False

    def next(self) -> T:
        """The next result, waiting for it if the thread has not finished it yet."""
        if self.closed:
            raise RuntimeError("ReadAhead.next after close")
        future = self._ahead.popleft()
        self._ahead.append(self._pool.submit(self._produce))
        return future.result()

    def close(self) -> None:
        """Drop the calls not started, let the running one finish, run ``finish`` on the thread, join it."""
        if self.closed:
            return
        self.closed = True
        for future in self._ahead:
            future.cancel()
        self._ahead.clear()
        self._pool.submit(self._finish)
        self._pool.shutdown(wait=True)


class BatchFeeder:
    """The ``fn.external_source`` callback: the next batch of the current pass, as input arrays.

    Outputs: data (encoded bytes or HWC pixels), sample ids, then each view's parameter arrays in
    :func:`param_fields` order. With ``read_ahead`` > 0 they are prepared that many batches ahead by a
    :class:`ReadAhead` thread (see "Cost of this design" above) and the callback only hands them out; with 0 the
    callback prepares each batch itself. Running out of batches (StopIteration) ends DALI's epoch; ``close`` ends a
    pass early (and stops its read-ahead). The ids of the last few batches fed are kept to name a file DALI fails
    to decode.
    """

    def __init__(self, source: Source, views: dict[str, Policy], seed: int, read_ahead: int = READ_AHEAD) -> None:
        if read_ahead < 0:
            raise ValueError(f"read_ahead must be >= 0, got {read_ahead}")
        self.source, self.views, self.seed, self.read_ahead = source, views, seed, read_ahead
        self.epoch = 0
        self.recent: deque[np.ndarray] = deque(maxlen=4)
        self._next: Callable[[], Prepared | None] = lambda: None
        self._finish: Callable[[], None] = lambda: None
        self._ahead: ReadAhead[Prepared | None] | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once the current pass is over (exhausted, failed or closed): the callback raises StopIteration."""
        return self._closed

    def plan(self, batches: Batches, epoch: int) -> None:
        """Feed ``batches`` of ``epoch`` from now on; what the previous pass had read ahead is dropped first."""
        self.close()
        self.epoch = epoch
        produce = partial(self._prepare, batches, epoch)
        if self.read_ahead > 0:
            self._ahead = ReadAhead(produce, self.read_ahead, finish=partial(close_iterator, batches))
            self._next, self._finish = self._ahead.next, lambda: None
        else:
            self._next, self._finish = produce, partial(close_iterator, batches)
        self._closed = False

    def close(self) -> None:
        """End the current pass: no more batches, the read-ahead thread joined, the pass's iterator released."""
        self._closed = True
        ahead, finish = self._ahead, self._finish
        self._ahead, self._finish, self._next = None, (lambda: None), (lambda: None)
        if ahead is not None:
            ahead.close()
        finish()

    def _prepare(self, batches: Batches, epoch: int) -> Prepared | None:
        """The next batch of ``batches`` as the callback's outputs, or None at the end (runs on the read-ahead
        thread; ``epoch`` is bound at ``plan`` so it never sees a later pass's epoch)."""
        item = next(batches, None)
        if item is None:
            return None
        ids, data = item
        return ids, self.inputs(ids, data, epoch)

    def inputs(self, ids: np.ndarray, data: list[np.ndarray], epoch: int) -> tuple:
        """External source outputs of one batch: data, ids, each view's parameters (needs the image sizes)."""
        sizes = np.array([self.source.size(int(i), d) for i, d in zip(ids, data)], dtype=np.int64)
        outputs = [data, [np.array([i], dtype=np.int64) for i in ids]]
        for name, policy in self.views.items():
            params = sample_params(policy, view_key(self.seed, epoch, name), ids, sizes)
            outputs += [list(params[f]) for f in param_fields(policy)]
        return tuple(outputs)

    def __call__(self, info):
        if self._closed:
            raise StopIteration
        try:
            prepared = self._next()
        except BaseException:
            self.close()  # the pass is over: its error surfaces here, on the training thread
            raise
        if prepared is None:
            self.close()
            raise StopIteration
        ids, outputs = prepared
        self.recent.append(ids)
        return outputs

    def culprit(self) -> str | None:
        """The first recently fed sample that PIL cannot decode either, if any (a file that cannot be read at
        all raises its own one-line :class:`DataError` here: that is not a decode failure)."""
        for ids in self.recent:
            for i in ids:
                data = self.source.read(int(i))
                try:
                    decode_rgb(data, self.source.encoded, self.source.name(int(i)))
                except DataError:
                    return self.source.name(int(i))
        return None


_DECODER_OP = "fn.decoders.image"  # how DALI names the decoder in a pipeline error


def _dali_reason(exc: BaseException) -> str:
    """The line of a DALI pipeline error that says what happened (after its "encountered:" header)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    after = lines[lines.index("encountered:") + 1:] if "encountered:" in lines else lines
    return after[0].rstrip(" :") if after else type(exc).__name__


def build_pipeline(feeder: BatchFeeder, views: dict[str, Policy], *, encoded: bool, batch_size: int, num_threads: int,
                   device_id: int | None, mean: Sequence[float], std: Sequence[float]):
    """A DALI pipeline yielding (sample ids, one image per view, each view's parameters) from ``feeder``."""
    _dali()
    from nvidia.dali import fn, pipeline_def, types

    n_outputs = 2 + sum(len(param_fields(p)) for p in views.values())

    @pipeline_def(enable_conditionals=True)
    def graph():
        inputs = fn.external_source(source=feeder, num_outputs=n_outputs, batch=True, batch_info=True,
                                    layout=["" if encoded else "HWC"] + [""] * (n_outputs - 1))
        data, ids, rest = inputs[0], inputs[1], list(inputs[2:])
        gpu = device_id is not None
        if encoded:
            images = fn.decoders.image(data, device="mixed" if gpu else "cpu", output_type=types.RGB)
        else:
            images = data.gpu() if gpu else data
        outs, params = [], []
        for policy in views.values():
            fields = param_fields(policy)
            p = dict(zip(fields, rest[: len(fields)]))
            rest = rest[len(fields):]
            outs.append(apply_policy(images, policy, p, mean, std))
            params += [p[f] for f in fields]
        return (ids, *outs, *params)

    return graph(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0, prefetch_queue_depth=2)


class DaliLoader(EpochLoader):
    """Iterates :class:`Batch` objects from a DALI pipeline; one pass = one epoch.

    The order of a pass comes from :func:`hpckd.data.sharding.epoch_order` and the parameters from
    :func:`hpckd.data.params.sample_params`, so ``load_state_dict({"epoch": e, "step": s})`` resumes at batch
    ``s`` of epoch ``e`` exactly (same samples, same pixels) without replaying anything. ``batch.aug[view]``
    holds each view's parameters for replay.

    Args:
        files: list of image paths, or a :class:`~hpckd.data.sources.Source` (e.g. CIFAR arrays, WebDataset).
        labels: class label of every sample id.
        streaming: for sources that can stream (WebDataset shards), read them with DALI's sequential reader
            (shuffle buffer, shard rotation across epochs) instead of by random access in the global order.
        read_ahead: batches read and parameterised ahead on a background thread (:class:`ReadAhead`); 0 does it
            on the training thread when DALI asks for a batch. Same batches either way.
    """

    def __init__(self, files, labels: Sequence[int], views: dict[str, Policy], *, batch_size: int,
                 shard: ShardSpec, train: bool, seed: int, num_threads: int, device: torch.device,
                 mean: Sequence[float], std: Sequence[float], streaming: bool = True,
                 image_format: ImageFormat = ImageFormat(), read_ahead: int = READ_AHEAD) -> None:
        _dali()
        self.source = as_source(files)
        self.streaming = streaming and hasattr(self.source, "stream")
        self.num_threads = max(1, num_threads)
        if train:
            check_trainable(len(self.source), shard, batch_size)
        device_id = device.index if device.type == "cuda" else None
        if device.type == "cuda" and device_id is None:
            device_id = torch.cuda.current_device()
        self.views = dict(views)
        self.shard, self.train, self.seed, self.batch_size = shard, train, seed, batch_size
        self.feeder = BatchFeeder(self.source, self.views, seed, read_ahead)
        self.pipeline = build_pipeline(self.feeder, self.views, encoded=self.source.encoded, batch_size=batch_size,
                                       num_threads=max(1, num_threads), device_id=device_id, mean=mean, std=std)
        self.fields = {name: param_fields(p) for name, p in self.views.items()}
        self.output_names = ["index", *self.views] + [f"{v}.{f}" for v, fs in self.fields.items() for f in fs]
        self._iterator = None
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=device)
        self.device, self.image_format = device, image_format
        self.steps_per_epoch = steps_per_epoch(len(self.source), shard, batch_size, train)
        self.state = ResumableEpochs()

    def _start_pass(self, epoch: int, start: int):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if self.streaming:
            batches = self.source.stream(epoch=epoch, shard=self.shard, batch_size=self.batch_size, train=self.train,
                                         seed=self.seed, start=start, num_threads=self.num_threads)
        else:
            order = epoch_order(len(self.source), self.shard, batch_size=self.batch_size, train=self.train,
                                seed=self.seed, epoch=epoch)
            batches = read_batches(self.source, order, start, self.batch_size)
        self.feeder.plan(batches, epoch)
        if self._iterator is None:
            self._iterator = DALIGenericIterator(self.pipeline, self.output_names, auto_reset=False,
                                                 prepare_first_batch=False, last_batch_policy=LastBatchPolicy.PARTIAL)
        else:
            self._iterator.reset()
        return self._iterator

    def _finish_pass(self, iterator, complete: bool) -> None:
        """Stop feeding (and reading ahead: a failed pass may leave its thread idle); an abandoned pass also
        drains what DALI prefetched, so the next pass starts clean."""
        self.feeder.close()
        if not complete:
            for _ in iterator:
                pass

    def _batch(self, out: dict, epoch: int) -> Batch:
        # The ids are a CPU output of the pipeline (fed by external_source, never moved to the GPU): keep a copy on
        # the host (Batch.ids), a copy because the iterator may hand views of DALI's own buffers (dynamic executor).
        host = host_array(out["index"]) if out["index"].device.type == "cpu" else None
        index = out["index"].reshape(-1).to(self.device, dtype=torch.int64, non_blocking=True)  # never wait for the device
        views = {name: self.image_format.apply(out[name], self.device) for name in self.views}
        aug = {name: {f: out[f"{name}.{f}"] for f in fields} for name, fields in self.fields.items()}
        return Batch(views=views, labels=self.labels[index], index=index, epoch=epoch, aug=aug, host_index=host)

    def __iter__(self) -> Iterator[Batch]:
        start = self.state.begin_pass()
        if start >= self.steps_per_epoch:
            return
        epoch = self.state.epoch
        iterator = self._start_pass(epoch, start)
        complete = False
        try:
            for outputs in iterator:
                self.state.step += 1
                yield self._batch(outputs[0], epoch)
            complete = True
        except RuntimeError as exc:
            complete = True
            # Only a decode failure is the user's to fix; any other DALI error (a bug, out of memory) keeps its
            # own message and traceback.
            culprit = self.feeder.culprit()
            if culprit is not None:
                raise DataError(f"cannot decode {culprit} (fix or remove it; data.on_bad_image=skip drops files "
                                f"that fail the index-time check){stale_hint(culprit)}") from exc
            if _DECODER_OP in str(exc):  # a file DALI's decoder rejects although PIL decodes it
                raise DataError(f"DALI cannot decode an image of the batch that PIL decodes "
                                f"({_dali_reason(exc)}); set data.loader=torch to read this data set") from exc
            raise
        finally:
            self._finish_pass(iterator, complete)
