"""``genexp evaluate nfe=[...]``: the steps each NFE buys, the rows, the figure, the refusals."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from conftest import compose_cfg, tiny
from test_sample_cli import compose_app

from genexp import nfe_sweep
from genexp.commands.evaluate import evaluate
from genexp.commands.train import train
from genexp.diffusion.fast_samplers import DPMSolverPPSampler, HeunSampler
from genexp.diffusion.ode_solvers import Dopri5Solver, EulerSolver, HeunSolver, MidpointSolver, RK4Solver
from genexp.diffusion.samplers import DDIMSampler, DDPMSampler
from genexp.errors import GenexpError

FAST = [
    "eval.num_samples=16",
    "eval.kid_subset_size=8",
    "eval.classifier_epochs=1",
    "eval.speed_repeats=1",
    "eval.speed_batch_size=4",
]
FAMILIES = ("flow_matching", "ddpm", "vae")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Tiny trained runs (one step each; ddpm's tiny schedule has T = 20 timesteps)."""
    root = tmp_path_factory.mktemp("runs")
    fast = ["~callbacks.sample_grid", "trainer.limit_train_batches=1", "data.batch_size=8"]
    for family in FAMILIES:
        train(compose_cfg([*tiny(family), *fast], root / family))
    return {family: root / family for family in FAMILIES}


def sweep(run: Path, nfe: str, *overrides: str, out: Path | None = None) -> dict:
    extra = [f"out={out}"] if out else []
    evaluation, _ = evaluate(
        compose_app("evaluate", [f"ckpt={run}", f"nfe={nfe}", *FAST, *extra, *overrides])
    )
    return evaluation


@pytest.mark.parametrize(
    "cls, nfe, steps",
    [
        # one evaluation per step: steps = NFE
        (EulerSolver, 7, 7),
        (DDIMSampler, 7, 7),
        (DPMSolverPPSampler, 7, 7),
        # two per step: the most steps with 2 * steps <= NFE
        (MidpointSolver, 7, 3),
        (HeunSolver, 8, 4),
        (HeunSolver, 1, 0),
        # four per step
        (RK4Solver, 15, 3),
        (RK4Solver, 16, 4),
        (RK4Solver, 3, 0),
        # EDM Heun: 2 N - 1 evaluations (the last step is Euler's): N = (NFE + 1) // 2
        (HeunSampler, 1, 1),
        (HeunSampler, 8, 4),  # 2 * 4 - 1 = 7 <= 8 < 9
        (HeunSampler, 9, 5),
    ],
)
def test_steps_for_nfe_is_the_most_steps_within_the_nfe(cls, nfe, steps):
    assert cls.steps_for_nfe(nfe) == steps
    assert cls.steps_for_nfe(nfe, eta=0.5, rho=7.0) == steps  # the node's other arguments cost nothing


def test_samplers_without_a_step_count_have_no_steps_for_nfe():
    assert not hasattr(DDPMSampler, "steps_for_nfe") and not hasattr(Dopri5Solver, "steps_for_nfe")


def test_nfe_values_are_normalised_or_refused_in_one_line():
    assert nfe_sweep.check_nfe(None) is None
    assert nfe_sweep.check_nfe(8) == (8,)
    assert nfe_sweep.check_nfe([16, 4, 8, 4]) == (4, 8, 16)
    for bad, match in (
        ([], r"nfe=\[\]: empty"),
        ([4, 0], r"nfe=\[4, 0\]: 0 is not a network-evaluation count \(an integer in 1..100000\)"),
        (100001, "nfe=100001: 100001 is not"),
        (2.5, "nfe=2.5: 2.5 is not"),
        ("abc", "nfe=abc: 'abc' is not"),
        (True, "nfe=True: True is not"),
    ):
        with pytest.raises(GenexpError, match=match) as err:
            nfe_sweep.check_nfe(bad)
        assert "\n" not in str(err.value) and "pass nfe='[4,8,16,32,64]'" in str(err.value)


