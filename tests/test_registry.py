"""A config constructs only registered targets, on every route a config takes (issue: security).

Each payload is real: it names ``genexp.commands.compare.run_logged`` (which starts ``cmd`` as a process) or
``genexp.atomic.write_json`` (which writes a file), both defined in genexp, so the old prefix
allow-list let them through. Each test asserts the marker file the payload would create does not
exist and that the error is one line.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CONFIG_ROOT, TINY, compose_cfg, tiny
from omegaconf import OmegaConf
from test_cli import genexp
from test_sample_cli import compose_app

from genexp import build
from genexp.build import build_model
from genexp.commands.train import train
from genexp.errors import GenexpError

REFUSED = "not a configurable target; configs construct only the classes genexp registers"


def run_command(marker: Path) -> dict:
    """A config node that, if constructed, starts ``touch marker`` as a process."""
    return {
        "_target_": "genexp.commands.compare.run_logged",
        "cmd": ["sh", "-c", f"touch {marker}"],
        "label": "x",
    }


def write_file(marker: Path) -> dict:
    """A config node that, if constructed, writes ``marker``."""
    return {"_target_": "genexp.atomic.write_json", "path": str(marker), "payload": {"pwned": True}}


def one_line(err: pytest.ExceptionInfo, *parts: str) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    for part in parts:
        assert part in text, text
    return text


def crafted(run: Path, tmp: Path, edit) -> Path:
    """A weights-only copy of ``run``'s last.ckpt whose stored config ``edit`` changed."""
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    edit(ckpt["genexp"]["config"])
    path = tmp / "crafted.ckpt"
    torch.save(ckpt, path)
    return path


# ------------------------------------------------------------------ the registry itself


def test_every_target_the_config_tree_names_is_registered_and_nothing_else_of_genexp():
    """The registry and configs/ agree: every ``_target_`` there is registered, and every genexp
    name registered is one that configs/ names and that exists."""
    from hydra._internal.utils import _locate

    named = set()
    for path in CONFIG_ROOT.rglob("*.yaml"):
        for line in path.read_text().splitlines():
            if line.strip().startswith("_target_:"):
                named.add(line.split(":", 1)[1].split("#")[0].strip())
    assert named, "no targets found under configs/"
    assert build.registered(sorted(named)) == [], "configs/ names unregistered targets"
    ours = {t for t in build.REGISTRY if t.startswith("genexp.")}
    assert ours == {t for t in named if t.startswith("genexp.")}
    for target in ours | {"torch.optim.Adam", "pytorch_lightning.Trainer"}:
        assert callable(_locate(target)), target


@pytest.mark.parametrize(
    "target",
    [
        "genexp.commands.compare.run_logged",  # starts a process
        "genexp.atomic.write_json",  # writes a file
        "genexp.cli.os.system",  # reaches os.system through a module attribute
        "genexp.models.vae.torch.load",
        "torch.optim.Optimizer.__init__",
        "pytorch_lightning.core.saving.save_hparams_to_yaml",  # writes a file
        "builtins.eval",
    ],
)
def test_functions_defined_in_allowed_packages_are_not_configurable(target, tmp_path):
    from hydra._internal.utils import _locate

    # a payload that no longer exists would be refused whatever the registry does: keep them real
    assert callable(_locate(target)), f"{target} is gone: point the payload at what replaced it"
    marker = tmp_path / "pwned"
    node = OmegaConf.create({"_target_": target, "_args_": [f"touch {marker}"]})
    with pytest.raises(GenexpError) as err:
        build.instantiate(node, "callbacks.evil")
    one_line(err, f"callbacks.evil._target_={target}: {REFUSED}")
    assert not marker.exists()


def test_a_python_plugin_registers_its_own_class(monkeypatch):
    monkeypatch.setattr(build, "REGISTRY", set(build.REGISTRY))
    node = OmegaConf.create({"_target_": "collections.OrderedDict"})
    with pytest.raises(GenexpError):
        build.instantiate(node, "model")
    build.register("collections.OrderedDict")
    assert build.instantiate(node, "model") == {}
    with pytest.raises(ValueError):
        build.register("notdotted")


# ------------------------------------------------------------------ the routes


def test_command_line_callback_that_starts_a_process_is_refused_before_any_build(tmp_path):
    marker = tmp_path / "pwned"
    evil = [
        "++callbacks.evil._target_=genexp.commands.compare.run_logged",
        f"++callbacks.evil.cmd=[sh,-c,'touch {marker}']",
        "++callbacks.evil.label=x",
    ]
    with pytest.raises(GenexpError) as err:
        train(compose_cfg([*tiny("vae"), *evil], tmp_path / "run"))
    one_line(err, "callbacks.evil._target_=genexp.commands.compare.run_logged: " + REFUSED)
    assert not marker.exists() and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("where", ["model", "model.net", "dataset"])
@pytest.mark.parametrize("payload", [run_command, write_file], ids=["process", "file"])
def test_checkpoint_config_cannot_run_code_through_sample(first_stage_run, tmp_path, where, payload):
    """``genexp sample ckpt=`` of a weights-only checkpoint whose stored config names a payload."""
    from genexp.commands.sample import sample

    marker = tmp_path / "pwned"

    def edit(config):
        node = config
        *parents, last = where.split(".")
        for part in parents:
            node = node[part]
        node[last] = payload(marker)

    path = crafted(first_stage_run, tmp_path, edit)
    with pytest.raises(GenexpError) as err:
        sample(compose_app("sample", [f"ckpt={path}", f"out={tmp_path / 'out'}"]))
    one_line(err, f"{where}._target_=genexp.", REFUSED)
    assert not marker.exists() and not list(tmp_path.glob("out/*"))


