"""The ``performance`` config node: every option composes and builds; precision resolves to one
value; compile and channels_last keep the loss; fused/foreach reach the optimizer; device-resident
data yields the DataLoader's batches, also after a mid-epoch resume; a compiled run's checkpoint
loads without compiling."""

from __future__ import annotations

import copy
import functools
import os
from types import SimpleNamespace

import pytest
import torch
from conftest import compose_cfg, tiny
from torch import nn
from torch.utils.data import DistributedSampler

from genexp.build import build_model, instantiate
from genexp.commands.train import train
from genexp.data.base import ImageTensorDataset
from genexp.data.order import EpochSampler
from genexp.data.synthetic import Synthetic
from genexp.errors import GenexpError
from genexp.lit.datamodule import DataModule
from genexp.lit.device_data import DeviceLoader
from genexp.lit.gan_module import GANModule
from genexp.lit.module import GenerativeModule
from genexp.lit.performance import Performance, clips_under_amp, impl_kwargs, networks

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (key, value typed on the command line, the attribute it builds)
OPTIONS = [
    *[
        ("precision", v, v)
        for v in ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
    ],
    ("precision", "32", "32-true"),
    ("precision", "bf16", "bf16-mixed"),
    ("precision", "16", "16-mixed"),
    ("compile", "true", True),
    ("compile", "false", False),
    *[
        ("compile_mode", v, v)
        for v in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    ],
    ("channels_last", "true", True),
    *[("optimizer_impl", v, v) for v in ("auto", "fused", "foreach", "for_loop")],
    *[("matmul_precision", v, v) for v in ("highest", "high", "medium")],
    ("device_data", "true", True),
]


@pytest.fixture(autouse=True)
def _restore_matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


def test_defaults_leave_a_cpu_run_as_it_was(tmp_path):
    cfg = compose_cfg(tiny("vae"), tmp_path)
    assert cfg.trainer.precision is None  # performance.precision is the one source
    perf = instantiate(cfg.performance, "performance")
    assert (perf.precision, perf.compile, perf.channels_last, perf.device_data) == (
        "auto",
        False,
        False,
        False,
    )
    assert perf.trainer_precision(None, "cpu") == "32-true"


@pytest.mark.parametrize(("key", "value", "built"), OPTIONS, ids=[f"{k}={v}" for k, v, _ in OPTIONS])
def test_every_performance_option_composes_and_builds(key, value, built, tmp_path):
    cfg = compose_cfg([*tiny("vae"), f"performance.{key}={value}"], tmp_path)
    perf = instantiate(cfg.performance, "performance")
    assert getattr(perf, key) == built
    precision = perf.trainer_precision(cfg.trainer.precision, cfg.trainer.accelerator, cfg.trainer.strategy)
    assert precision == ("32-true" if perf.precision == "auto" else perf.precision)
    # the optimizer builds with its implementation on CPU parameters (fused Adam exists on CPU)
    opt = perf.optimizer(instantiate(cfg.optimizer, "optimizer"))([nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, torch.optim.Adam)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("performance.precision=fp8", "performance.precision='fp8': must be one of auto, 32-true"),
        ("performance.compile=maybe", "performance.compile='maybe': must be true or false"),
        ("performance.compile_mode=fast", "performance.compile_mode='fast': must be one of default"),
        ("performance.channels_last=2", "performance.channels_last=2: must be true or false"),
        ("performance.optimizer_impl=fastest", "performance.optimizer_impl='fastest': must be one of auto"),
        ("performance.matmul_precision=low", "performance.matmul_precision='low': must be one of highest"),
        ("performance.device_data=yes", "performance.device_data='yes': must be true or false"),
        ("trainer.precision=fp8", "trainer.precision='fp8': must be one of auto, 32-true"),
        (
            "trainer.precision=16-mixed performance.precision=bf16-mixed",
            "trainer.precision=16-mixed conflicts with performance.precision=bf16-mixed",
        ),
    ],
)
def test_bad_values_stop_the_run_with_one_line(override, message, tmp_path):
    with pytest.raises(GenexpError) as err:
        train(compose_cfg([*tiny("vae"), *override.split()], tmp_path / "run"))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_precision_auto_resolves_for_the_accelerator(monkeypatch):
    perf = Performance()
    monkeypatch.setattr("genexp.lit.performance.cuda_has_bf16", lambda: True)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # accelerator=auto finds the GPU
    assert perf.trainer_precision(None, "gpu") == "bf16-mixed"
    assert perf.trainer_precision(None, "auto") == "bf16-mixed"
    assert perf.trainer_precision(None, "cpu") == "32-true"
    # an explicit trainer.precision (a recipe that needs float32) wins over auto ...
    assert perf.trainer_precision("32-true", "gpu") == "32-true"
    assert perf.trainer_precision(32, "gpu") == "32-true"
    # ... and agrees with an explicit performance.precision, aliases included
    assert Performance(precision="bf16").trainer_precision("bf16-mixed", "gpu") == "bf16-mixed"
    with pytest.raises(GenexpError, match="cannot fork"):
        perf.trainer_precision(None, "gpu", "ddp_fork")
    monkeypatch.setattr("genexp.lit.performance.cuda_has_bf16", lambda: False)  # e.g. a V100
    assert perf.trainer_precision(None, "gpu") == "32-true"