def test_flow_matching_sweep_rows_match_single_evaluations_and_plot(runs, tmp_path):
    """Each row is what ``genexp evaluate solver.steps=<its steps>`` measures (same seed, same
    extractor, to 1e-9); the top level is the largest NFE's; the figure has both panels."""
    from PIL import Image

    run = runs["flow_matching"]
    out = tmp_path / "sweep.json"
    evaluation = sweep(run, "[8,2,4,4]", "metrics=[fid,kid,pr,speed]", "solver=euler", out=out)
    assert json.loads(out.read_text()) == evaluation
    table = evaluation["nfe_sweep"]
    assert table["option"] == "solver" and table["name"] == "EulerSolver"
    rows = table["rows"]
    assert [(r["nfe_requested"], r["nfe"], r["steps"]) for r in rows] == [(2, 2, 2), (4, 4, 4), (8, 8, 8)]
    keys = {"nfe_requested", "nfe", "steps", "fid", "kid_mean", "kid_std", "precision", "recall"}
    assert all(set(r) == keys | {"samples_per_sec", "ms_per_sample"} for r in rows)
    assert evaluation["settings"]["nfe"] == [2, 4, 8]
    m = evaluation["metrics"]
    assert (
        m["eval/nfe"] == 8 and m["eval/fid"] == rows[-1]["fid"] and m["eval/kid_mean"] == rows[-1]["kid_mean"]
    )
    assert m["eval/ms_per_sample"] == rows[-1]["ms_per_sample"]
    assert evaluation["provenance"]["sampling"]["sampler"]["steps"] == 8

    single, _ = evaluate(
        compose_app(
            "evaluate",
            [
                f"ckpt={run}",
                "metrics=[fid,kid,pr]",
                *FAST,
                "solver=euler",
                "solver.steps=4",
                f"out={tmp_path / 's.json'}",
            ],
        )
    )
    for key in ("fid", "kid_mean", "precision", "recall"):
        assert single["metrics"][f"eval/{key}"] == pytest.approx(rows[1][key], abs=1e-9), key
    assert "nfe" not in single["settings"] and "nfe_sweep" not in single  # an old-style evaluation

    plot = Path(evaluation["provenance"]["nfe_plot"])
    assert plot == tmp_path / "sweep_nfe.png"
    width, height = Image.open(io.BytesIO(plot.read_bytes())).size
    assert width >= 2 * height  # two panels side by side


@pytest.mark.parametrize(
    "solver, nfe, expected",
    [
        ("heun", "[3,4]", [(3, 2, 1), (4, 4, 2)]),  # (asked, spent, steps): 2 per step
        ("rk4", "[4,9]", [(4, 4, 1), (9, 8, 2)]),  # 4 per step
    ],
)
def test_flow_matching_sweep_spends_the_solvers_nfe(runs, solver, nfe, expected):
    evaluation = sweep(runs["flow_matching"], nfe, "metrics=[speed]", f"solver={solver}")
    rows = evaluation["nfe_sweep"]["rows"]
    assert [(r["nfe_requested"], r["nfe"], r["steps"]) for r in rows] == expected
    assert "fid" not in rows[0] and rows[0]["samples_per_sec"] > 0  # speed always, fidelity only if asked
    assert "nfe_plot" in evaluation["provenance"]


@pytest.mark.parametrize(
    "sampler, nfe, expected, name",
    [
        ("ddim", "[2,5]", [(2, 2, 2), (5, 5, 5)], "DDIMSampler"),
        ("dpm_solver_pp", "[2,5]", [(2, 2, 2), (5, 5, 5)], "DPMSolverPPSampler"),
        ("heun", "[3,6]", [(3, 3, 2), (6, 5, 3)], "HeunSampler"),  # 2 N - 1
    ],
)
def test_ddpm_sweep_spends_the_samplers_nfe(runs, sampler, nfe, expected, name):
    evaluation = sweep(runs["ddpm"], nfe, "metrics=[speed,bpd]", f"sampler={sampler}")
    table = evaluation["nfe_sweep"]
    assert table["option"] == "sampler" and table["name"] == name
    assert [(r["nfe_requested"], r["nfe"], r["steps"]) for r in table["rows"]] == expected
    assert evaluation["metrics"]["eval/nfe"] == expected[-1][1] and isinstance(
        evaluation["metrics"]["eval/bpd"], float
    )


