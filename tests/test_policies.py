"""Named policies against the studies' text and torchvision's transforms; policies written in the config.

Random parts are compared with torchvision's own parameter draws (statistics over many draws); fixed parameters
are compared pixel by pixel with torchvision's transform classes given a degenerate range (so they apply exactly
that parameter), which is a second code path from hpckd's functional calls."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from hpckd.data.aug import POLICY_NAMES, Policy, train_policy
from hpckd.data.params import params_from_uniforms, sample_params, view_key
from hpckd.data.render_torch import render
from hpckd.errors import ConfigError
from tests.helpers import assert_one_line_error, run_hpckd

RAW = dict(mean=[0.0, 0.0, 0.0], std=[1 / 255] * 3)  # output = pixel values
N = 20000


def photo(size: int = 48, seed: int = 0) -> torch.Tensor:
    """A real photograph (scikit-learn's sample image), cropped to size x size, uint8 CHW."""
    from sklearn.datasets import load_sample_images

    img = load_sample_images().images[seed % 2][100:100 + 4 * size:4, 200:200 + 4 * size:4]
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)


def draws(policy: Policy, n: int = N, size=(64, 80)) -> dict[str, np.ndarray]:
    return sample_params(policy, view_key(0, 0, "student"), np.arange(n), np.array([size] * n))


# ----------------------------------------------------------------------------- named policies = the papers' text


def test_attention_study_weak_and_strong_follow_appendix_a1():
    im_weak, im_strong = train_policy("imagenet", "weak", 224), train_policy("imagenet", "strong", 224)
    cf_weak, cf_strong = train_policy("cifar", "weak", 32), train_policy("cifar", "strong", 32)
    # weak: random resized crop, horizontal flip, rotation, colour jitter (both families)
    for p in (im_weak, cf_weak):
        assert p.flip and p.rotate > 0 and p.has_jitter and not p.auto and not p.cutout
    assert im_weak.crop == "rrc"
    # ImageNet strong: RRC + flip + jitter + RandAugment with *up to* 2 ops and magnitude *up to* 10
    assert (im_strong.crop, im_strong.flip, im_strong.has_jitter, im_strong.rotate) == ("rrc", True, True, 0.0)
    assert (im_strong.auto, im_strong.ra_n, im_strong.ra_m) == ("randaugment", 2, 10)
    assert im_strong.ra_sample_n and im_strong.ra_sample_m
    # CIFAR strong: crop + flip, then AutoAugment and Cutout; no rotation, no jitter
    assert (cf_strong.auto, cf_strong.cutout, cf_strong.rotate, cf_strong.has_jitter) == ("autoaugment_cifar", 16, 0.0, False)
    assert train_policy("cifar", "weak", 32, cifar_crop="rrc").rrc_scale == (0.2, 1.0)
    # the earlier definitions stay available under *_legacy
    assert not train_policy("imagenet", "weak_legacy", 224).rotate
    assert not train_policy("cifar", "weak_legacy", 32).has_jitter
    legacy = train_policy("imagenet", "strong_legacy", 224)
    assert (legacy.ra_n, legacy.ra_m, legacy.ra_sample_n, legacy.ra_sample_m) == (2, 10, False, False)


def test_fidelity_and_response_policies():
    base = train_policy("cifar", "flip_crop", 32)
    assert (base.crop, base.pad, base.flip) == ("pad_crop", 4, True)  # Stanton et al. App. A.1 baseline
    rot, vf, jit = (train_policy("cifar", n, 32) for n in ("fidelity_rotate", "fidelity_vflip", "fidelity_jitter"))
    assert (rot.rotate, rot.vflip, rot.has_jitter) == (20.0, False, False)
    assert (vf.vflip, vf.rotate) == (True, 0.0)
    assert (jit.jitter_strengths, jit.hue, jit.rotate, jit.vflip) == ((0.2, 0.2, 0.2), 0.2, 0.0, False)
    combined = train_policy("cifar", "fidelity_combined", 32)
    assert (combined.rotate, combined.vflip, combined.jitter_strengths, combined.hue) == (20.0, True, (0.2,) * 3, 0.2)
    assert train_policy("cifar", "fidelity_rotate_vflip", 32).vflip and not train_policy("cifar", "fidelity_rotate_vflip", 32).hue
    rf = train_policy("cifar", "rrc_flip", 32)  # Song et al.: only RandomResizedCrop + RandomHorizontalFlip
    assert (rf.crop, rf.rrc_scale, rf.flip, rf.rotate, rf.has_jitter, rf.auto) == ("rrc", (0.08, 1.0), True, 0.0, False, None)


