"""``genexp report``'s "Quality against compute (NFE)" section, over fabricated run dirs: each run's
``nfe_sweep`` (as ``genexp evaluate nfe=[...]`` writes it) in one figure, a table and the NFE at
which one curve overtakes another; bad sweeps are skipped with a warning naming the file."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import compose_cfg, tiny
from omegaconf import OmegaConf
from PIL import Image
from test_nfe_sweep import sweep
from test_report import DomSummary, fake_run

from genexp.commands.report import write_report
from genexp.commands.train import train
from genexp.report import MANIFEST
from genexp.report.collect import Sweep, SweepRow, read_run
from genexp.report.nfe import crossing

NFES = [4, 8, 16, 32, 64]
# FID at NFE 4..64, and ms/sample. Euler is ahead of DDIM up to NFE 8, DDIM from 16 on; DPM-Solver++
# beats Euler everywhere and DDIM up to 32 (DDIM's 7.0 < 7.5 at 64).
EULER = ([40.0, 25.0, 15.0, 10.0, 8.0], [2.0, 4.0, 8.0, 16.0, 32.0])
DDIM = ([60.0, 30.0, 14.0, 9.0, 7.0], [2.5, 5.0, 10.0, 20.0, 40.0])
DPM = ([20.0, 12.0, 9.0, 8.0, 7.5], [2.6, 5.2, 10.4, 20.8, 41.6])


def rows(fids: list[float], ms: list[float], nfes=NFES) -> list[dict]:
    """Rows as genexp evaluate writes them (fidelity keys for the metrics asked: fid, kid)."""
    return [
        {
            "nfe_requested": n,
            "nfe": n,
            "steps": n,
            "fid": f,
            "kid_mean": f / 1000,
            "kid_std": 0.001,
            "samples_per_sec": 1000 / m,
            "ms_per_sample": m,
        }
        for n, f, m in zip(nfes, fids, ms, strict=True)
    ]


def swept_run(root: Path, family: str, seed: int, option: str, name: str, sweep_rows) -> Path:
    """A finished, evaluated run dir whose evaluation.json holds an nfe_sweep."""
    run = fake_run(root, family, seed, {"test": {"test/loss": 1.0}}, {"fid": 10.0})
    evaluation = json.loads((run / "evaluation.json").read_text())
    evaluation["nfe_sweep"] = {"option": option, "name": name, "rows": sweep_rows}
    (run / "evaluation.json").write_text(json.dumps(evaluation))
    return run


@pytest.fixture
def three_sweeps(tmp_path) -> Path:
    swept_run(tmp_path, "flow_matching", 0, "solver", "EulerSolver", rows(*EULER))
    swept_run(tmp_path, "ddpm", 0, "sampler", "DDIMSampler", rows(*DDIM))
    swept_run(tmp_path, "ddpm", 1, "sampler", "DPMSolverPPSampler", rows(*DPM))
    return tmp_path


CROSSINGS = [
    # label order: "Diffusion, DDPM · DDIMSampler", "Diffusion, DDPM · DPMSolverPPSampler", "Flow matching · ..."
    "ddpm·DDIMSampler beats ddpm·DPMSolverPPSampler from NFE 64 on "
    "(ddpm·DPMSolverPPSampler is ahead up to NFE 32: the curves cross between NFE 32 and 64)",
    "ddpm·DDIMSampler beats flow_matching·EulerSolver from NFE 16 on "
    "(flow_matching·EulerSolver is ahead up to NFE 8: the curves cross between NFE 8 and 16)",
    "ddpm·DPMSolverPPSampler beats flow_matching·EulerSolver at every NFE both have (4, 8, 16, 32, 64)",
]


def test_the_report_shows_every_sweep_in_one_figure_a_table_and_where_the_curves_cross(three_sweeps):
    html_path, md_path = write_report(three_sweeps)
    md, page = md_path.read_text(), html_path.read_text()
    assert "## Quality against compute (NFE)" in md and "Quality against compute (NFE)</h2>" in page
    assert "![FID against NFE and against ms/sample](images/nfe_sweep.png)" in md
    header = next(line for line in md.splitlines() if line.startswith("| family | solver / sampler |"))
    assert header.count("NFE 4: FID ↓") == 1 and header.endswith("| NFE 64: FID ↓ | NFE 64: ms/sample ↓ |")
    # one row per run: family label, solver, run, then FID and ms/sample at each NFE (fmt: 3 digits)
    assert (
        "| Flow matching | EulerSolver (solver) | flow_matching-seed0 | 40 | 2 | 25 | 4 | 15 | 8 | 10 | 16 | 8 | 32 |"
        in md
    )
    assert (
        "| Diffusion, DDPM | DPMSolverPPSampler (sampler) | ddpm-seed1 | 20 | 2.6 | 12 | 5.2 | 9 | 10.4 |"
        in md
    )
    for sentence in CROSSINGS:
        assert f"- {sentence}" in md and f"<li>{sentence}</li>" in page
    assert "No sweep in" not in md  # every run has one

    image = three_sweeps / "report" / "images" / "nfe_sweep.png"
    with Image.open(image) as im:
        im.load()
        assert im.format == "PNG" and im.width > 300 and im.height > 100
    manifest = json.loads((three_sweeps / "report" / MANIFEST).read_text())
    assert manifest["files"]["images/nfe_sweep.png"] == hashlib.sha256(image.read_bytes()).hexdigest()


def test_a_report_again_replaces_its_figure_and_removes_it_when_no_sweep_is_left(three_sweeps):
    write_report(three_sweeps)
    for run in three_sweeps.glob("*-seed*"):  # the sweeps gone: evaluation.json without nfe_sweep
        evaluation = json.loads((run / "evaluation.json").read_text())
        del evaluation["nfe_sweep"]
        (run / "evaluation.json").write_text(json.dumps(evaluation))
    _, md_path = write_report(three_sweeps)
    assert not (three_sweeps / "report" / "images" / "nfe_sweep.png").exists()  # the report's own file
    assert "images/nfe_sweep.png" not in json.loads((three_sweeps / "report" / MANIFEST).read_text())["files"]


def test_runs_without_a_sweep_leave_the_section_out_and_are_named_beside_one(tmp_path):
    fake_run(tmp_path, "gan", 0, {"test": {"test/loss": 1.0}}, {"fid": 10.0})
    html_path, md_path = write_report(tmp_path)
    assert "Quality against compute" not in md_path.read_text()
    assert "Quality against compute" not in html_path.read_text()
    assert not (tmp_path / "report" / "images" / "nfe_sweep.png").exists()

    swept_run(tmp_path, "flow_matching", 0, "solver", "EulerSolver", rows(*EULER))
    md = write_report(tmp_path)[1].read_text()
    assert "No sweep in gan-seed0: genexp evaluate ckpt=<run> nfe='[4,8,16,32,64]' adds one." in md
    assert "| Flow matching | EulerSolver (solver) | flow_matching-seed0 |" in md
    assert "| Diffusion" not in md and "gan-seed0 |" not in md.split("## Quality against compute")[1]


def test_a_corrupt_sweep_is_skipped_with_a_warning_naming_the_file_and_the_report_renders(tmp_path, caplog):
    good = rows(*EULER)
    bad_rows = [
        good[0],
        {**good[1], "fid": "nan"},  # a string, not a number
        {**good[2], "fid": float("inf")},  # json.dumps writes Infinity; json.loads reads it back
        "a row",
        {**good[3], "nfe": None},  # kept: the NFE asked stands in for the NFE spent
        {**good[3], "nfe": None, "nfe_requested": "32"},
        {**good[0], "fid": 99.0},  # NFE 4 again
        good[4],
    ]
    swept_run(tmp_path, "flow_matching", 0, "solver", "EulerSolver", bad_rows)
    swept_run(tmp_path, "ddpm", 0, "bogus", 7, {"not": "a list"})
    swept_run(tmp_path, "ddpm", 1, ["sampler"], None, [{"fid": float("nan"), "nfe": 4, "ms_per_sample": 1}])
    with caplog.at_level(logging.WARNING, logger="genexp"):
        html_path, md_path = write_report(tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    fm = tmp_path / "flow_matching-seed0" / "evaluation.json"
    assert f"report: skipping row 1 of {fm}'s nfe_sweep (no finite fid)" in warnings
    assert f"report: skipping row 2 of {fm}'s nfe_sweep (no finite fid)" in warnings
    assert f"report: skipping row 3 of {fm}'s nfe_sweep (no finite nfe, fid, ms_per_sample)" in warnings
    assert f"report: skipping row 5 of {fm}'s nfe_sweep (no finite nfe)" in warnings
    assert f"report: skipping row 6 of {fm}'s nfe_sweep (NFE 4 again)" in warnings
    ddpm0, ddpm1 = (tmp_path / f"ddpm-seed{s}" / "evaluation.json" for s in (0, 1))
    assert any(w.startswith(f"report: skipping {ddpm0}'s nfe_sweep (no list of rows)") for w in warnings)
    assert any(
        w.startswith(f"report: skipping {ddpm1}'s nfe_sweep (no row with finite numbers)") for w in warnings
    )
    assert len(warnings) == 8  # ddpm-seed1: its one row, then its sweep

    sweep = read_run(tmp_path / "flow_matching-seed0").sweep
    assert [(r.nfe_requested, r.nfe, r.fid) for r in sweep.rows] == [
        (4, 4, 40.0),
        (32, 32, 10.0),
        (64, 64, 8.0),
    ]
    md = md_path.read_text()
    assert "| Flow matching | EulerSolver (solver) | flow_matching-seed0 | 40 | 2 | 10 | 16 | 8 | 32 |" in md
    assert "No sweep in ddpm-seed0, ddpm-seed1" in md and "## Summary" in md and "## Runs" in md
    assert "Quality against compute (NFE)</h2>" in html_path.read_text()


def test_a_sweep_with_bad_option_or_name_keeps_its_rows(tmp_path):
    swept_run(tmp_path, "ddpm", 0, "bogus", 7, rows(*DDIM))
    sweep = read_run(tmp_path / "ddpm-seed0").sweep
    assert (sweep.option, sweep.name, len(sweep.rows)) == ("?", "?", 5)


def _sweep(fids: dict[float, float], spent: dict[float, float] | None = None) -> Sweep:
    spent = spent or {}
    return Sweep("solver", "S", tuple(SweepRow(n, spent.get(n, n), f, 1.0) for n, f in sorted(fids.items())))


@pytest.mark.parametrize(
    ("a", "b", "sentence"),
    [
        ({4: 1, 8: 1}, {4: 2, 8: 2, 16: 0}, "A beats B at every NFE both have (4, 8)"),  # 16: only B has it
        ({4: 3, 8: 3}, {4: 2, 8: 2}, "B beats A at every NFE both have (4, 8)"),
        (
            {4: 1, 8: 3, 16: 3},
            {4: 2, 8: 2, 16: 2},
            "B beats A from NFE 8 on (A is ahead up to NFE 4: the curves cross between NFE 4 and 8)",
        ),
        ({4: 2, 8: 2}, {4: 2, 8: 2}, "A and B tie at every NFE both have (4, 8)"),
        (
            {4: 1, 8: 3, 16: 1},
            {4: 2, 8: 2, 16: 2},
            "A and B cross more than once: A at NFE 4, 16; B at NFE 8",
        ),
        (
            {4: 1, 8: 2, 16: 3},
            {4: 2, 8: 2, 16: 2},
            "A and B cross more than once: A at NFE 4; B at NFE 16; tie at NFE 8",
        ),
        ({4: 1}, {8: 1}, "A and B share no NFE: not compared"),
    ],
)
def test_where_two_curves_cross(a, b, sentence):
    assert crossing("A", _sweep(a), "B", _sweep(b)) == sentence


def test_curves_are_compared_at_the_nfe_asked_for_and_the_table_shows_the_nfe_spent(tmp_path):
    heun = rows([30.0, 12.0], [4.0, 8.0], nfes=[4, 8])
    heun[0]["nfe"], heun[1]["nfe"] = 3, 7  # Heun on the EDM grid: 2 x steps - 1 evaluations
    swept_run(tmp_path, "ddpm", 0, "sampler", "HeunSampler", heun)
    swept_run(
        tmp_path, "flow_matching", 0, "solver", "EulerSolver", rows([40.0, 25.0], [2.0, 4.0], nfes=[4, 8])
    )
    md = write_report(tmp_path)[1].read_text()
    assert "| Diffusion, DDPM | HeunSampler (sampler) | ddpm-seed0 | 30 (NFE 3) | 4 | 12 (NFE 7) | 8 |" in md
    assert "- ddpm·HeunSampler beats flow_matching·EulerSolver at every NFE both have (4, 8)" in md


def test_the_section_renders_in_chromium_with_its_figure_loaded(three_sweeps):
    """Headless Chromium loads the page from disk (as tests/test_report.py does); the page's own
    script marks the figure's load state and natural width in the DOM."""
    page, _ = write_report(three_sweeps)
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        if os.environ.get("GENEXP_ALLOW_NO_BROWSER") == "1":
            pytest.skip("no chromium here and GENEXP_ALLOW_NO_BROWSER=1 (make test installs it)")
        pytest.fail(
            "chromium not found: make test installs it (apt); or set GENEXP_ALLOW_NO_BROWSER=1 locally"
        )
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    parsed = DomSummary()
    parsed.feed(dom.stdout)
    assert parsed.body.get("data-images-loaded") == "1/1", parsed.body  # the fake runs have no grids
    (img,) = parsed.images
    assert img["src"] == "images/nfe_sweep.png" and img["class"] == "nfe"
    assert img["data-loaded"] == "yes" and int(img["data-natural-width"]) > 0, img
    assert [row[2] for row in parsed.rows["nfe"]] == ["ddpm-seed0", "ddpm-seed1", "flow_matching-seed0"]
    assert parsed.rows["nfe"][2][3:5] == ["40", "2"]


