"""Nothing the user has is lost, and every bad key of ``sample``/``evaluate`` is one line naming it.

- ``genexp report --out`` writes only the files it owns (its manifest) and refuses to overwrite any
  other; corrupt run files are skipped with a warning; an unwritable ``--out`` is one line.
- ``genexp sample truncation=1e-9`` returns (no unbounded redraw loop), within the bound, seeded.
- ``temperature=0`` is greedy decoding for the autoregressive families (argmax, deterministic).
- The keys of ``configs/sample.yaml`` and ``configs/evaluate.yaml``, fuzzed: wrong types, out of
  range (past int64/uint32), empty strings, paths that are files/folders/read-only, a full disk.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import compose_cfg, tiny
from test_sample_cli import compose_app, genexp

from genexp import atomic
from genexp.commands.evaluate import evaluate
from genexp.commands.report import write_report
from genexp.commands.sample import sample
from genexp.commands.train import train
from genexp.errors import GenexpError
from genexp.models.autoregressive import LogisticMixture, to_levels
from genexp.models.gan import truncated_normal
from genexp.models.pixel_transformer import SOS, PixelTransformer
from genexp.models.pixelcnn import PixelCNN
from genexp.report import MANIFEST

FAMILIES = ("gan", "pixelcnn", "pixel_transformer")
ROOT = os.geteuid() == 0  # root writes through chmod 0500


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One tiny trained run per family that the cases need (one step each, no sample grids)."""
    root = tmp_path_factory.mktemp("safety_runs")
    fast = ["~callbacks.sample_grid", "trainer.limit_train_batches=1", "data.batch_size=8"]
    for family in FAMILIES:
        train(compose_cfg([*tiny(family), *fast], root / family))
    return {family: root / family for family in FAMILIES}


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# ---------------------------------------------------------------------------------------- report
PNG = b"\x89PNG\r\n\x1a\n" + b"grid" * 10


