"""scripts/gpu_check.py's smoke path, so the GPU check cannot rot before a GPU runs it: each family's
worker trains, evaluates and resumes through the real CLI on the CPU, a broken family fails alone with
one line, the table and the JSON hold the same rows. Numbers are checked for sense, never for speed."""

from __future__ import annotations

import importlib
import json
import logging
import math
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")


@pytest.fixture
def gpu_check(monkeypatch):
    """The script's module, imported from scripts/ (logger levels restored afterwards)."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    names = ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "genexp")
    levels = {n: logging.getLogger(n).level for n in names}
    yield importlib.import_module("gpu_check")
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)


def finite_positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def table_rows(out: str) -> list[str]:
    """The markdown rows (header and separator excluded) of the script's output."""
    return [line for line in out.splitlines() if line.startswith("| ")][1:]


def check_ok_row(row: dict, steps: int, resume_steps: int) -> None:
    assert row["status"] == "ok", row
    assert row["precision"] in PRECISIONS, row
    for key in ("img_per_sec", "peak_mib", "samples_per_sec", "fid", "wall_s"):
        assert finite_positive(row.get(key)), (key, row)
    assert row["global_step"] == steps and row["resumed_step"] == steps + resume_steps, row


def test_gpu_check_smoke_one_family_ok_one_broken(gpu_check, tmp_path, capsys):
    """vae trains, is scored and resumes; ae, given an invalid size, fails in its own worker with
    genexp's one-line error and does not stop the check."""
    out_json = tmp_path / "gpu_check.json"
    gpu_check.main(
        [
            "--smoke",
            "--families",
            "vae,ae",
            "--override",
            "ae:model.latent_dim=-1",
            "--skip-ddp",
            "--json",
            str(out_json),
        ]
    )
    payload = json.loads(out_json.read_text())
    vae, ae, ddp = payload["rows"]
    check_ok_row(vae, steps=6, resume_steps=2)
    assert vae["family"] == "vae" and vae["compiled"] == []  # no torch.compile in the smoke run
    assert ae["family"] == "ae"
    assert ae["status"] == "failed (train): model.latent_dim=-1: must be >= 1", ae
    assert ddp["status"] == "skipped: --skip-ddp"

    out = capsys.readouterr().out
    assert "[1/2] vae: started" in out and "[2/2] ae: failed (train)" in out  # progress lines
    rows = table_rows(out)
    assert len(rows) == 3
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[0] == "vae" and cells[1] == vae["precision"] and cells[-1] == "ok"
    assert all(c not in ("—", "n/a") for c in cells[2:7]), cells  # img/s ... resume: every number
    assert rows[1].endswith("| failed (train): model.latent_dim=-1: must be >= 1 |")
    assert "1 ok, 1 failed, 1 skipped" in out


def test_gpu_check_refuses_an_unknown_family(gpu_check, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--smoke", "--families", "vae,no_such_family"])
    assert exit_info.value.code == 2 and "not a model option: no_such_family" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_check_smoke_two_stage_family_gan_and_ddp(gpu_check, tmp_path, capsys):
    """Latent diffusion trains its first stage by its two-stage recipe, the GAN's two optimizers
    resume, and DDP runs as 2 CPU processes (gloo) and resumes."""
    out_json = tmp_path / "gpu_check.json"
    gpu_check.main(["--smoke", "--families", "ldm,gan", "--ddp-family", "vae", "--json", str(out_json)])
    ldm, gan, ddp = json.loads(out_json.read_text())["rows"]
    check_ok_row(ldm, steps=6, resume_steps=2)
    check_ok_row(gan, steps=6, resume_steps=2)
    assert ddp["status"] == "ok" and ddp["world_size"] == 2 and ddp["family"] == "vae (DDP x2)", ddp
    assert finite_positive(ddp["img_per_sec"]) and ddp["resumed_step"] > ddp["global_step"], ddp
    assert len(table_rows(capsys.readouterr().out)) == 3
