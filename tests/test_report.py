"""``genexp compare`` and ``genexp report``: the summary table from measured values, resumable
comparisons, and the HTML page rendered in a real (headless Chromium) browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from conftest import TINY
from test_sample_cli import genexp

from genexp.commands.report import write_report
from genexp.errors import GenexpError
from genexp.report.collect import read_run, summarize
from genexp.report.columns import summary_cells

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"  # git-ignored; CI keeps the screenshot
# conftest's tiny run, less what compare sets itself (dataset, accelerator, logger, epochs)
TINY_TRAIN = " ".join(
    [
        *(o for o in TINY if o.startswith(("trainer.limit_", "trainer.log_every", "data.", "callbacks."))),
        "model.base_channels=8",  # ae and vae share these two keys, so one multirun takes both
        "model.latent_dim=4",
    ]
)
COMPARE = [
    "compare",
    "dataset=synthetic",
    "dataset.num_images=160",
    "families=[ae,vae]",
    "seeds=2",
    "budget_minutes=0.03",  # 2 s per run (and at least one epoch)
    "accelerator=cpu",
    f"train_args='{TINY_TRAIN}'",
    "eval.num_samples=32",
    "eval.classifier_epochs=1",
    "eval.speed_repeats=1",
    "eval.speed_batch_size=8",
]
RUNS = ["ae-seed0", "ae-seed1", "vae-seed0", "vae-seed1"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> dict:
    """One tiny comparison: 2 families x 2 seeds as one multirun, evaluated, reported."""
    cwd = tmp_path_factory.mktemp("compare")
    out = cwd / "cmp"
    env = {"GENEXP_CACHE": str(cwd / "cache")}  # the feature classifier, shared by both compare runs
    first = genexp(*COMPARE, f"out={out}", cwd=cwd, timeout=600, env=env)
    assert first.returncode == 0, first.stderr[-4000:]
    return {"cwd": cwd, "out": out, "first": first, "env": env}


def test_compare_trains_every_family_and_seed_in_one_sweep_and_writes_the_report(compared):
    out, first = compared["out"], compared["first"]
    assert first.stdout.splitlines()[0] == "4 runs: 4 trained, 0 skipped, 0 failed, 4 evaluated"
    assert "training 4 runs (ae, vae x seeds 0, 1)" in first.stderr  # one Hydra multirun
    # which job of how many, with an ETA: the budget before any job ended, then the mean job time
    assert re.search(r"compare: job 1/4 \(model=ae seed=0\) \| \d+s elapsed, ETA ≥\d+s", first.stderr)
    assert re.search(r"compare: job 4/4 \(model=vae seed=1\) \| \d+s elapsed, ETA ~\d", first.stderr)
    assert (out / "runs" / "multirun.yaml").is_file()
    assert sorted(p.name for p in (out / "runs").iterdir() if p.is_dir()) == RUNS
    for name in RUNS:
        run = out / "runs" / name
        # (Hydra's multirun stores the colons escaped)
        overrides = [
            o.replace("\\:", ":") for o in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
        ]
        assert "trainer.max_time=00:00:00:02" in overrides and "logger=csv" in overrides
        assert f"seed={name[-1]}" in overrides and f"model={name.split('-')[0]}" in overrides
        assert (run / "csv" / "metrics.csv").is_file() and (run / "metrics.json").is_file()
        evaluation = json.loads((run / "evaluation.json").read_text())
        assert evaluation["metrics"]["eval/fid_num_samples"] == 32
    assert sorted(p.name for p in compared["cwd"].iterdir()) == ["cache", "cmp"], "no stray outputs/"

    md = (out / "report" / "report.md").read_text()
    vae_row = next(
        line for line in md.splitlines() if line.startswith("| Variational autoencoder (vae) | 2/2 |")
    )
    cells = [c.strip() for c in vae_row.strip("|").split("|")]
    assert [cells[i] for i in (3, 7, 12, 14)] == ["△", "○", "△", "○"]  # the talk's ratings beside
    assert re.fullmatch(r"[\d.e+-]+ ± [\d.e+-]+", cells[2]), cells[2]  # measured bpd: mean ± std over seeds
    ae_row = next(line for line in md.splitlines() if line.startswith("| Autoencoder (ae) | 2/2 | n/a | — |"))
    assert ae_row.count("—") == 4  # not rated in the talk
    for name in RUNS:
        assert f"![loss curves](images/{name}_curves.png)" in md
        assert (out / "report" / "images" / f"{name}_samples.png").is_file()
    assert (
        "FID/KID/precision/recall in classifier:synthetic" in md and "32 samples against 16 real images" in md
    )


def test_a_second_compare_skips_finished_runs_and_resumes_unfinished_ones(compared):
    out, cwd = compared["out"], compared["cwd"]
    finished = {name: (out / "runs" / name / "metrics.json").stat().st_mtime_ns for name in RUNS}
    # vae-seed1 as if it had been interrupted: a checkpoint but no metrics.json
    (out / "runs" / "vae-seed1" / "metrics.json").unlink()
    again = genexp(*COMPARE, f"out={out}", cwd=cwd, timeout=600, env=compared["env"])
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout.splitlines()[0] == "4 runs: 1 trained, 3 skipped, 0 failed, 1 evaluated"
    for name in RUNS[:3]:
        assert f"skipping {name} (finished)" in again.stderr
        assert (out / "runs" / name / "metrics.json").stat().st_mtime_ns == finished[name]
    assert (
        "resuming vae-seed1 (run 1/1)" in again.stderr
        and f"ckpt_path={out / 'runs' / 'vae-seed1'}" in again.stderr
    )
    assert (out / "runs" / "vae-seed1" / "metrics.json").is_file()
    assert "training 4 runs" not in again.stderr  # no new sweep


def test_report_renders_in_chromium_with_every_image(compared):
    """Headless Chromium loads the page from disk; the page's own script marks each image's load
    state in the DOM, which --dump-dom returns; a screenshot is kept under tests/artifacts/."""
    page = compared["out"] / "report" / "index.html"
    flags = chromium()
    parsed = rendered_dom(flags, page)
    assert parsed.body.get("data-images-loaded") == "8/8", parsed.body  # 4 sample grids + 4 loss curves
    assert len(parsed.images) == 8
    for img in parsed.images:
        assert img.get("data-loaded") == "yes" and int(img["data-natural-width"]) > 0, img
    assert parsed.rows["summary"][0][:2] == ["Autoencoder (ae)", "2/2"]
    assert [row[0] for row in parsed.rows["summary"]] == ["Autoencoder (ae)", "Variational autoencoder (vae)"]
    assert [row[0] for row in parsed.rows["runs"]] == RUNS

    screenshot(flags, page, "report.png", "1400,2400")


def screenshot(flags: list[str], page: Path, name: str, size: str) -> Path:
    """A headless-Chromium PNG of ``page`` under the test artifacts (checked to hold a real image)."""
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / name
    shot.unlink(missing_ok=True)
    made = subprocess.run(
        [*flags, f"--window-size={size}", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0 and shot.is_file() and shot.stat().st_size > 10_000, made.stderr[-2000:]
    return shot


def chromium() -> list[str]:
    """Headless Chromium's command line; skips only where GENEXP_ALLOW_NO_BROWSER=1 says so."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        if os.environ.get("GENEXP_ALLOW_NO_BROWSER") == "1":
            pytest.skip("no chromium here and GENEXP_ALLOW_NO_BROWSER=1 (make test installs it)")
        pytest.fail(
            "chromium not found: make test installs it (apt); or apt-get install chromium, "
            "or set GENEXP_ALLOW_NO_BROWSER=1 locally"
        )
    return [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--virtual-time-budget=10000",
    ]