@pytest.mark.parametrize(
    "family, overrides, match",
    [
        (
            "vae",
            ["nfe=[4]"],
            r"nfe=\[4\]: vae has no sampler or solver whose steps set its NFE .*; drop the nfe option",
        ),
        # the ancestral sampler (all T steps) has no step count
        ("ddpm", ["nfe=[4]", "sampler=ddpm"], r"DDPMSampler has no step count .*; pass sampler=ddim\|dpm_solver_pp\|heun"),
        (
            "flow_matching",
            ["nfe=[4]", "solver=dopri5"],
            r"Dopri5Solver has no step count .*; pass solver=euler",
        ),
        (
            "flow_matching",
            ["nfe=[2,8]", "solver=rk4"],
            r"RK4Solver cannot take one step within 2 .*nfe values >= 4",
        ),
        # T = 20 timesteps: 8 fit, 40 do not (refused before the 8 is sampled)
        (
            "ddpm",
            ["nfe=[8,40]", "sampler=ddim"],
            r"nfe=\[8, 40\]: 40 network evaluations mean sampler.steps=40, refused",
        ),
        ("ddpm", ["nfe=[0]"], r"nfe=\[0\]: 0 is not a network-evaluation count"),
        ("ddpm", ["nfe=[]"], r"nfe=\[\]: empty"),
    ],
)
def test_refusals_are_one_line_and_write_nothing(runs, family, overrides, match):
    run = runs[family]
    before = sorted(p.name for p in run.iterdir())
    metrics = (run / "metrics.json").read_text()
    with pytest.raises(GenexpError, match=match) as err:
        evaluate(compose_app("evaluate", [f"ckpt={run}", *FAST, *overrides]))
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in run.iterdir()) == before and (run / "metrics.json").read_text() == metrics


def test_a_stop_signal_mid_sweep_writes_nothing(runs, monkeypatch):
    """SIGTERM raises genexp.signals.Interrupted wherever the sweep is: nothing half-written."""
    from genexp.signals import Interrupted

    calls = []

    def stopped(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise Interrupted(15)
        return {"samples_per_sec": 1.0, "ms_per_sample": 1.0}

    monkeypatch.setattr(nfe_sweep, "sampling_speed", stopped)
    run = runs["ddpm"]
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(Interrupted):
        sweep(run, "[2,4]", "metrics=[speed]", "sampler=ddim")
    assert sorted(p.name for p in run.iterdir()) == before


def test_fingerprint_without_nfe_is_the_old_one():
    """genexp compare skips a run whose evaluation.json holds the same settings: without nfe the
    fingerprint keeps exactly its old keys (no "nfe"), so old files still match."""
    from genexp.evaluation import settings_from_config

    old = {
        "metrics", "num_samples", "num_real", "reference", "batch_size", "kid_subset_size", "features",
        "inception_weights", "classifier_epochs", "speed_batch_size", "speed_repeats", "seed", "sampler",
        "temperature", "truncation",
    }  # fmt: skip
    assert set(settings_from_config(compose_app("evaluate", [])).fingerprint()) == old
    assert set(settings_from_config(compose_app("evaluate", ["nfe=[4,8]"])).fingerprint()) == old


def test_evaluate_reports_the_ode_estimate_s_standard_error_beside_bpd(runs, tmp_path):
    """``metrics=[bpd]``: flow matching's ODE bits/dim (Hutchinson, 2 probes) comes with
    ``eval/bpd_std_err``; an exact likelihood or a bound (vae, ddpm's default) has none."""
    for family, has_error in (("flow_matching", True), ("vae", False), ("ddpm", False)):
        evaluation, _ = evaluate(
            compose_app(
                "evaluate",
                [f"ckpt={runs[family]}", "metrics=[bpd]", "eval.num_real=8", f"out={tmp_path / family}.json"],
            )
        )
        metrics = evaluation["metrics"]
        assert metrics["eval/bpd"] > 0
        if has_error:
            assert 0 < metrics["eval/bpd_std_err"] < 0.1 * metrics["eval/bpd"], family
        else:
            assert "eval/bpd_std_err" not in metrics, family