@pytest.mark.parametrize(
    "node, payload, target",
    [
        ("dataset", "write_file", "genexp.atomic.write_json"),  # writes a file
        ("model", "run_command", "genexp.commands.compare.run_logged"),  # starts a process
    ],
)
def test_checkpoint_config_cannot_run_code_through_evaluate(first_stage_run, tmp_path, node, payload, target):
    """``genexp evaluate`` builds the stored model and dataset: a payload in either is refused first."""
    from genexp.commands.evaluate import evaluate

    marker = tmp_path / "pwned"
    make = {"write_file": write_file, "run_command": run_command}[payload]
    path = crafted(first_stage_run, tmp_path, lambda c: c.update({node: make(marker)}))
    with pytest.raises(GenexpError) as err:
        evaluate(compose_app("evaluate", [f"ckpt={path}", "metrics=[recon]", f"out={tmp_path / 'e.json'}"]))
    one_line(err, f"{node}._target_={target}: " + REFUSED)
    assert not marker.exists()


def test_checkpoint_config_cannot_run_code_as_a_first_stage(first_stage_run, tmp_path):
    """``genexp train model=ldm model.first_stage=<crafted.ckpt>``."""
    marker = tmp_path / "pwned"
    path = crafted(first_stage_run, tmp_path, lambda c: c.update(model=run_command(marker)))
    with pytest.raises(GenexpError) as err:
        build_model(compose_cfg(["model=ldm", "dataset=synthetic", f"model.first_stage={path}"], tmp_path))
    one_line(
        err, f"model.first_stage={path}: ", "model._target_=genexp.commands.compare.run_logged: " + REFUSED
    )
    assert not marker.exists()


def test_stored_interpolations_are_data_not_resolved(first_stage_run, tmp_path, monkeypatch):
    """A stored ``${oc.env:SECRET}`` stays that text: the environment never reaches the outputs."""
    from genexp.checkpoints import load_model
    from genexp.commands.sample import sample

    monkeypatch.setenv("GENEXP_TEST_SECRET", "hunter2")
    text = "${oc.env:GENEXP_TEST_SECRET}"
    path = crafted(first_stage_run, tmp_path, lambda c: c["dataset"].update(name=text))
    loaded = load_model(str(path))
    assert OmegaConf.to_container(loaded.config, resolve=True)["dataset"]["name"] == text
    result = sample(compose_app("sample", [f"ckpt={path}", f"out={tmp_path / 'out'}", "n=4"]))
    written = b"".join(p.read_bytes() for p in Path(result.npz).parent.iterdir())
    assert b"hunter2" not in written


def _fake_run_dir(source: Path, tmp: Path, overrides: list[str]) -> Path:
    """A run dir holding ``source``'s checkpoints whose ``.hydra/overrides.yaml`` is ``overrides``."""
    run = tmp / "victim"
    shutil.copytree(source / "checkpoints", run / "checkpoints")
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / ".hydra" / "config.yaml").write_text("{}\n")
    return run


def test_replayed_overrides_cannot_run_a_command_or_read_the_environment(first_stage_run, tmp_path):
    """``genexp train ckpt_path=<run dir>`` replays the run's overrides: a payload someone appended
    to them is refused before anything is built, and so is a resolver."""
    marker = tmp_path / "pwned"
    evil = [
        "++callbacks.evil._target_=genexp.commands.compare.run_logged",
        f"++callbacks.evil.cmd=[sh,-c,'touch {marker}']",
        "++callbacks.evil.label=x",
    ]
    run = _fake_run_dir(first_stage_run, tmp_path, [*tiny("vae"), "trainer.max_epochs=3", *evil])
    out = genexp("train", f"ckpt_path={run}", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count(
        "\n"
    ) == 1 and "callbacks.evil._target_=genexp.commands.compare.run_logged: " + REFUSED in (out.stderr), (
        out.stderr
    )
    assert not marker.exists()
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["paths.data_dir=${oc.env:HOME}"]))
    out = genexp("train", f"ckpt_path={run}", cwd=tmp_path)
    assert out.returncode == 2 and "which calls a resolver; a replayed override is data" in out.stderr, (
        out.stderr
    )


@pytest.mark.parametrize(
    "group, text",
    [
        pytest.param(  # the route of tests/test_errors.py's searchpath case (subprocess.run): make test-all
            "model/evil.yaml",
            "# @package _global_\nmodel:\n  _target_: genexp.commands.compare.run_logged\n  cmd: [sh, -c, 'touch {marker}']\n"
            "  label: x\nmonitor:\n  metric: val/loss\n  mode: min\n",
            marks=pytest.mark.slow,
        ),
        (
            "model/evil.yaml",  # Hydra builds hydra.callbacks itself, before any genexp code runs
            "# @package _global_\ndefaults:\n  - vae\n  - _self_\nhydra:\n  callbacks:\n    evil:\n"
            "      _target_: genexp.commands.compare.run_logged\n      cmd: [sh, -c, 'touch {marker}']\n      label: x\n",
        ),
    ],
    ids=["model-group", "hydra-callbacks"],
)
def test_user_config_group_cannot_run_a_command(tmp_path, group, text):
    marker = tmp_path / "pwned"
    (tmp_path / "mine" / Path(group).parent).mkdir(parents=True)
    (tmp_path / "mine" / group).write_text(text.format(marker=marker))
    out = genexp("train", f"hydra.searchpath=[file://{tmp_path / 'mine'}]", "model=evil", *TINY, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "_target_=genexp.commands.compare.run_logged: " + REFUSED in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
    assert not marker.exists()
