"""Every ``genexp train`` key with a wrong value fails before training, in one line naming the key.

The keys are read from the composed configs (each family's ``model.*``, and ``data.*``,
``trainer.*``, ``optimizer.*``, ``lr_scheduler.*``, ``schedule.*``, ``sampler.*``, ``performance.*``,
``checkpoint.*``, ``divergence.*``, ``dataset.*``, ``seed``), so a new key is fuzzed without an
entry here. ``pytorch_lightning.Trainer.fit`` raises in these tests: a value that reaches training
fails the test instead of training. Then the cases the issue named, and the Hydra-level ones through
the command line.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
from conftest import TINY, compose_cfg, tiny
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from test_cli import genexp

from genexp import families
from genexp.commands.train import train
from genexp.errors import GenexpError

# every family but those that need a trained first stage (this test trains none)
FAMILIES = [n for n in families.names() if not families.get(n).needs_first_stage]
GROUPS = (
    "data",
    "trainer",
    "optimizer",
    "lr_scheduler",
    "schedule",
    "sampler",
    "solver",
    "performance",
    "checkpoint",
    "divergence",
    "dataset",
)
# the groups' keys are fuzzed on a VAE (with an LR schedule) and on a DDPM (schedule and sampler)
GROUP_BASES = {
    "vae": ["lr_scheduler=warmup_cosine"],
    "ddpm": ["sampler=ddim", "sampler.steps=10"],
    "flow_matching": ["solver=dopri5"],
}
# wrong type, empty, negative, past int64 (and uint32), a list where a scalar goes
VALUES = ["abc", "''", "-5", "99999999999999999999", "[1]"]
# values a key takes on purpose: a path may be any string, one level of channel_mults is a UNet
ACCEPTED = {
    ("trainer.default_root_dir", "abc"),
    ("checkpoint.dirpath", "abc"),
    ("model.net.channel_mults", "[1]"),
    ("model.family.label", "abc"),  # a family's name in words may be any words
    # Lightning's own one line ("trainer: `Timer(duration='abc')` is not a valid duration ..."),
    # catalogued in docs/errors.md
    ("trainer.max_time", "abc"),
}
PARSER = OverridesParser.create()


class TrainingStarted(AssertionError):
    """Raised by the patched ``Trainer.fit``: the bad value was not caught before training."""


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    def fit(*args, **kwargs):
        raise TrainingStarted("training started: the bad value was not refused before fit")

    monkeypatch.setattr(pl.Trainer, "fit", fit)


_BASES: dict[str, object] = {}


def base(family: str, extra: tuple[str, ...] = ()):
    """The tiny composed config of ``family`` (composed once per session and copied)."""
    key = f"{family} {' '.join(extra)}"
    if key not in _BASES:
        _BASES[key] = compose_cfg([*tiny(family), *extra], Path("unused"))
    return _BASES[key]


def leaves(node, prefix: str) -> list[str]:
    """Dotted keys of every leaf under ``node`` as written (interpolations are leaves too)."""
    out = []

    def walk(value, key):
        if isinstance(value, dict):
            for k, v in value.items():
                if not str(k).startswith("_"):
                    walk(v, f"{key}.{k}")
        else:
            out.append(key)

    walk(OmegaConf.to_container(node, resolve=False), prefix)
    return out


def cases() -> list:
    params = []
    for family in FAMILIES:
        for key in leaves(base(family).model, "model"):
            if key.startswith("model.family.") and family != "vae":
                continue  # the family node is checked by shared code (preflight.family_node): once
            params.append(pytest.param(family, (), key, id=f"{family}-{key}"))
    for family, extra in GROUP_BASES.items():
        cfg = base(family, tuple(extra))
        keys = [k for g in GROUPS if cfg.get(g) is not None for k in leaves(cfg[g], g)]
        for key in [*keys, "seed"]:
            if family == "ddpm" and not key.startswith(("schedule.", "sampler.")):
                continue  # the other groups are fuzzed on the VAE
            if family == "flow_matching" and not key.startswith("solver."):
                continue
            params.append(pytest.param(family, tuple(extra), key, id=f"{family}-{key}"))
    return params


def refused(cfg, tmp_path: Path) -> str:
    cfg.paths.output_dir = str(tmp_path / "run")
    with pytest.raises(GenexpError) as err:
        train(cfg)
    return str(err.value)


@pytest.mark.parametrize("family, extra, key", cases())
def test_every_key_refuses_wrong_values_in_one_line(family, extra, key, tmp_path):
    """Each bad value of ``key`` is a GenexpError of one line that names the key, before fit."""
    values = [*VALUES, "4294967296"] if key.rsplit(".", 1)[-1].endswith("seed") else VALUES
    for value in values:
        if (key, value) in ACCEPTED:
            continue
        cfg = copy.deepcopy(base(family, extra))
        OmegaConf.update(cfg, key, PARSER.parse_override(f"{key}={value}").value(), merge=False)
        text = refused(cfg, tmp_path)
        assert "\n" not in text and key in text, f"{key}={value}: {text}"
    assert not list(tmp_path.rglob("*.ckpt*")), "nothing was trained, nothing saved"


NAMED = [
    # (id, family, overrides, the one-line error)
    (
        "seed-past-uint32",
        "vae",
        ["seed=4294967296"],
        "seed=4294967296: must be <= 4294967295 (seeds are 32-bit)",
    ),
    (
        "seed-past-int64",
        "vae",
        ["seed=99999999999999999999"],
        "seed=99999999999999999999: must be <= 4294967295 (seeds are 32-bit)",
    ),
    (
        "size-past-int64",
        "vae",
        ["model.latent_dim=9223372036854775808"],
        "model.latent_dim=9223372036854775808: is past the 64-bit integer range torch and numpy use",
    ),
    (
        "recursive-interpolation",
        "vae",
        ["model.latent_dim=${model.latent_dim}"],
        "model.latent_dim=${model.latent_dim}: the interpolation refers to itself; pass model.latent_dim=<a value>",
    ),
    (
        "short-betas",
        "vae",
        ["optimizer.betas=[0.9]"],
        "optimizer.betas=[0.9]: must be 2 numbers in [0, 1), e.g. [0.9, 0.999]",
    ),
    (
        "gan-short-betas",
        "gan",
        ["module.optimizers.discriminator.betas=[0.5]"],
        "module.optimizers.discriminator.betas=[0.5]: must be 2 numbers in [0, 1)",
    ),
    (
        "warmup-steps",
        "vae",
        ["lr_scheduler=warmup_constant", "lr_scheduler.warmup_steps=-5"],
        "lr_scheduler.warmup_steps=-5: must be >= 0",
    ),
    ("one-timestep", "ddpm", ["schedule.timesteps=1"], "schedule.timesteps=1: must be >= 2"),
    # the callbacks group is not in GROUPS' fuzz: its grid sizes get named cases
    (
        "negative-grid",
        "vae",
        ["callbacks.sample_grid.num_samples=-5"],
        "callbacks.sample_grid.num_samples=-5: must be >= 1",
    ),
    (
        "negative-grid-period",
        "vae",
        ["callbacks.sample_grid.every_n_epochs=-1"],
        "callbacks.sample_grid.every_n_epochs=-1: must be >= ",
    ),
    ("schedule-argument", "ddpm", ["schedule.betas.beta_end=-5"], "schedule.betas.beta_end=-5: must be > 0"),
    (
        "schedule-as-a-value",
        "ddpm",
        ["model.schedule=abc"],
        "model.schedule='abc': must be a config node with a _target_, not a value",
    ),
    (
        "gan-batch-of-one",
        "gan",
        ["data.batch_size=1"],
        "data.batch_size=1: callbacks.model_checkpoint.monitor=val/energy compares images within a "
        "validation batch, so it needs data.batch_size >= 2",
    ),
    *[
        (
            f"{family}-image-size",
            family,
            ["model.image_size=32"],
            "model.image_size=32: the dataset has 16 px images (dataset.image_size=16); drop the override",
        )
        for family in ("vae", "gan", "realnvp", "pixelcnn")
    ],
    (
        "channels",
        "ae",
        ["model.channels=3"],
        "model.channels=3: the dataset has 1-channel images (dataset.channels=1)",
    ),
    (
        "flow-squeezes-past-memory",
        "realnvp",
        ["model.n_scales=4611686018427387904"],
        "model.n_scales=4611686018427387904: realnvp squeezes",
    ),
    (
        "devices",
        "vae",
        ["trainer.devices=abc"],
        "trainer.devices='abc': must be a number of devices, a list of indices or auto",
    ),
    ("bool", "vae", ["data.pin_memory=abc"], "data.pin_memory='abc': must be true or false"),
]


@pytest.mark.parametrize("family, overrides, message", [pytest.param(*c[1:], id=c[0]) for c in NAMED])
def test_named_bad_configs_fail_in_one_line_before_training(family, overrides, message, tmp_path):
    text = refused(compose_cfg([*tiny(family), *overrides], tmp_path / "run"), tmp_path)
    assert message in text and "\n" not in text, text
    assert not list(tmp_path.rglob("*.ckpt*"))


def test_one_timestep_is_refused_by_the_schedule_itself():
    """Not only through train: T = 1 leaves the bound's sum over t > 1 empty (a ZeroDivisionError
    in the test stage before)."""
    from functools import partial

    from genexp.diffusion import schedules
    from genexp.diffusion.noise_schedule import NoiseSchedule
    from genexp.errors import ConfigError

    with pytest.raises(ConfigError, match="timesteps=1: must be >= 2"):
        NoiseSchedule(partial(schedules.linear), timesteps=1)


def _read_only_cwd(tmp_path: Path) -> Path:
    """A folder no process here can create ``outputs/`` in (root writes through a chmod)."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir(mode=0o500)
        return folder
    if sys.platform != "linux":
        pytest.skip("needs a folder root cannot write")
    return Path("/sys")  # sysfs refuses mkdir, even to root