def rendered_dom(flags: list[str], page: Path) -> DomSummary:
    """The page as Chromium leaves it after its scripts ran (--dump-dom), parsed."""
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    parsed = DomSummary()
    parsed.feed(dom.stdout)
    return parsed


class DomSummary(HTMLParser):
    """The <body> attributes, every <img>'s attributes, and the cell texts of each table by id."""

    def __init__(self):
        super().__init__()
        self.body: dict = {}
        self.images: list[dict] = []
        self.rows: dict[str, list[list[str]]] = {}
        self._table = None
        self._cell: list[str] | None = None
        self._in_body_rows = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body":
            self.body = attrs
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "table":
            self._table = attrs.get("id")
            self.rows[self._table] = []
        elif tag == "tbody":
            self._in_body_rows = True
        elif tag == "tr" and self._in_body_rows:
            self.rows[self._table].append([])
        elif tag == "td" and self._in_body_rows:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.rows[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tbody":
            self._in_body_rows = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_report_command_builds_the_report_from_existing_runs(compared, tmp_path):
    out = genexp("report", str(compared["out"] / "runs"), "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [str(tmp_path / "r" / "index.html"), str(tmp_path / "r" / "report.md")]
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| Variational autoencoder (vae) | 2/2 |" in md and "| vae-seed1 | vae | 1 | finished |" in md
    assert len(list((tmp_path / "r" / "images").glob("*.png"))) == 8
    empty = genexp("report", str(tmp_path / "r"), cwd=tmp_path)  # a folder without run dirs
    assert empty.returncode == 2 and empty.stderr.startswith("genexp: error: report: no run dirs")


def fake_run(
    root: Path, family: str, seed: int, metrics: dict | None, evaluation: dict | None, failed: str = ""
):
    """A run dir as genexp train (and compare, evaluate) leave it, without training anything."""
    run = root / f"{family}-seed{seed}"
    (run / ".hydra").mkdir(parents=True)
    config = {"seed": seed, "model": {"_target_": f"genexp.models.{family}.{family.upper()}"}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    hydra = {"hydra": {"runtime": {"choices": {"model": family, "dataset": "mnist5k"}}}}
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    if evaluation is not None:
        (run / "evaluation.json").write_text(
            json.dumps({"metrics": {f"eval/{k}": v for k, v in evaluation.items()}})
        )
    if failed:
        (run / "compare_failed.json").write_text(json.dumps({"error": failed}))
    return run


def test_summary_measures_spread_divergence_and_collapse(tmp_path):
    ok = {"test": {"test/loss": 1.0}}
    gan = dict(precision=0.5, recall=0.4, kid_mean=0.01, samples_per_sec=900.0, bpd="n/a", diversity=0.9)
    fake_run(tmp_path, "gan", 0, ok, {**gan, "fid": 10.0})
    fake_run(tmp_path, "gan", 1, ok, {**gan, "fid": 14.0, "recall": 0.01})  # collapsed: recall ~ 0
    fake_run(tmp_path, "gan", 2, None, None, failed="GAN: non-finite train loss (nan) at global step 7")
    fake_run(tmp_path, "realnvp", 0, {"test": {"test/bpd": 1.5}}, {"fid": 30.0, "bpd": 1.25})
    fake_run(tmp_path, "realnvp", 1, {"test": {"test/bpd": 1.5}}, {"fid": 34.0, "bpd": 1.75})
    fake_run(tmp_path, "realnvp", 2, {"test": {"test/bpd": "nan"}}, None)  # diverged: non-finite test metric
    runs = [read_run(p) for p in sorted(tmp_path.iterdir())]
    rows = {row.family: summary_cells(row) for row in summarize(runs)}
    #           family, runs, bpd, talk, FID std, diverged, collapsed, talk, FID, KID, P, R, talk, samples/s, talk
    assert rows["gan"] == [
        "GAN (gan)",
        "2/3",
        "n/a",
        "×",
        "2.83",
        "1",
        "1",
        "×",
        "12",
        "0.01",
        "0.5",
        "0.205",
        "○",
        "900",
        "○",
    ]  # FID std of (10, 14) = 2.83; recall mean (0.4 + 0.01) / 2
    assert rows["realnvp"][:8] == [
        "Normalizing flow, RealNVP (realnvp)",
        "3/3",
        "1.5 ± 0.35",
        "○",
        "2.83",
        "1",
        "0",
        "△",
    ]
    html_path, md_path = write_report(tmp_path)
    assert (
        html_path == tmp_path / "report" / "index.html" and "no sample grid or CSV log" in md_path.read_text()
    )
    assert "GAN: non-finite train loss (nan) at global step 7" in html_path.read_text()
    with pytest.raises(GenexpError, match="no such folder"):
        write_report(tmp_path / "nowhere")