def test_glow_recipe_keeps_float32_on_a_bf16_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr("genexp.lit.performance.cuda_has_bf16", lambda: True)
    cfg = compose_cfg(["experiment=glow_cifar10", "accelerator=gpu"], tmp_path)
    perf = instantiate(cfg.performance, "performance")
    assert perf.trainer_precision(cfg.trainer.precision, cfg.trainer.accelerator) == "32-true"
    cfg = compose_cfg(["experiment=ddpm_cifar10", "accelerator=gpu"], tmp_path)
    assert perf.trainer_precision(cfg.trainer.precision, cfg.trainer.accelerator) == "bf16-mixed"


@pytest.mark.parametrize(("precision", "autocast"), [("32", None), ("bf16-mixed", torch.bfloat16)])
def test_precision_reaches_the_training_step(precision, autocast, tmp_path, monkeypatch):
    seen = []
    step = GenerativeModule.training_step

    def spy(self, batch, batch_idx):
        enabled = torch.is_autocast_enabled("cpu")
        seen.append(torch.get_autocast_dtype("cpu") if enabled else None)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(GenerativeModule, "training_step", spy)
    metrics = train(compose_cfg([*tiny("vae"), f"performance.precision={precision}"], tmp_path / "run"))
    assert seen == [autocast] * 3
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics["test"].values())


# ---------------------------------------------------------------- networks, channels_last, compile
EXPECTED_NETWORKS = {
    "ae": ["encoder", "decoder"],
    "vae": ["encoder", "decoder"],
    "gan": ["generator", "discriminator"],  # not generator_ema: frozen
    "realnvp": ["flow"],
    "glow": ["flow"],
    "ddpm": ["diffusion.net"],  # the UNet inside the diffusion process
    "ldm": ["diffusion.net"],  # not the frozen first stage
    "pixelcnn": ["net"],
    "pixel_transformer": ["net"],
}


def family(name: str, request, *extra: str) -> nn.Module:
    overrides = [*tiny(name), *extra]
    if name == "ldm":
        overrides.append(f"model.first_stage={request.getfixturevalue('first_stage_run')}")
    if name == "gan":
        overrides.append("model.ema_decay=0.9")
    torch.manual_seed(0)
    return build_model(compose_cfg(overrides))


@pytest.mark.parametrize("name", sorted(EXPECTED_NETWORKS))
def test_networks_are_the_trained_nets_of_each_family(name, request):
    assert [n for n, _ in networks(family(name, request))] == EXPECTED_NETWORKS[name]


def losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    torch.manual_seed(1)  # the same noise (reparameterisation, t, eps, dequantisation) in each call
    if hasattr(model, "d_loss"):
        return [model.d_loss(x, y).loss, model.g_loss(x, y).loss]
    return [model.loss(x, y).loss]


@pytest.mark.parametrize("name", sorted(EXPECTED_NETWORKS))
def test_channels_last_gives_the_same_loss(name, request):
    model = family(name, request)
    with torch.no_grad():  # off the zero-initialised output layers, so the loss depends on every weight
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randint(0, 256, (4, 1, 16, 16)).float() / 255
    y = torch.zeros(4, dtype=torch.long)
    eager = losses(model, x, y)
    module = GenerativeModule(model=model, optimizer=torch.optim.Adam)
    Performance(channels_last=True).setup(None, module, "fit")
    weights = [p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] > 1]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    # it converted (the pixel Transformer and latent diffusion's MLP have no 4-D weights)
    assert name in ("pixel_transformer", "ldm") or any(not p.is_contiguous() for p in weights)
    for a, b in zip(eager, losses(model, x, y)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def fake_trainer() -> SimpleNamespace:
    return SimpleNamespace(is_global_zero=True, precision="32-true")


def test_compile_is_in_place_and_keeps_the_state_dict_keys(request):
    model = family("gan", request)
    module = GANModule(model=model, optimizer=torch.optim.Adam)
    keys = list(module.state_dict())
    perf = Performance(compile=True, compile_mode="max-autotune")
    perf.on_fit_start(fake_trainer(), module)
    assert perf.compiled == ["generator", "discriminator"]
    assert model.generator._compiled_call_impl is not None
    assert model.discriminator._compiled_call_impl is not None
    assert model.generator_ema._compiled_call_impl is None  # frozen copy, not trained
    assert list(module.state_dict()) == keys  # no _orig_mod. prefixes: checkpoints load in eager
    assert copy.deepcopy(model).generator._compiled_call_impl is None  # EMA copies stay eager


@pytest.fixture
def eager_backend_compile(monkeypatch):
    """``nn.Module.compile`` through dynamo with the ``eager`` backend: the same plumbing as
    inductor in ~2 s instead of a minute of C++ compilation (the slow tests use inductor)."""
    calls = []
    original = nn.Module.compile

    def compile_eager(self, *args, **kwargs):
        calls.append(type(self).__name__)
        original(self, *args, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(nn.Module, "compile", compile_eager)
    yield calls
    torch._dynamo.reset()


def test_compiled_run_checkpoint_loads_without_compile(tmp_path, eager_backend_compile):
    from genexp.checkpoints import load_model

    run = tmp_path / "run"
    metrics = train(compose_cfg([*tiny("vae"), "performance.compile=true"], run))
    assert eager_backend_compile == ["ConvEncoder", "ConvDecoder"]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])
    loaded = load_model(str(run))
    assert loaded.model.encoder._compiled_call_impl is None
    for name, tensor in loaded.model.state_dict().items():
        torch.testing.assert_close(tensor, ckpt["state_dict"][f"model.{name}"], rtol=0, atol=0)
    assert torch.isfinite(loaded.model.loss(torch.rand(2, 1, 16, 16)).loss)
    assert metrics["global_step"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vae", "ddpm"])
def test_compile_gives_the_same_loss_and_gradients_as_eager(name, request):
    """inductor (C++ on CPU): ~40 s for the tiny VAE, longer for the tiny UNet."""
    model = family(name, request)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randint(0, 256, (4, 1, 16, 16)).float() / 255
    y = torch.zeros(4, dtype=torch.long)
    eager_model = copy.deepcopy(model)
    (eager,) = losses(eager_model, x, y)
    eager.backward()
    Performance(compile=True).on_fit_start(fake_trainer(), GenerativeModule(model, torch.optim.Adam))
    (compiled,) = losses(model, x, y)
    compiled.backward()
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    for (n, a), b in zip(eager_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.slow
def test_inductor_compiled_run_checkpoint_loads_without_compile(tmp_path):
    from genexp.checkpoints import load_model

    run = tmp_path / "run"
    train(compose_cfg([*tiny("vae"), "performance.compile=true"], run))
    torch._dynamo.reset()
    loaded = load_model(str(run))
    assert loaded.model.encoder._compiled_call_impl is None
    assert torch.isfinite(loaded.model.loss(torch.rand(2, 1, 16, 16)).loss)


# ---------------------------------------------------------------- optimizer implementations
@pytest.mark.parametrize(
    ("impl", "defaults"),
    [
        ("auto", {"fused": None, "foreach": None}),  # CPU: torch's own default, the numbers as before
        ("fused", {"fused": True}),
        ("foreach", {"foreach": True}),
        ("for_loop", {"foreach": False}),
    ],
)
def test_optimizer_impl_reaches_the_optimizer(impl, defaults):
    factory = Performance(optimizer_impl=impl).optimizer(functools.partial(torch.optim.Adam, lr=1e-3))
    opt = factory([nn.Parameter(torch.zeros(3))])
    assert {k: opt.defaults[k] for k in defaults} == defaults
    # the GAN's two optimizers get it too, with the model's per-network arguments on top
    gan = GANModule(model=build_model(compose_cfg(tiny("gan"))), optimizer=factory)
    for opt in gan.configure_optimizers():
        assert {k: opt.defaults[k] for k in defaults} == defaults
        assert opt.defaults["betas"] == tuple(gan.optimizer_args["generator"]["betas"])


def test_optimizer_impl_of_this_run_wins_over_a_resumed_optimizer_state():
    params = [nn.Parameter(torch.zeros(3))]
    saved = torch.optim.Adam(params, fused=True)
    params[0].grad = torch.ones(3)
    saved.step()
    opt = Performance(optimizer_impl="foreach").optimizer(torch.optim.Adam)(params)
    opt.load_state_dict(saved.state_dict())
    assert opt.param_groups[0]["fused"] is True  # torch restores the saved flags ...
    trainer = SimpleNamespace(optimizers=[opt], precision="32-true", gradient_clip_val=None)
    module = SimpleNamespace(model=nn.Linear(1, 1))
    Performance(optimizer_impl="foreach").on_train_start(trainer, module)
    assert (opt.param_groups[0]["fused"], opt.param_groups[0]["foreach"]) == (None, True)  # ... not here
    opt.step()  # and it still steps
    Performance(optimizer_impl="auto").on_train_start(trainer, module)
    assert (opt.defaults["fused"], opt.defaults["foreach"]) == (None, None)


def test_optimizer_impl_auto_is_fused_on_cuda_when_the_optimizer_has_it():
    cuda = torch.device("cuda")
    assert impl_kwargs(torch.optim.Adam, "auto", cuda) == {"fused": True}
    assert impl_kwargs(torch.optim.SGD, "auto", cuda) == {"fused": True}
    assert impl_kwargs(torch.optim.RMSprop, "auto", cuda) == {}  # no fused kernel: torch's foreach
    assert impl_kwargs(torch.optim.Adam, "auto", torch.device("cpu")) == {}
    assert impl_kwargs(torch.optim.Adam, "foreach", cuda) == {"foreach": True}
    # Lightning's mixed precision refuses to clip a fused optimizer's gradients: auto avoids it
    assert impl_kwargs(torch.optim.Adam, "auto", cuda, clipped_amp=True) == {}


def test_fused_optimizer_with_clipping_under_mixed_precision_is_refused_before_training(tmp_path):
    assert clips_under_amp("bf16-mixed", 1.0)
    assert clips_under_amp("16-mixed", None, 1.0)  # the GAN clips in its own step (module.clip_grad_norm)
    assert not clips_under_amp("32-true", 1.0, 1.0) and not clips_under_amp("bf16-mixed", 0.0)
    fused = [*tiny("vae"), "performance.precision=bf16-mixed", "performance.optimizer_impl=fused"]
    with pytest.raises(GenexpError, match=r"^performance.optimizer_impl=fused: Lightning's mixed precision"):
        train(compose_cfg([*fused, "trainer.gradient_clip_val=1.0"], tmp_path / "clipped"))
    assert not (tmp_path / "clipped" / "checkpoints").exists()
    assert train(compose_cfg(fused, tmp_path / "run"))["global_step"] == 3  # fused AMP without clipping


def test_optimizer_impl_that_the_optimizer_lacks_is_one_line(tmp_path):
    overrides = ["optimizer=sgd", "optimizer._target_=torch.optim.RMSprop", "~optimizer.nesterov"]
    with pytest.raises(GenexpError) as err:
        train(compose_cfg([*tiny("vae"), *overrides, "performance.optimizer_impl=fused"], tmp_path / "run"))
    assert str(err.value) == (
        "performance.optimizer_impl=fused: RMSprop has no fused implementation; "
        "use performance.optimizer_impl=foreach or auto"
    )
    lbfgs = Performance(optimizer_impl="foreach").optimizer(torch.optim.LBFGS)
    with pytest.raises(GenexpError, match="LBFGS takes no foreach argument"):
        lbfgs([nn.Parameter(torch.zeros(1))])


# ---------------------------------------------------------------- device-resident data
def datamodules(device_data: bool, num_images: int = 200) -> DataModule:
    dm = DataModule(Synthetic(num_images=num_images, seed=1), batch_size=16, seed=3, device_data=device_data)
    dm.setup()
    return dm


def batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b) > 0
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.dtype == xb.dtype


def test_device_loader_yields_the_dataloader_batches_for_the_same_seed():
    host, device = datamodules(False), datamodules(True)
    loader, resident = host.train_dataloader(), device.train_dataloader()
    assert isinstance(resident, DeviceLoader) and len(resident) == len(loader) == 10  # 160 train, drop_last
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)  # what Lightning calls each epoch
        resident.sampler.set_epoch(epoch)
        assert_same_batches(batches(resident), batches(loader))
    fresh = device.train_dataloader()  # epoch 0 again
    assert not torch.equal(next(iter(resident))[0], next(iter(fresh))[0])  # epochs 1 and 0 differ
    # a run resumed after 3 batches of epoch 1 continues with the same batches
    loader, resident = host.train_dataloader(), device.train_dataloader()
    loader.sampler.start_at(1, 48)
    resident.sampler.start_at(1, 48)
    resumed = batches(resident)
    assert_same_batches(resumed, batches(loader))
    assert len(resumed) == 7
    for split in ("val_dataloader", "test_dataloader"):  # in order, the last batch kept
        assert_same_batches(batches(getattr(device, split)()), batches(getattr(host, split)()))