@pytest.mark.parametrize("family", ["cifar", "imagenet"])
def test_every_named_policy_renders_a_view_of_the_training_size(family):
    img = photo(40)
    for name in POLICY_NAMES:
        policy = train_policy(family, name, 32)
        p = sample_params(policy, view_key(1, 0, "s"), np.arange(3), np.array([[40, 40]] * 3))
        out = render(img, policy, {k: v[2] for k, v in p.items()}, **RAW)
        assert out.shape == (3, 32, 32) and out.std() > 1.0, name


# ------------------------------------------------------------------ random parts: statistics against torchvision


def test_randaugment_up_to_n_ops_and_up_to_magnitude_m():
    policy = train_policy("imagenet", "strong", 224)
    p = draws(policy)
    # the count is uniform in {1, 2}: with identity also one of the 14 ops, P(op k runs) = P(count > k) * 13/14
    ran = p["ops"] != 0
    assert abs(ran[:, 0].mean() - 13 / 14) < 0.01 and abs(ran[:, 1].mean() - 0.5 * 13 / 14) < 0.015
    counts = np.bincount(p["mags"].ravel(), minlength=11)
    assert len(counts) == 11 and counts.min() > 0.8 * 2 * N / 11 and counts.max() < 1.2 * 2 * N / 11
    fixed = draws(train_policy("imagenet", "strong_legacy", 224))
    assert (fixed["mags"] == 10).all() and (fixed["ops"] != 0).mean() > 0.9


def test_rrc_windows_match_torchvision_random_resized_crop_statistics():
    torch.manual_seed(0)
    img = torch.zeros(3, 64, 80)
    tv = np.array([T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)],
                  dtype=np.float64)  # (top, left, height, width), the same layout as hpckd's "crop"
    ours = draws(Policy("r", 32, "rrc"), 4000)["crop"].astype(np.float64)
    for stat in (lambda w: w[:, 2] * w[:, 3] / (64 * 80), lambda w: w[:, 3] / w[:, 2], lambda w: w[:, 0], lambda w: w[:, 1]):
        a, b = stat(tv), stat(ours)
        # two-sample comparison of quantiles (the draws are independent; 4000 draws each)
        for q in (0.1, 0.5, 0.9):
            assert abs(np.quantile(a, q) - np.quantile(b, q)) <= 0.06 * (np.quantile(a, 0.95) - np.quantile(a, 0.05)) + 1


def test_colour_jitter_rotation_flip_and_grayscale_draws_match_torchvision():
    policy = Policy("j", 32, "none", jitter=(0.4, 0.2, 0.3), hue=0.2, rotate=20.0, vflip=True, grayscale=0.25)
    p = draws(policy)
    torch.manual_seed(1)
    fn_idx, b, c, s, h = zip(*[T.ColorJitter.get_params([0.6, 1.4], [0.8, 1.2], [0.7, 1.3], [-0.2, 0.2])
                               for _ in range(4000)])
    for ours, theirs in ((p["jitter"][:, 0], b), (p["jitter"][:, 1], c), (p["jitter"][:, 2], s), (p["hue"], h)):
        theirs = np.array(theirs)
        assert abs(ours.min() - theirs.min()) < 0.01 and abs(ours.max() - theirs.max()) < 0.01
        assert abs(ours.mean() - theirs.mean()) < 0.01 and abs(ours.std() - theirs.std()) < 0.01
    angles = np.array([T.RandomRotation.get_params([-20.0, 20.0]) for _ in range(4000)])
    assert abs(p["angle"].std() - angles.std()) < 0.5 and p["angle"].min() >= -20 and p["angle"].max() <= 20
    assert abs(p["vflip"].mean() - 0.5) < 0.015
    assert abs((p["gray"] == 0).mean() - 0.25) < 0.015  # RandomGrayscale(p=0.25)


# --------------------------------------------------------------- fixed parameters: pixels against torchvision


