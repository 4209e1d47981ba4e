"""``genexp evaluate`` and the ``val/fid`` callback on tiny runs (classifier features, few samples)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from conftest import compose_cfg, tiny
from test_sample_cli import compose_app, genexp

from genexp.commands.evaluate import evaluate
from genexp.commands.train import train
from genexp.errors import GenexpError

FAST = ["eval.num_samples=32", "eval.classifier_epochs=1", "eval.speed_repeats=1", "eval.speed_batch_size=8"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    for family in ("vae", "gan"):
        train(compose_cfg(tiny(family), root / family))
    return {family: root / family for family in ("vae", "gan")}


def test_evaluate_writes_every_metric_with_its_provenance(runs, tmp_path):
    run = runs["vae"]
    evaluation, path = evaluate(compose_app("evaluate", [f"ckpt={run}", *FAST]))
    assert path == run / "evaluation.json"
    assert json.loads(path.read_text()) == evaluation
    m = evaluation["metrics"]
    for key in (
        "fid",
        "kid_mean",
        "kid_std",
        "precision",
        "recall",
        "bpd",
        "recon_mse",
        "recon_psnr",
        "samples_per_sec",
        "ms_per_sample",
        "diversity",
    ):
        assert isinstance(m[f"eval/{key}"], float) and math.isfinite(m[f"eval/{key}"]), key
    # beside every FID: the sample count, the real images, the reference split and the feature space
    assert m["eval/fid_num_samples"] == 32 and m["eval/fid_num_real"] == 16  # synthetic 160: test split 16
    assert m["eval/fid_reference"] == "synthetic/test" and m["eval/fid_features"].startswith("classifier:")
    assert (
        m["eval/bpd_num_images"] == 16 and m["eval/speed_device"] == "cpu" and m["eval/speed_batch_size"] == 8
    )
    p = evaluation["provenance"]
    # a run dir means its best weights, the ones metrics.json's test scored (genexp.checkpoints.weights_of)
    assert p["checkpoint"] == str(run / "checkpoints" / "best.ckpt") and p["global_step"] == 3
    assert p["family"] == "vae" and p["device"] == "cpu" and p["seed"] == 0 and p["reference_split"] == "test"
    assert p["feature_extractor"]["trained"] is True and 0 <= p["feature_extractor"]["accuracy"] <= 1
    assert evaluation["settings"]["num_samples"] == 32
    # merged into the run's metrics.json, whose test metrics stay
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["eval"]["eval/fid"] == m["eval/fid"] and "test/bpd" in metrics["test"]

    # the same seed gives the same numbers; the classifier comes from the cache the second time
    again, _ = evaluate(compose_app("evaluate", [f"ckpt={run}", *FAST, f"out={tmp_path / 'e.json'}"]))
    assert again["provenance"]["feature_extractor"]["trained"] is False
    for key in ("eval/fid", "eval/kid_mean", "eval/precision", "eval/recall", "eval/bpd", "eval/recon_mse"):
        assert again["metrics"][key] == pytest.approx(m[key], rel=1e-6), key
    assert (tmp_path / "e.json").is_file()


def test_metrics_a_family_lacks_are_na(runs):
    evaluation, _ = evaluate(
        compose_app("evaluate", [f"ckpt={runs['gan']}", "metrics=[bpd,recon,speed]", *FAST])
    )
    m = evaluation["metrics"]
    assert m["eval/bpd"] == "n/a" and m["eval/recon_mse"] == "n/a" and m["eval/samples_per_sec"] > 0
    assert "eval/fid" not in m and "feature_extractor" not in evaluation["provenance"]


def test_bad_settings_are_refused(runs):
    with pytest.raises(GenexpError, match="metrics='is': must be one of fid, kid, pr, bpd, recon, speed"):
        evaluate(compose_app("evaluate", [f"ckpt={runs['vae']}", "metrics=[fid,is]"]))
    with pytest.raises(GenexpError, match="eval.reference='dev': must be one of train, val, test"):
        evaluate(compose_app("evaluate", [f"ckpt={runs['vae']}", "eval.reference=dev"]))
    with pytest.raises(GenexpError, match="temperature=0.5: vae sampling takes no temperature"):
        evaluate(compose_app("evaluate", [f"ckpt={runs['vae']}", "temperature=0.5", *FAST]))


def test_evaluate_and_compare_share_the_eval_group_defaults():
    """One place for the evaluation defaults: ``configs/eval/`` holds every setting (EvalSettings has
    no defaults of its own to disagree with it); compare picks its smaller ``eval/quick``."""
    import dataclasses

    import yaml

    from genexp.evaluation import EvalSettings, settings_from_config

    folder = Path(__file__).resolve().parents[1] / "configs" / "eval"
    group = yaml.safe_load((folder / "default.yaml").read_text())
    keys = {k for k in group if k != "eval"} | set(group["eval"])
    fields = {f.name: f for f in dataclasses.fields(EvalSettings)}
    assert keys | {"sampler", "solver", "temperature", "truncation"} == set(
        fields
    )  # those: evaluate's sample options
    assert all(fields[k].default is dataclasses.MISSING for k in keys), "a default outside configs/eval/"
    full = settings_from_config(compose_app("evaluate", []))
    quick = settings_from_config(compose_app("compare", []))
    assert full.num_samples == 10000 and quick.num_samples == 1000 and "recon" not in quick.metrics
    assert settings_from_config(compose_app("compare", ["eval=default"])).fingerprint() == full.fingerprint()
    assert settings_from_config(compose_app("evaluate", ["eval.num_samples=64"])).num_samples == 64


def test_missing_inception_weights_fail_with_one_line(runs, tmp_path):
    run = runs["gan"]
    missing = tmp_path / "no_such_inception.pth"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    out = genexp(
        "evaluate", f"ckpt={run}", "features=inception", f"eval.inception_weights={missing}", cwd=tmp_path
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith(f"genexp: error: eval.inception_weights={missing}: file not found")
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before, "nothing written"
    assert list(tmp_path.iterdir()) == []


def test_fid_callback_logs_val_fid_and_can_pick_the_best_checkpoint(tmp_path):
    """``val/fid`` every epoch through ``pl_module.log``; ``monitor.metric=val/fid`` chooses best.ckpt."""
    run = tmp_path / "run"
    fid = [
        "++callbacks.fid._target_=genexp.lit.fid_callback.FIDCallback",
        "++callbacks.fid.every_n_epochs=1",
        "++callbacks.fid.num_samples=16",
        "++callbacks.fid.classifier_epochs=1",
        f"++callbacks.fid.cache_dir={tmp_path / 'cache'}",
    ]
    cfg = compose_cfg(
        [*tiny("vae"), *fid, "logger=csv", "trainer.max_epochs=2", "monitor.metric=val/fid"], run
    )
    train(cfg)
    with (run / "csv" / "metrics.csv").open() as f:
        values = [float(row["val/fid"]) for row in csv.DictReader(f) if row.get("val/fid")]
    assert len(values) == 2 and all(math.isfinite(v) and v >= 0 for v in values)
    # the run dir holds the run and its lock file (genexp.runlock), nothing else
    assert sorted(p.name for p in run.iterdir()) == [
        ".genexp.lock",
        "checkpoints",
        "csv",
        "metrics.json",
        "samples",
    ]
    assert (run / "checkpoints" / "best.ckpt").is_file()
    assert list((tmp_path / "cache" / "classifier").glob("*.pt")), "the classifier is cached"


def test_results_go_to_the_logger_the_run_trained_with(tmp_path):
    run = tmp_path / "run"
    train(compose_cfg([*tiny("vae"), "logger=csv"], run))
    evaluate(compose_app("evaluate", [f"ckpt={run}", "metrics=[fid,bpd]", *FAST]))
    with open(run / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("eval/fid")]
    assert len(logged) == 1 and float(logged[0]["eval/fid"]) >= 0 and float(logged[0]["eval/bpd"]) > 0
    assert logged[0]["step"] == "3"  # at the checkpoint's step
    assert any(r.get("train/loss") for r in rows)  # the training rows are kept