def test_device_data_shards_like_the_dataloader_under_ddp():
    """Rank r of 3 gets the DataLoader path's share: EpochSampler's for training, and for val/test
    the DistributedSampler Lightning puts into a DataLoader; together the ranks cover every image."""
    host, device = datamodules(False, num_images=130), datamodules(True, num_images=130)  # 104 train
    train_shares = []
    for rank in range(3):
        device.trainer = SimpleNamespace(
            global_rank=rank,
            world_size=3,
            strategy=SimpleNamespace(root_device=torch.device("cpu")),
            fit_loop=SimpleNamespace(restarting=False),
        )
        host.trainer = device.trainer
        loader, resident = host.train_dataloader(), device.train_dataloader()
        loader.sampler.set_epoch(1)
        resident.sampler.set_epoch(1)
        assert_same_batches(batches(resident), batches(loader))
        train_shares.append(torch.cat([x for x, _ in batches(resident)]))
        val = batches(device.val_dataloader())
        dist = DistributedSampler(host.splits.val, num_replicas=3, rank=rank, shuffle=False)
        expected = [host.splits.val[i][0] for i in dist]
        assert len(val) == 1 and torch.equal(val[0][0], torch.stack(expected))
    assert [len(s) for s in train_shares] == [32, 32, 32]  # 35 per rank, 2 batches of 16 each
    assert len({s.sum().item() for s in train_shares}) == 3  # different images on each rank