def test_fixed_parameters_render_like_torchvision_transforms():
    img = photo(48)
    base = Policy("p", 48, "none")
    cases = [
        (Policy("p", 48, "none", vflip=True), {"vflip": np.int32(1)}, v2.RandomVerticalFlip(p=1.0), 0),
        (Policy("p", 48, "none", grayscale=0.5), {"gray": np.float32(0)}, v2.Grayscale(num_output_channels=3), 0),
        (Policy("p", 48, "none", hue=0.3), {"hue": np.float32(-0.17)}, v2.ColorJitter(hue=(-0.17, -0.17)), 0),
        (Policy("p", 48, "none", rotate=30.0), {"angle": np.float32(12.5)},
         v2.RandomRotation((12.5, 12.5), interpolation=InterpolationMode.BILINEAR), 0),
        # one factor at a time (torchvision's random order of the factors does not matter then); hpckd rounds
        # once where torchvision rounds per step: within a grey level on average
        (Policy("p", 48, "none", jitter=0.3), {"jitter": np.float32([0.9, 1.0, 1.0])},
         v2.ColorJitter(brightness=(0.9, 0.9)), 1.0),
        (Policy("p", 48, "none", jitter=0.3), {"jitter": np.float32([1.0, 0.8, 1.0])},
         v2.ColorJitter(contrast=(0.8, 0.8)), 1.0),
        (Policy("p", 48, "none", jitter=0.3), {"jitter": np.float32([1.0, 1.0, 1.3])},
         v2.ColorJitter(saturation=(1.3, 1.3)), 1.0),
        # all three, against torchvision's functional ops in hpckd's (fixed) order, factors that do not saturate
        # (torchvision clamps after each step, hpckd once: pixels pushed past 255 by brightness differ)
        (Policy("p", 48, "none", jitter=0.3), {"jitter": np.float32([0.9, 0.8, 1.1])},
         lambda x: F.adjust_saturation(F.adjust_contrast(F.adjust_brightness(x, 0.9), 0.8), 1.1), 1.5),
    ]
    for policy, params, transform, tolerance in cases:
        ours = render(img, policy, params, **RAW).round()  # (x / 255) / (1 / 255): back to grey levels
        theirs = transform(img).to(torch.float32)
        diff = (ours - theirs).abs().mean().item()
        assert diff <= tolerance, (policy, diff)
    assert render(img, base, {}, **RAW).round().equal(img.to(torch.float32))


# ----------------------------------------------------------------------------------- policies written in YAML


def write_config(tmp_path, body: str):
    path = tmp_path / "exp.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def test_a_yaml_policy_is_parsed_and_used_by_student_and_teacher_views(tmp_path, synth_root):
    from hpckd.data.loaders import student_policy, view_policies
    from hpckd.train.experiment import load_experiment

    cfg = load_experiment(write_config(tmp_path, f"""
        aug: mine
        data:
          root: {synth_root}
          loader: torch
          policies:
            mine:
              base: flip_crop
              vflip: true
              rotate: 20
              jitter: {{brightness: 0.4, contrast: 0.1, hue: 0.05}}
              grayscale: 0.2
              randaugment: {{n: 3, m: 12, up_to_n: true, up_to_m: true}}
              cutout: 8
            other:
              crop: rrc
              scale: [0.3, 0.9]
              hflip: true
              trivialaugment: true
    """), [])
    p = student_policy(cfg)
    assert (p.crop, p.pad, p.flip, p.vflip, p.rotate) == ("pad_crop", 4, True, True, 20.0)
    assert (p.jitter_strengths, p.hue, p.grayscale, p.cutout) == ((0.4, 0.1, 0.0), 0.05, 0.2, 8)
    assert (p.auto, p.ra_n, p.ra_m, p.ra_sample_n, p.ra_sample_m) == ("randaugment", 3, 12, True, True)
    views = view_policies(cfg, [None, "other", "weak"])
    assert set(views) == {"student", "teacher1", "teacher2"}
    assert (views["teacher1"].crop, views["teacher1"].rrc_scale, views["teacher1"].auto) == ("rrc", (0.3, 0.9), "trivialaugment")
    # parameters are still inputs: a pure function of the key, replayable
    sizes = np.array([[40, 40]] * 5)
    a = sample_params(p, view_key(0, 2, "student"), np.arange(5), sizes)
    b = sample_params(p, view_key(0, 2, "student"), np.arange(5), sizes)
    assert set(a) == {"crop", "flip", "vflip", "angle", "jitter", "hue", "gray", "ops", "mags", "signs", "erase"}
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert (a["mags"] <= 12).all() and ((a["ops"] != 0).sum(1) <= 3).all()