CLI = [
    # (id, arguments, what the one line says)
    (
        "recursive-interpolation",
        ["model.latent_dim=${model.latent_dim}"],
        "genexp: error: model.latent_dim=${model.latent_dim}: the interpolation refers to itself",
    ),
    ("delete-model", ["~model"], "model: missing from the config (deleted with ~model?)"),
    (
        "unicode-path",
        ["dataset=image_folder", "dataset.root={tmp}/データ"],
        "quote a value with non-ASCII characters or spaces: 'dataset.root=\"",
    ),
    ("read-only-cwd", [], "/outputs: "),
]


# a process start with torch and Lightning each (~4.5 s): the in-process named case checks the
# recursive interpolation's message, so make test-all (slow) runs its CLI twin
SLOW_CLI = ("recursive-interpolation",)


@pytest.mark.parametrize(
    "args, message",
    [pytest.param(*c[1:], id=c[0], marks=pytest.mark.slow if c[0] in SLOW_CLI else ()) for c in CLI],
)
def test_command_line_errors_are_one_line(args, message, tmp_path, request):
    cwd = _read_only_cwd(tmp_path) if request.node.callspec.id == "read-only-cwd" else tmp_path
    # TINY without a model (~model deletes it), so nothing trains for long if a case is not refused
    out = genexp("train", *[a.replace("{tmp}", str(tmp_path)) for a in args], *TINY, cwd=cwd, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("genexp: error: "), out.stderr[-3000:]
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr
    if request.node.callspec.id == "read-only-cwd":
        assert "check its permissions (outputs go under paths.log_dir=<folder>)" in out.stderr
    assert not list(tmp_path.rglob("*.ckpt*")), "nothing was trained, nothing saved"