def test_device_data_refuses_data_decoded_image_by_image():
    from genexp.lit.device_data import to_device

    class Lazy(torch.utils.data.Dataset):
        def __len__(self):
            return 4

    with pytest.raises(GenexpError, match=r"^performance.device_data=true: Lazy decodes images one by one"):
        to_device(Lazy(), torch.device("cpu"))
    images = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    x, y = to_device(ImageTensorDataset(images), torch.device("cpu"))
    assert x.dtype == torch.uint8 and torch.equal(y, torch.tensor([-1, -1]))


def test_device_data_run_sees_the_dataloader_batches_also_after_a_resume(tmp_path, monkeypatch):
    """End to end: the same training batches with and without device data, in a run of 5 steps
    (3 batches an epoch) and in one stopped after 2 steps and resumed (``start_at``: the resumed
    loader skips the batches already trained on, as the DataLoader's sampler does)."""
    seen: list[tuple[str, float]] = []
    step = GenerativeModule.training_step

    def spy(self, batch, batch_idx):
        x, y = batch
        seen.append((type(self.trainer.train_dataloader).__name__, float((x * 255).sum() + y.sum())))
        return step(self, batch, batch_idx)

    monkeypatch.setattr(GenerativeModule, "training_step", spy)

    def run(name, *extra):
        train(compose_cfg([*tiny("vae"), "trainer.max_epochs=-1", *extra], tmp_path / name))
        out = list(seen)
        seen.clear()
        return out

    def resumed(name, *extra):
        first = run(name, "trainer.max_steps=2", *extra)
        return first + run(name, "trainer.max_steps=5", f"ckpt_path={tmp_path / name}", *extra)

    host = run("host", "trainer.max_steps=5")
    resident = run("device", "trainer.max_steps=5", "performance.device_data=true", "data.num_workers=2")
    assert {k for k, _ in host} == {"DataLoader"} and {k for k, _ in resident} == {"DeviceLoader"}
    assert [v for _, v in resident] == [v for _, v in host] and len({v for _, v in host}) == 5
    host_resumed = resumed("host_resumed")
    device_resumed = resumed("device_resumed", "performance.device_data=true")
    assert {k for k, _ in device_resumed} == {"DeviceLoader"}
    assert [v for _, v in device_resumed] == [v for _, v in host_resumed]
    # the resumed loader skipped what was trained: neither epoch's first batch again
    # stopped by max_steps inside epoch 0 and resumed: the rest of epoch 0, then epoch 1, exactly as
    # the run that never stopped (genexp.lit.resume_position.reopen_stopped_epoch)
    assert [v for _, v in device_resumed] == [v for _, v in resident]