@pytest.mark.slow
def test_report_over_runs_genexp_evaluate_swept(tmp_path):
    """End to end: two tiny trained families, ``genexp evaluate nfe=[2,4]`` on each, then the report
    reads the sweeps evaluate wrote (the file format is evaluate's, not a fabricated one)."""
    fast = ["~callbacks.sample_grid", "trainer.limit_train_batches=1", "data.batch_size=8"]
    for family, option in (("flow_matching", []), ("ddpm", ["sampler=ddim"])):
        cfg = compose_cfg([*tiny(family), *fast], tmp_path / family)
        train(cfg)
        sweep(tmp_path / family, "[2,4]", *option)
        # what the CLI's Hydra run dir holds beside (compose_cfg skips it): the config, the choices
        (tmp_path / family / ".hydra").mkdir(exist_ok=True)
        (tmp_path / family / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        choices = {"hydra": {"runtime": {"choices": {"model": family, "dataset": "synthetic"}}}}
        (tmp_path / family / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(choices))
    runs = {p.name: read_run(p) for p in (tmp_path / "flow_matching", tmp_path / "ddpm")}
    for run in runs.values():
        assert run.sweep is not None and [r.nfe_requested for r in run.sweep.rows] == [2, 4], run.evaluation
    _, md_path = write_report(tmp_path)
    md = md_path.read_text()
    section = md.split("## Quality against compute (NFE)")[1].split("## Samples")[0]
    for name, run in runs.items():
        assert f"| {run.sweep.name} ({run.sweep.option}) | {name} |" in section
    assert sum(line.startswith("- ") for line in section.splitlines()) == 1  # one pair, one sentence
    with Image.open(tmp_path / "report" / "images" / "nfe_sweep.png") as im:
        assert im.format == "PNG" and im.width > 0
