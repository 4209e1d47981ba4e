"""End-to-end runs in-process on tiny synthetic data: files, checkpoints, resume, loggers, errors."""

from __future__ import annotations

import csv
import json
import os
import pickle
import time

import hydra
import pytest
import torch
from conftest import group_options

from genexp.commands.train import train
from genexp.errors import GenexpError


def read_json(path):
    return json.loads(path.read_text())


def saved_config_target(run):
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["genexp"]["config"]["model"]["_target_"]


@pytest.mark.parametrize("option", group_options("model"))
def test_a_few_steps_per_family_write_every_output(option, tiny_cfg, tmp_path, request):
    if option == "ldm":
        request.getfixturevalue("first_stage_run")  # sets GENEXP_TEST_FIRST_STAGE
    metrics = train(tiny_cfg(model=option))
    run = tmp_path / "run"
    assert metrics["global_step"] == 3  # one step per batch (for a GAN: G steps, whatever n_critic)
    saved = read_json(run / "metrics.json")
    assert saved["global_step"] == 3 and saved["num_parameters"] > 0 and saved["train_img_per_sec"] > 0
    assert saved["wall_time_s"] > 0 and saved["test"] and saved["test"] == pytest.approx(metrics["test"])
    assert all(k.startswith("test/") for k in saved["test"])
    for name in ("last.ckpt", "best.ckpt"):
        ckpt = torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)
        config = ckpt["genexp"]["config"]
        assert isinstance(config, dict) and config["model"]["_target_"].split(".")[
            -1
        ].lower() == option.replace("_", "")
        assert "hyper_parameters" not in ckpt  # no pickled objects: the config above rebuilds the run
    # the grids that exist depend on the family's optional methods
    kinds = ["samples"]
    family = hydra.utils.get_class(saved_config_target(run))
    kinds += ["reconstructions"] if hasattr(family, "reconstruct") else []
    kinds += ["latents"] if hasattr(family, "encode") else []
    for kind in kinds:
        png = run / "samples" / f"epoch_001_{kind}.png"
        assert png.is_file() and png.stat().st_size > 100, png


def test_vae_reports_its_bits_per_dim_bound(tiny_cfg):
    metrics = train(tiny_cfg(model="vae"))
    bpd = metrics["test"]["test/bpd"]
    assert 0 < bpd < 1e4
    assert {"test/recon", "test/kl", "test/elbo"} <= set(metrics["test"])


def test_resume_continues_step_count_and_metrics(tiny_cfg, tmp_path):
    first = train(tiny_cfg("logger=csv"))
    assert first["global_step"] == 3
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    assert int(state["state_dict"]["model.num_steps"]) == 3
    second = train(tiny_cfg("logger=csv", "trainer.max_epochs=2", f"ckpt_path={tmp_path / 'run'}"))
    assert second["global_step"] == 6 and second["epochs"] == 2
    state = torch.load(ckpt, weights_only=True)
    assert int(state["state_dict"]["model.num_steps"]) == 6  # the model's own counter resumed too
    assert len(state["optimizer_states"]) == 1 and state["optimizer_states"][0]["state"]
    rows = list(csv.DictReader((tmp_path / "run" / "csv" / "metrics.csv").open()))
    steps = sorted({int(r["step"]) for r in rows if r.get("train/loss")})
    assert steps[0] == 0 and steps[-1] >= 3, "the resumed run appends after the first run's rows"


def test_resume_refuses_a_checkpoint_of_another_family(tiny_cfg, tmp_path):
    train(tiny_cfg(model="ae"))
    with pytest.raises(GenexpError, match="checkpoint of genexp.models.ae.AE"):
        train(tiny_cfg(f"ckpt_path={tmp_path / 'run'}", model="vae"))