# ---------------------------------------------------------------- GPU only
@CUDA
def test_gpu_auto_precision_fused_optimizer_and_device_data(tmp_path):
    cfg = compose_cfg([*tiny("ddpm"), "accelerator=gpu"], tmp_path)
    perf = instantiate(cfg.performance, "performance")
    bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    assert perf.trainer_precision(None, "gpu") == ("bf16-mixed" if bf16 else "32-true")
    opt = perf.optimizer(torch.optim.Adam)([nn.Parameter(torch.zeros(3, device="cuda"))])
    assert opt.defaults["fused"] is True
    host, device = datamodules(False), datamodules(True)
    images, labels = device.splits.train.images.cuda(), device.splits.train.labels.cuda()
    resident = DeviceLoader(images, labels, 16, EpochSampler(len(images), seed=3), drop_last=True)
    on_gpu = batches(resident)
    assert on_gpu[0][0].is_cuda
    assert_same_batches([(x.cpu(), y.cpu()) for x, y in on_gpu], batches(host.train_dataloader()))


@CUDA
def test_gpu_recipe_trains(tmp_path):
    overrides = [
        *tiny("ddpm"),
        "accelerator=gpu",
        "performance.compile=true",
        "performance.channels_last=true",
        "performance.device_data=true",
        "performance.matmul_precision=high",
    ]
    metrics = train(compose_cfg(overrides, tmp_path / "run"))
    assert metrics["global_step"] == 3 and all(
        isinstance(v, float) and v == v for v in metrics["test"].values()
    )


