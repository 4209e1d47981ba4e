"""``genexp report <sweep dir>``: a search's section (the best trial's config, every trial ranked by
the objective, the objective against each parameter, the optimisation history) and a grid's (the
same table, the metric per override value), on one page that headless Chromium renders."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import TINY
from test_cli import genexp
from test_optuna_sweep import trials, vae_study  # noqa: F401 - the session's 3-trial study (a fixture)
from test_report import chromium, fake_run, rendered_dom, screenshot

from genexp.commands.report import write_report
from genexp.report.collect import read_run
from genexp.report.sweep import read_section


def report(sweep: Path, out: Path) -> tuple[str, str]:
    html, md = write_report(sweep, out)
    return html.read_text(), md.read_text()


def md_rows(md: str, header: str) -> list[list[str]]:
    """The body rows of the Markdown table whose header row starts with ``header``."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_a_search_report_ranks_every_trial_and_shows_the_best_ones_config(vae_study, tmp_path):  # noqa: F811
    html, md = report(vae_study, tmp_path / "r")
    found = sorted(trials(vae_study), key=lambda t: t.value)
    rows = md_rows(md, "trial")
    assert [row[0] for row in rows] == [f"#{t.number}" for t in found]  # best (lowest test/bpd) first
    assert [float(row[2]) for row in rows] == sorted(float(row[2]) for row in rows)
    best = found[0]
    assert f"**Best #{best.number}**: test/bpd = {best.value:.6g}" in md
    assert f"`optimizer.lr={best.params['optimizer.lr']}`" in md
    config = (vae_study / f"{best.number}-vae-synthetic" / ".hydra" / "config.yaml").read_text()
    assert "<details><summary>its config" in html and "_target_: genexp.models.vae.VAE" in config
    assert config.splitlines()[0] in html  # the best trial's whole config, folded
    for image in ("sweep_params.png", "sweep_history.png"):
        assert (tmp_path / "r" / "images" / image).stat().st_size > 5_000, image
    again = genexp("report", str(vae_study), "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr  # the report's own images are replaced, not refused


def test_the_search_page_renders_in_chromium_with_its_figures(vae_study, tmp_path):  # noqa: F811
    flags = chromium()
    page = Path(write_report(vae_study, tmp_path / "r")[0])
    parsed = rendered_dom(flags, page)
    sources = [img["src"] for img in parsed.images]
    assert "images/sweep_params.png" in sources and "images/sweep_history.png" in sources
    assert all(img.get("data-loaded") == "yes" for img in parsed.images), parsed.images
    found = sorted(trials(vae_study), key=lambda t: t.value)
    assert [row[0] for row in parsed.rows["sweep"]] == [f"#{t.number}" for t in found]
    assert [row[1] for row in parsed.rows["sweep"]] == ["COMPLETE"] * 3
    assert parsed.rows["summary"][0][:2] == ["Variational autoencoder (vae)", "3/3"]  # the rest of the page
    screenshot(flags, page, "report_search.png", "1200,1800")


def test_a_grid_report_ranks_its_runs_and_plots_the_metric_per_override_value(tmp_path):
    sweep = tmp_path / "grid"
    out = genexp(
        "train",
        "-m",
        *TINY,
        "model.base_channels=8",
        "model.latent_dim=2,8",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    html, md = report(sweep, tmp_path / "r")
    assert "## Grid sweep" in md and "ranked by test/bpd" in md
    rows = md_rows(md, "run")
    bpd = {
        p.name: json.loads((p / "metrics.json").read_text())["test"]["test/bpd"]
        for p in sweep.glob("*-vae-*")
    }
    assert [row[0] for row in rows] == sorted(bpd, key=bpd.get)
    assert {row[3] for row in rows} == {"2", "8"}  # the override that differs, one column
    assert (tmp_path / "r" / "images" / "sweep_params.png").is_file()
    assert not (tmp_path / "r" / "images" / "sweep_history.png").exists()  # a grid has no history


def test_failed_and_interrupted_trials_rank_last_and_maximize_ranks_high_first(tmp_path):
    runs = {n: fake_run(tmp_path, "vae", n, {"test": {"test/x": float(n)}}, None) for n in range(3)}
    study = {
        "study_name": "s",
        "objective": "test/x",
        "direction": "maximize",
        "search_space": {"model.beta": {"type": "float", "low": 0.1, "high": 4.0, "log": False}},
        "trials": [
            {
                "number": 0,
                "state": "COMPLETE",
                "value": 0.5,
                "params": {"model.beta": 1.0},
                "run_dir": str(runs[0]),
            },
            {"number": 1, "state": "FAIL", "value": None, "params": {"model.beta": 2.0}, "error": "diverged"},
            {
                "number": 2,
                "state": "COMPLETE",
                "value": 2.5,
                "params": {"model.beta": 3.0},
                "run_dir": str(runs[2]),
            },
            {"number": 3, "state": "RUNNING", "value": None, "params": {"model.beta": 0.2}},
        ],
    }
    (tmp_path / "study.json").write_text(json.dumps(study))
    section = read_section(tmp_path, [read_run(p) for p in runs.values()])
    assert [t.label for t in section.trials] == ["#2", "#0", "#1", "#3"]
    assert section.best.label == "#2" and section.best.run.path == runs[2]
    assert section.trials[2].error == "diverged"
    (tmp_path / "study.json").write_text("{not json")  # a damaged record: no section, a warning, no crash
    assert read_section(tmp_path, [read_run(p) for p in runs.values()]) is None