def test_truncated_checkpoint_gives_a_clear_error(tiny_cfg, tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(GenexpError, match="cannot load it safely"):
        train(tiny_cfg(f"ckpt_path={bad}"))


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_malicious_checkpoint_is_refused_and_runs_nothing(tiny_cfg, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "genexp": _Evil(marker)}, evil)
    with pytest.raises(GenexpError, match="cannot load it safely"):
        train(tiny_cfg(f"ckpt_path={evil}"))
    assert not marker.exists()
    with evil.open("wb") as f:
        pickle.dump(_Evil(marker), f)
    with pytest.raises(GenexpError):
        train(tiny_cfg(f"ckpt_path={evil}"))
    assert not marker.exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lr=-0.1", r"optimizer\.lr=-0\.1: must be > 0"),
        ("optimizer.lr=0", r"optimizer\.lr=0: must be > 0"),
        ("optimizer.lr=fast", r"optimizer\.lr='fast': must be a number"),
        ("model.latent_dim=0", r"model\.latent_dim=0: must be >= 1"),
        ("model.latent_dim=abc", r"model\.latent_dim='abc': must be an integer"),
        ("model.beta=-1", r"model\.beta=-1\.?0?: must be >= 0"),
        (
            "model.likelihood=gauss",
            r"model\.likelihood='gauss': must be one of bernoulli, discretized_logistic",
        ),
        ("dataset.image_size=30", r"model\.image_size=30: the conv nets need a multiple of 4"),
        ("data.batch_size=0", r"data\.batch_size=0: must be >= 1"),
        ("trainer.max_epochs=many", r"trainer\.max_epochs='many': must be an integer"),
        ("seed=-3", r"seed=-3: must be >= 0"),
        ("optimizer.betas=[0.9,2.0]", r"optimizer\.betas=\[0\.9, 2\.0\]: must be 2 numbers in \[0, 1\)"),
    ],
)
def test_bad_values_fail_before_training_naming_the_key(override, message, tiny_cfg, tmp_path):
    with pytest.raises(GenexpError, match=message) as err:
        train(tiny_cfg(override))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_csv_and_tensorboard_loggers_write_their_files(tiny_cfg, tmp_path):
    train(tiny_cfg("logger=csv", "lr_scheduler=warmup_cosine", "lr_scheduler.warmup_steps=2"))
    rows = list(csv.DictReader((tmp_path / "run" / "csv" / "metrics.csv").open()))
    keys = set(rows[0])
    assert {"train/loss", "train/lr", "val/loss", "val/bpd", "test/bpd"} <= keys
    lrs = [float(r["train/lr"]) for r in rows if r.get("train/lr")]
    assert lrs[0] < lrs[1], "warm-up raises the LR"


def test_tensorboard_logger_writes_events(tiny_cfg, tmp_path):
    train(tiny_cfg("logger=tensorboard"))
    assert list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))


def test_wandb_offline_run_holds_the_logged_images_and_config(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    train(tiny_cfg("logger=wandb", "logger.name=test"))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    images = {p.name.split("_")[0] for p in (runs[0] / "files" / "media" / "images" / "val").glob("*.png")}
    assert {"samples", "reconstructions", "latents"} <= images
    # the resolved config as a plain dict: its values sit in the run's protobuf log as JSON text
    record_file = next(runs[0].glob("run-*.wandb"))
    for _ in range(100):  # wandb's service flushes the record file shortly after finish()
        if b"genexp.models.vae.VAE" in record_file.read_bytes():
            break
        time.sleep(0.1)
    record = record_file.read_bytes()
    assert b"genexp.models.vae.VAE" in record and b"latent_dim" in record
    # resuming reuses the wandb run id
    first_id = runs[0].name.rsplit("-", 1)[1]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["genexp"]["wandb_id"] == first_id
    train(
        tiny_cfg("logger=wandb", "logger.name=test", "trainer.max_epochs=2", f"ckpt_path={tmp_path / 'run'}")
    )
    # offline-run-<time>-<id>, and -1 after it when both runs started within the same second
    ids = {p.name.split("-")[3] for p in (tmp_path / "run" / "wandb").glob("offline-run-*")}
    assert ids == {first_id}


def test_progress_bar_in_a_terminal_plain_lines_otherwise(tiny_cfg, capsys, caplog, monkeypatch):
    import logging

    caplog.set_level(logging.INFO, logger="genexp")
    train(tiny_cfg())
    assert "Epoch 0" not in capsys.readouterr().out
    assert any("epoch 1/1 (step 3" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    train(tiny_cfg())
    assert "Epoch 0" in capsys.readouterr().out
    train(tiny_cfg("trainer.enable_progress_bar=false"))
    assert "Epoch 0" not in capsys.readouterr().out


def test_callbacks_none_writes_no_checkpoints(tmp_path):
    from conftest import compose_cfg, tiny

    overrides = [o for o in tiny("vae") if not o.startswith("callbacks.")] + ["callbacks=none"]
    metrics = train(compose_cfg(overrides, tmp_path / "run"))
    assert metrics["best_checkpoint"] is None
    assert not list(tmp_path.rglob("*.ckpt"))
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_resume_mid_epoch_with_max_steps(tmp_path):
    """A run stopped by max_steps resumes where it stopped, inside an epoch or on an epoch's end."""
    from conftest import compose_cfg, tiny

    for stop, resume_to in ((2, 5), (6, 8)):  # 3 batches an epoch
        run = tmp_path / f"run{stop}"
        first = train(compose_cfg([*tiny(), f"trainer.max_steps={stop}", "trainer.max_epochs=-1"], run))
        assert first["global_step"] == stop
        again = [*tiny(), f"trainer.max_steps={resume_to}", "trainer.max_epochs=-1", f"ckpt_path={run}"]
        assert train(compose_cfg(again, run))["global_step"] == resume_to