@pytest.mark.slow
def test_ddp_device_data_trains_like_the_dataloader(tmp_path):
    """Two gloo processes (~20 s each): the same shard per rank on both paths gives the same weights."""
    import subprocess
    import sys

    from genexp.checkpoints import load_model

    common = [*tiny("ae"), "optimizer=sgd", "trainer.max_epochs=2", "accelerator=ddp_cpu"]
    for name, extra in (("host", []), ("device", ["performance.device_data=true"])):
        cmd = [
            sys.executable,
            "-m",
            "genexp.cli",
            "train",
            *common,
            *extra,
            f"hydra.run.dir={tmp_path / name}",
        ]
        out = subprocess.run(
            cmd,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert out.returncode == 0, out.stderr[-3000:]
    assert "device data True" in (tmp_path / "device" / "train.log").read_text()
    host, device = (dict(load_model(str(tmp_path / n)).model.named_parameters()) for n in ("host", "device"))
    for key, value in host.items():
        torch.testing.assert_close(device[key], value, rtol=0, atol=0, msg=key)


def test_precision_auto_on_a_cpu_follows_the_family_and_the_cpu(monkeypatch):
    """auto on the CPU: bf16-mixed only where the CPU has AMX and the family's cpu_bf16 is true."""
    perf = Performance()
    monkeypatch.setattr("genexp.lit.performance.cpu_has_amx", lambda: True)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert perf.trainer_precision(None, "cpu", cpu_bf16=True) == "bf16-mixed"
    assert perf.trainer_precision(None, "auto", cpu_bf16=True) == "bf16-mixed"  # auto with no GPU is the CPU
    assert perf.trainer_precision(None, "cpu", cpu_bf16=False) == "32-true"
    assert perf.trainer_precision("32-true", "cpu", cpu_bf16=True) == "32-true"  # an explicit value wins
    monkeypatch.setattr("genexp.lit.performance.cpu_has_amx", lambda: False)  # no native bf16
    assert perf.trainer_precision(None, "cpu", cpu_bf16=True) == "32-true"


def test_family_nodes_keep_fp32_where_bf16_failed_the_check():
    """scripts/bench_precision.py's verdict (docs/benchmarks.md): Glow's bf16 curve left fp32's, the
    LDM's MLP gained 1.09x; every other family matched fp32 at 1.4-2.7x."""
    from genexp import families

    fp32 = {name for name in families.names() if not families.get(name).cpu_bf16}
    assert fp32 == {"glow", "ldm"}


def test_a_cpu_run_trains_in_the_precision_auto_picked(tmp_path, monkeypatch):
    monkeypatch.setattr("genexp.lit.performance.cpu_has_amx", lambda: True)
    cfg = compose_cfg(tiny("vae"), tmp_path)
    from genexp.build import build_run

    assert build_run(cfg, tmp_path / "run", None).trainer.precision == "bf16-mixed"
    monkeypatch.setattr("genexp.lit.performance.cpu_has_amx", lambda: False)
    assert build_run(cfg, tmp_path / "run2", None).trainer.precision == "32-true"