def test_added_parts_do_not_change_what_earlier_policies_draw():
    """New parts take uniform slots after the old ones: a policy without them draws exactly as before, so runs
    and logit stores of the earlier policies replay unchanged."""
    old = Policy("s", 32, "rrc", flip=True, rotate=15.0, jitter=0.4, auto="randaugment", cutout=8)
    new = Policy("s", 32, "rrc", flip=True, rotate=15.0, jitter=0.4, auto="randaugment", cutout=8, vflip=True,
                 hue=0.1, grayscale=0.5)
    u = np.random.default_rng(0).random((50, 60))
    a, b = params_from_uniforms(old, u, np.array([[40, 50]])), params_from_uniforms(new, u, np.array([[40, 50]]))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # the first 47 slots + 2 per RandAugment stage are where the old layout put them
    assert np.array_equal(a["flip"], (u[:, 40] < 0.5).astype(np.int32))


@pytest.mark.parametrize("policy, fragment", [
    ("{rotate: -5}", "'data.policies.bad.rotate' is -5"),
    ("{hflip: 1, spin: 3}", "'data.policies.bad.spin' is not a policy key"),
    ("{crop: zoom}", "'data.policies.bad.crop' is 'zoom'"),
    ("{randaugment: {n: 2, k: 1}}", "'data.policies.bad.randaugment.k'"),
    ("{autoaugment: svhn}", "'data.policies.bad.autoaugment' is 'svhn'"),
    ("{autoaugment: cifar, trivialaugment: true}", "'data.policies.bad.trivialaugment' cannot be combined"),
    ("{base: bad}", "forms a cycle"),
    ("{jitter: {hue: 0.7}}", "'data.policies.bad.jitter.hue' is 0.7"),
])
def test_bad_yaml_policies_are_one_line_config_errors(tmp_path, synth_root, policy, fragment):
    from hpckd.train.experiment import load_experiment

    path = write_config(tmp_path, f"aug: bad\ndata:\n  root: {synth_root}\n  policies:\n    bad: {policy}\n")
    with pytest.raises(ConfigError) as info:
        load_experiment(path, [])
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow  # two fresh `hpckd` processes (the same checks run in-process above)
def test_cli_reports_an_unknown_policy_and_a_bad_user_policy_on_one_line(tmp_path, synth_root):
    proc = run_hpckd("train", f"data.root={synth_root}", f"out_dir={tmp_path / 'r'}", "aug=mystery")
    assert_one_line_error(proc, "'aug' is 'mystery'")
    path = write_config(tmp_path, f"aug: mine\ndata:\n  root: {synth_root}\n  policies:\n    mine: {{cutout: 99}}\n")
    proc = run_hpckd("train", str(path), f"out_dir={tmp_path / 'r2'}")
    assert_one_line_error(proc, "'data.policies.mine.cutout' is 99")


def test_configs_stored_before_the_change_keep_their_policies():
    """A checkpoint's config from before ``weak``/``strong`` followed App. A.1 (no ``data.policies``) names the
    legacy policies after migration, so resume and ``hpckd eval --augmented`` use what the run trained with (the
    migration fixture's exact resume checks the pixels: tests/test_config_migration.py)."""
    from hpckd.config.migrate import migrate_config

    old = {"aug": "weak", "teachers": [{"checkpoint": "a.pt", "aug": "strong"}, {"checkpoint": "b.pt", "aug": None}],
           "data": {"family": "cifar"}}
    new = migrate_config(old)
    assert new["aug"] == "weak_legacy" and [t["aug"] for t in new["teachers"]] == ["strong_legacy", None]
    assert old["aug"] == "weak", "the stored config is left as it was"
    current = {"aug": "weak", "data": {"family": "cifar", "policies": {}}}
    assert migrate_config(current) == current