def fake_run(root: Path, name: str, metrics: str | None = '{"test": {"test/loss": 1.0}}') -> Path:
    """A run dir as ``genexp train`` leaves it (config, metrics, a sample grid, a CSV log)."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "model": {"_target_": "x.VAE"}}))
    choices = {"hydra": {"runtime": {"choices": {"model": "vae", "dataset": "mnist5k"}}}}
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(choices))
    if metrics is not None:
        (run / "metrics.json").write_text(metrics)
    (run / "samples").mkdir()
    (run / "samples" / "epoch_001_samples.png").write_bytes(PNG)
    (run / "csv").mkdir()
    (run / "csv" / "metrics.csv").write_text(
        "epoch,step,train/loss,val/loss\n0,1,2.0,\n0,1,,1.5\n1,2,1.0,1.2\n"
    )
    return run


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_report_keeps_the_users_files_and_replaces_only_its_own(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "a")
    fake_run(runs, "b")
    out = tmp_path / "photos"  # a folder of the user's, images/ included
    (out / "images").mkdir(parents=True)
    (out / "images" / "holiday.jpg").write_bytes(b"a user's photo")
    (out / "notes.txt").write_text("mine")

    write_report(runs, out)
    assert (out / "images" / "holiday.jpg").read_bytes() == b"a user's photo"  # rmtree'd before the fix
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "images" / "a_samples.png").read_bytes() == PNG and (
        out / "images" / "b_curves.png"
    ).is_file()
    owned = json.loads((out / MANIFEST).read_text())["files"]
    assert sorted(owned) == [
        "images/a_curves.png",
        "images/a_samples.png",
        "images/b_curves.png",
        "images/b_samples.png",
        "index.html",
        "report.md",
    ]
    # re-running replaces exactly its own files; a run that is gone takes its images with it
    shutil.rmtree(runs / "b")
    write_report(runs, out)
    assert not (out / "images" / "b_samples.png").exists() and (out / "images" / "a_samples.png").is_file()
    assert (out / "images" / "holiday.jpg").read_bytes() == b"a user's photo"

    # a file the report did not write (or that the user changed since) is never overwritten
    (out / "report.md").write_text("my edits")
    before = snapshot(out)
    with pytest.raises(GenexpError) as err:
        write_report(runs, out)
    assert one_line(err) == (
        f"--out={out}: report.md exists and genexp report did not write it (or it was changed since), "
        "so it is not overwritten; move it away or pass --out <another folder>"
    )
    assert snapshot(out) == before  # refused before anything was written


def test_report_refuses_a_users_file_of_the_same_name_in_one_line(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "a")
    out = tmp_path / "r"
    (out / "images").mkdir(parents=True)
    (out / "images" / "a_samples.png").write_bytes(b"the user's own a_samples.png")
    result = genexp("report", str(runs), "--out", str(out), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"genexp: error: --out={out}: images/a_samples.png exists and genexp report did not write it "
        "(or it was changed since), so it is not overwritten; move it away or pass --out <another folder>"
    ]
    assert (out / "images" / "a_samples.png").read_bytes() == b"the user's own a_samples.png"
    assert not (out / "index.html").exists()


def test_report_skips_corrupt_run_files_with_a_warning_naming_them(tmp_path, caplog):
    runs = tmp_path / "runs"
    fake_run(runs, "ok")
    bad = fake_run(runs, "bad", metrics='{"test": ')  # cut short
    (bad / "evaluation.json").write_text("[1, 2]")  # valid JSON, not an object
    (bad / "csv" / "metrics.csv").write_bytes(b"\xff\xfe\x00garbage")
    odd = fake_run(runs, "odd", metrics='{"test": 5}')  # an object, but test is not a mapping
    (odd / ".hydra" / "config.yaml").write_text("- a list\n")
    (runs / "compare.json").write_text("{")
    with caplog.at_level(logging.WARNING, logger="genexp"):
        html_path, md_path = write_report(runs, tmp_path / "r")
    text = caplog.text
    assert f"report: skipping {bad / 'metrics.json'} (JSONDecodeError" in text
    assert "the run is listed as unfinished" in text
    assert f"report: skipping {bad / 'evaluation.json'} (ValueError: a JSON list, not an object)" in text
    assert f"report: skipping {bad / 'csv' / 'metrics.csv'} (UnicodeDecodeError" in text
    assert f"report: skipping {runs / 'compare.json'}" in text
    md = md_path.read_text()
    assert "| bad | vae | 0 | unfinished |" in md and "| ok | vae | 0 | finished |" in md
    assert "| odd |" in md


@pytest.mark.parametrize("case", ["out-is-a-file", "out-under-a-file", "read-only-out", "disk-full"])
def test_report_output_that_cannot_be_written_is_one_line(case, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    fake_run(runs, "a")
    (tmp_path / "file").write_text("x")
    out = {"out-is-a-file": tmp_path / "file", "out-under-a-file": tmp_path / "file" / "r"}.get(
        case, tmp_path / "r"
    )
    expected = {
        "out-is-a-file": f"--out={out}: is a file, not a folder; pass --out <a folder> (created if missing)",
        "out-under-a-file": f"--out={out}: cannot create it (Not a directory); pass --out <a writable folder>",
        "read-only-out": f"--out={out}: the folder is read-only; pass --out <a writable folder>",
        "disk-full": f"--out={out}: cannot write images/a_samples.png (No space left on device); free space there "
        "or pass --out <another folder>",
    }[case]
    if case == "read-only-out":
        if ROOT:
            pytest.skip("root writes through chmod 0500")
        out.mkdir()
        out.chmod(0o500)
    if case == "disk-full":

        def full(path, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        monkeypatch.setattr(atomic, "write_bytes", full)
    try:
        with pytest.raises(GenexpError) as err:
            write_report(runs, out)
        assert one_line(err) == expected
    finally:
        if out.is_dir():
            out.chmod(0o700)
    if case == "disk-full":
        assert not (out / MANIFEST).exists() and not [p for p in out.rglob(".*tmp-*")]


# -------------------------------------------------------------------------- truncation, greedy decoding
def _alarm(seconds: int):
    """Fail (instead of hanging the suite) if the block runs past ``seconds``."""

    def boom(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)


def test_a_tiny_truncation_returns_promptly_within_the_bound_and_seeded(runs, tmp_path):
    z = truncated_normal((4000, 8), 1e-9, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert z.abs().max() <= 1e-9 and z.abs().max() > 0
    same = truncated_normal((4000, 8), 1e-9, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(z, same)
    z = truncated_normal((20000, 4), 0.5, torch.Generator().manual_seed(1), torch.device("cpu"))
    # the std of N(0, 1) truncated to [-0.5, 0.5]: sqrt(1 - 2 t phi(t) / (2 Phi(t) - 1)) = 0.2836
    assert z.abs().max() <= 0.5 and abs(float(z.std()) - 0.2836) < 0.005 and abs(float(z.mean())) < 0.01
    _alarm(60)  # the redraw loop never ended here
    try:
        a = sample(
            compose_app("sample", [f"ckpt={runs['gan']}", "n=4", "truncation=1e-9", f"out={tmp_path}"])
        )
        b = sample(
            compose_app(
                "sample", [f"ckpt={runs['gan']}", "n=4", "truncation=1e-9", f"out={tmp_path}", "name=b"]
            )
        )
    finally:
        signal.alarm(0)
    assert a.npz.name == "sample_seed0_n4_trunc1e-09.npz"
    with np.load(a.npz) as x, np.load(b.npz) as y:
        assert np.array_equal(x["images"], y["images"])


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial weights (the output layers start at zero), float64: argmax ties are unlikely."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.double().eval()


@pytest.mark.parametrize("head", ["categorical", "logistic_mixture"])
def test_greedy_decoding_takes_the_argmax_at_every_step(head):
    pixelcnn = _randomised(PixelCNN(4, 1, head=head, n_components=3, hidden_channels=8, n_layers=2))
    x = pixelcnn.sample(2, torch.Generator().manual_seed(0), temperature=0)
    assert torch.equal(x, pixelcnn.sample(2, torch.Generator().manual_seed(1), temperature=0))
    k = to_levels(x).permute(0, 2, 3, 1).flatten(0, 2)  # (N, C)
    params = pixelcnn.params(x, None).permute(0, 2, 3, 1).flatten(0, 2)  # the full pass, teacher forced
    if head == "categorical":
        assert torch.equal(pixelcnn.head.logits(params).argmax(-1), k)
    else:  # the mode of the most likely component's logistic, rounded to its level
        logit_pi, mu, _, _ = pixelcnn.head.split(params)
        mode = mu.gather(1, logit_pi.argmax(-1)[:, None, None]).squeeze(1)  # (N, C); one channel
        assert torch.equal(torch.round((mode.clamp(-1, 1) + 1) * 255 / 2).long(), k)
        assert len(k.unique()) > 1

    transformer = _randomised(
        PixelTransformer(4, 1, head=head, n_components=3, d_model=16, n_layers=1, n_heads=2)
    )
    x = transformer.sample(2, torch.Generator().manual_seed(0), temperature=0)
    assert torch.equal(x, transformer.sample(2, torch.Generator().manual_seed(1), temperature=0))
    seq = transformer.to_sequence(to_levels(x))
    params = transformer.net(torch.cat([torch.full_like(seq[:, :1], SOS), seq[:, :-1]], 1)).flatten(0, 1)
    greedy = transformer.head.sample(params, None, 0.0)[:, 0]
    assert torch.equal(greedy, seq.flatten())
    if head == "categorical":
        assert torch.equal(params.argmax(-1), seq.flatten())


def test_mixture_head_at_temperature_zero_is_the_most_likely_components_mode():
    head = LogisticMixture(channels=3, n_components=4)
    params = torch.randn(50, head.num_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    k = head.sample(params, torch.Generator().manual_seed(1), 0.0)
    assert torch.equal(k, head.sample(params, torch.Generator().manual_seed(2), 0.0))
    logit_pi, mu, _, coeff = head.split(params)
    pick = logit_pi.argmax(-1)
    n = torch.arange(50)
    mu, coeff = mu[n, pick], coeff[n, pick]
    x = torch.zeros(50, 3, dtype=torch.float64)
    for c in range(3):  # each channel's mean, given the levels of the channels before it
        level = torch.round((head.coupled_mean(mu, coeff, x, c).clamp(-1, 1) + 1) * 255 / 2)
        assert torch.equal(level.long(), k[:, c])
        x[:, c] = 2 * level / 255 - 1


@pytest.mark.parametrize("family", ["pixelcnn", "pixel_transformer"])
def test_sample_temperature_zero_is_accepted_and_deterministic(family, runs, tmp_path):
    draws = [
        sample(
            compose_app(
                "sample", [f"ckpt={runs[family]}", "n=2", f"seed={s}", "temperature=0", f"out={tmp_path}"]
            )
        )
        for s in (0, 1)
    ]
    assert draws[0].npz.name == "sample_seed0_n2_t0.npz"  # refused ("must be > 0") before the fix
    with np.load(draws[0].npz) as a, np.load(draws[1].npz) as b:
        assert np.array_equal(a["images"], b["images"]) and json.loads(str(a["meta"]))["temperature"] == 0.0


# ---------------------------------------------------------------------------------------- fuzz
BIG = str(2**64)  # past int64 and uint32
INT_FIX = "pass {key}=<an integer in {lo}..{hi}>"
SAMPLE_CASES = {
    # id: (family, overrides, the one line's start)
    "n-zero": ("gan", ["n=0"], "n=0: must be >= 1; pass n=<an integer in 1..2147483647>"),
    "n-negative": ("gan", ["n=-5"], "n=-5: must be >= 1; pass n=<an integer in 1..2147483647>"),
    "n-string": ("gan", ["n=abc"], "n='abc': must be an integer; pass n=<an integer in 1..2147483647>"),
    "n-float": ("gan", ["n=1.5"], "n=1.5: must be an integer"),
    "n-empty": ("gan", ["n=''"], "n='': must be an integer"),
    "n-past-int64": (
        "gan",
        [f"n={BIG}"],
        f"n={BIG}: must be <= 2147483647; pass n=<an integer in 1..2147483647>",
    ),
    "batch-size-zero": ("gan", ["batch_size=0"], "batch_size=0: must be >= 1; pass batch_size=<an integer"),
    "batch-size-past-int64": ("gan", [f"batch_size={BIG}"], f"batch_size={BIG}: must be <= 2147483647"),
    "seed-negative": ("gan", ["seed=-1"], "seed=-1: must be >= 0; pass seed=<an integer in 0..4294967295>"),
    "seed-past-uint32": (
        "gan",
        [f"seed={2**32}"],
        f"seed={2**32}: must be <= 4294967295; pass seed=<an integer",
    ),
    "seed-past-int64": ("gan", [f"seed={BIG}"], f"seed={BIG}: must be <= 4294967295"),
    "seed-bool": ("gan", ["seed=true"], "seed=True: must be an integer"),
    "nrow-zero": ("gan", ["nrow=0"], "nrow=0: must be >= 1; pass nrow=<an integer in 1..2147483647>"),
    "nrow-string": ("gan", ["nrow=abc"], "nrow='abc': must be an integer"),
    "device-empty": ("gan", ["device=''"], "device='': must be one of auto, cpu, cuda"),
    "device-bad-index": ("gan", ["device=cuda:abc"], "device=cuda:abc: no "),
    "truncation-zero": (
        "gan",
        ["truncation=0"],
        "truncation=0: must be > 0; pass truncation=<t > 0>, e.g. 1.5",
    ),
    "truncation-negative": ("gan", ["truncation=-1"], "truncation=-1: must be > 0"),
    "truncation-inf": ("gan", ["truncation=inf"], "truncation=inf: must be finite; pass truncation=<t > 0>"),
    "truncation-nan": ("gan", ["truncation=nan"], "truncation=nan: must be > 0"),
    "truncation-string": ("gan", ["truncation=abc"], "truncation='abc': must be a number"),
    "temperature-negative": (
        "pixelcnn",
        ["temperature=-1"],
        "temperature=-1: must be >= 0.0; pass temperature=<T >= 0>",
    ),
    "temperature-nan": ("pixelcnn", ["temperature=nan"], "temperature=nan: must be finite"),
    "temperature-inf": ("pixelcnn", ["temperature=inf"], "temperature=inf: must be finite"),
    "temperature-other-family": (
        "gan",
        ["temperature=0"],
        "temperature=0: gan sampling takes no temperature",
    ),
    "name-a-path": (
        "gan",
        ["name=a/b"],
        "name=a/b: must be a file stem, not a path; pass name=<stem> and out=<folder>",
    ),
    "ckpt-empty": ("gan", ["ckpt=''"], "ckpt: missing; pass ckpt=<run dir|.ckpt|latest>"),
    "out-a-file": (
        "gan",
        ["out={file}"],
        "out={file}" + ": it is a file, not a folder; pass out=<a writable folder>",
    ),
    "out-under-a-file": (
        "gan",
        ["out={file}/x"],
        "out={file}/x" + ": cannot create the folder (Not a directory); pass out=",
    ),
    "out-read-only": (
        "gan",
        ["out={ro}"],
        "out={ro}" + ": the folder is read-only; pass out=<a writable folder>",
    ),
}


def _paths(tmp_path: Path, text: str) -> str:
    return text.format(file=tmp_path / "a_file", ro=tmp_path / "ro", folder=tmp_path / "folder")


@pytest.fixture
def fuzz_paths(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    yield tmp_path
    (tmp_path / "ro").chmod(0o700)


@pytest.mark.parametrize("case", SAMPLE_CASES)
def test_every_sample_key_is_checked_in_one_line(case, runs, fuzz_paths):
    family, overrides, expected = SAMPLE_CASES[case]
    if case == "out-read-only" and ROOT:
        pytest.skip("root writes through chmod 0500; out-a-file and out-under-a-file cover root")
    overrides = [_paths(fuzz_paths, o) for o in overrides]
    ckpt = [] if case == "ckpt-empty" else [f"ckpt={runs[family]}"]
    with pytest.raises(GenexpError) as err:
        sample(compose_app("sample", [*ckpt, "n=2", f"out={fuzz_paths / 'out'}", *overrides]))
    assert one_line(err).startswith(_paths(fuzz_paths, expected))
    assert not list((fuzz_paths / "out").glob("*.npz")) if (fuzz_paths / "out").is_dir() else True


EVAL_CASES = {
    "metrics-not-a-list": (
        ["metrics=5"],
        "metrics=5: must be a list of fid, kid, pr, bpd, recon, speed; pass metrics='[fid,bpd]'",
    ),
    "metrics-empty-list": (["metrics=[]"], "metrics=[]: name at least one of"),
    "metrics-empty-string": (["metrics=''"], "metrics='': must be one of fid, kid, pr, bpd, recon, speed"),
    "num-samples-zero": (
        ["eval.num_samples=0"],
        "eval.num_samples=0: must be >= 4; pass eval.num_samples=<an integer in 4..2147483647>",
    ),
    "num-samples-past-int64": ([f"eval.num_samples={BIG}"], f"eval.num_samples={BIG}: must be <= 2147483647"),
    "num-real-negative": (["eval.num_real=-1"], "eval.num_real=-1: must be >= 4"),
    "batch-size-string": (
        ["eval.batch_size=abc"],
        "eval.batch_size='abc': must be an integer; pass eval.batch_size=",
    ),
    "kid-subset-one": (["eval.kid_subset_size=1"], "eval.kid_subset_size=1: must be >= 2"),
    "classifier-epochs-float": (
        ["eval.classifier_epochs=1.5"],
        "eval.classifier_epochs=1.5: must be an integer",
    ),
    "speed-repeats-zero": (["eval.speed_repeats=0"], "eval.speed_repeats=0: must be >= 1"),
    "speed-batch-past-int64": (
        [f"eval.speed_batch_size={BIG}"],
        f"eval.speed_batch_size={BIG}: must be <= 2147483647",
    ),
    "seed-past-int64": (
        [f"seed={BIG}"],
        f"seed={BIG}: must be <= 4294967295; pass seed=<an integer in 0..4294967295>",
    ),
    "reference-empty": (["eval.reference=''"], "eval.reference='': must be one of train, val, test"),
    "features-empty": (["features=''"], "features='': must be one of classifier, inception"),
    "device-empty": (["device=''"], "device='': must be one of auto, cpu, cuda"),
    "truncation-inf": (["truncation=inf", "metrics=[speed]"], "truncation=inf: must be finite"),
    "out-a-folder": (["out={folder}"], "out={folder}" + ": is a folder; pass out=<a file>.json"),
    "out-under-a-file": (
        ["out={file}/e.json"],
        "out={file}/e.json: {file}"
        + " is a file, not a folder; pass out=<a writable folder>/evaluation.json",
    ),
    "out-read-only": (["out={ro}/e.json"], "out={ro}/e.json" + ": the folder ({ro}) is read-only; pass out="),
    "cache-dir-under-a-file": (
        ["cache_dir={file}/cache"],
        "cache_dir={file}/cache"
        + ": cannot create the folder (Not a directory); pass cache_dir=<a writable folder>",
    ),
    "cache-dir-a-file": (
        ["cache_dir={file}"],
        "cache_dir={file}"
        + ": it is a file, not a folder; pass cache_dir=<a writable folder> (or set GENEXP_CACHE)",
    ),
}


@pytest.mark.parametrize("case", EVAL_CASES)
def test_every_evaluate_key_is_checked_in_one_line_before_any_work(case, runs, fuzz_paths):
    overrides, expected = EVAL_CASES[case]
    if case == "out-read-only" and ROOT:
        pytest.skip("root writes through chmod 0500; out-under-a-file covers root")
    (fuzz_paths / "folder").mkdir()
    overrides = [_paths(fuzz_paths, o) for o in overrides]
    expected = _paths(fuzz_paths, expected)
    with pytest.raises(GenexpError) as err:
        evaluate(compose_app("evaluate", [f"ckpt={runs['gan']}", *overrides]))
    assert one_line(err).startswith(expected)
    assert not (runs["gan"] / "evaluation.json").exists()  # nothing evaluated


@pytest.mark.slow  # a process start (~5 s); the in-process cases above check the same messages
def test_cli_prints_the_fuzzed_error_in_one_line(runs, tmp_path):
    (tmp_path / "a_file").write_text("x")
    out = genexp("sample", f"ckpt={runs['gan']}", f"out={tmp_path / 'a_file'}", f"seed={BIG}", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"genexp: error: seed={BIG}: must be <= 4294967295; pass seed=<an integer in 0..4294967295>"
    ]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES], ids=["disk-full", "permission-denied"])
def test_a_failed_sample_write_names_out_not_paths_log_dir(code, runs, tmp_path, monkeypatch):
    def fail(file, **arrays):
        file.write(b"half")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(np, "savez_compressed", fail)
    out = tmp_path / "out"
    with pytest.raises(GenexpError) as err:
        sample(compose_app("sample", [f"ckpt={runs['gan']}", "n=2", f"out={out}"]))
    fix = (
        "free space there or pass out=<another folder>"
        if code == errno.ENOSPC
        else "pass out=<a writable folder>"
    )
    assert one_line(err) == f"out={out}: cannot write sample_seed0_n2.npz ({os.strerror(code)}); {fix}"
    assert "paths.log_dir" not in str(err.value)
    assert sorted(p.name for p in out.iterdir()) == ["sample_seed0_n2.png"]  # no half .npz, no temp file


def test_evaluate_write_failure_and_a_corrupt_metrics_json(runs, tmp_path, monkeypatch, caplog):
    run = tmp_path / "gan"
    shutil.copytree(runs["gan"], run)
    (run / "metrics.json").write_text("{cut")
    fast = ["metrics=[speed]", "eval.speed_repeats=1", "eval.speed_batch_size=2"]
    with caplog.at_level(logging.WARNING, logger="genexp"):
        evaluation, path = evaluate(compose_app("evaluate", [f"ckpt={run}", *fast]))
    assert path == run / "evaluation.json" and json.loads(path.read_text()) == evaluation
    assert (run / "metrics.json").read_text() == "{cut"  # left as it was, with a warning
    assert f"{run / 'metrics.json'} left as it was (JSONDecodeError" in caplog.text

    def full(path, payload):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("genexp.atomic.write_json", full)
    with pytest.raises(GenexpError) as err:
        evaluate(compose_app("evaluate", [f"ckpt={run}", *fast, f"out={tmp_path / 'e.json'}"]))
    assert one_line(err) == (
        f"out={tmp_path}: cannot write e.json (No space left on device); free space there or pass out=<another folder>"
    )
