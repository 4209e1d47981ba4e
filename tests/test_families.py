"""Family facts live in the family's own config: every ``configs/model/*.yaml`` has a valid
``model.family`` node (genexp.families), and no module outside ``models/`` and ``nets/`` names a
family in a string (a new family is one model file and one YAML, not an edit of every command)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml
from conftest import CONFIG_ROOT, compose_cfg, group_options, tiny
from omegaconf import OmegaConf

from genexp import families
from genexp.errors import GenexpError

PACKAGE = Path(__file__).resolve().parents[1] / "genexp"
FAMILY_DIRS = ("models", "nets")  # the families themselves: they may name one another
NAMES = group_options("model")


def test_names_are_the_model_options():
    assert families.names() == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_every_model_config_has_a_valid_family_node(name):
    node = yaml.safe_load((CONFIG_ROOT / "model" / f"{name}.yaml").read_text())["model"]
    written = set(node["family"])
    assert set(families.FIELDS) - set(families.OPTIONAL) <= written <= set(families.FIELDS), (
        "every field but the optional ones written out, none left to a default"
    )
    family = families.get(name)
    assert family.name == name and family.label and family.target == node["_target_"]
    assert set(family.ratings) == set(families.ASPECTS)
    assert set(family.ratings.values()) <= {*families.RATINGS, families.NOT_RATED}
    assert set(family.sample_options) <= set(families.SAMPLE_OPTIONS)
    assert family.tiny and all("=" in o for o in family.tiny)


def test_the_talks_ratings():
    """The talk's closing Summary table (seed/talk.txt, section 4), the families it rates."""
    marks = {name: "".join(families.get(name).ratings[a] for a in families.ASPECTS) for name in NAMES}
    assert {n: m for n, m in marks.items() if m != "————"} == {
        "vae": "△○△○",
        "ddpm": "○○○×",
        "ncsn": "○○○×",  # the talk's diffusion row covers both kinds (SBM and DPM)
        "score_sde": "○○○×",
        "realnvp": "○△△○",
        "glow": "○△△○",
        "gan": "××○○",
    }


@pytest.mark.parametrize("name", NAMES)
def test_tiny_overrides_compose(name, tmp_path):
    """A family's tiny overrides name keys its config has (Hydra refuses one it does not)."""
    cfg = compose_cfg(tiny(name), tmp_path)
    assert cfg.model._target_ == families.get(name).target
    for override in families.get(name).tiny:
        key, value = override.split("=", 1)
        assert str(OmegaConf.select(cfg, key)) == value, override


def test_a_stored_config_without_a_family_node_finds_its_family():
    """Checkpoints written before the family: node existed hold only the constructor's arguments."""
    stored = {"_target_": "genexp.models.vae.VAE", "latent_dim": 8, "image_size": 28}
    assert families.of_model_config(stored) == families.get("vae")
    assert families.of_model_config(OmegaConf.create(stored)) == families.get("vae")
    assert families.of_model_config({"_target_": "my.plugin.Model"}) is None
    own = {"_target_": "my.plugin.Model", "family": {"label": "Mine", "sample_options": ["temperature"]}}
    mine = families.of_model_config(own)
    assert mine.label == "Mine" and mine.sample_options == ("temperature",) and not mine.rated


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"label": "x", "colour": "red"}, "w.yaml: model.family.colour: not a family field"),
        ({"label": "x", "ratings": {"beauty": "○"}}, "w.yaml: model.family.ratings.beauty: not an aspect"),
        (
            {"label": "x", "ratings": {"speed": "o"}},
            "w.yaml: model.family.ratings.speed='o': not one of ○, △, ×, —",
        ),
        (
            {"label": "x", "sample_options": ["guidance"]},
            "w.yaml: model.family.sample_options: 'guidance' is not",
        ),
        (
            {"label": "x", "needs_first_stage": "yes"},
            "w.yaml: model.family.needs_first_stage='yes': must be true",
        ),
        (
            {"label": "x", "tiny": ["model.width"]},
            "w.yaml: model.family.tiny=['model.width']: must be a list",
        ),
        ({"ratings": {}}, "w.yaml: model.family.label=None: must be"),
        (
            {"label": "x", "selects": {"temperature": {"model.t": 1}}},
            "w.yaml: model.family.selects.temperature: not one of sampler, solver",
        ),
        (
            {"label": "x", "selects": {"solver": {"sample_with": "ode"}}},
            "w.yaml: model.family.selects.solver={'sample_with': 'ode'}: must map sampler/solver to",
        ),
    ],
)
def test_a_bad_family_node_is_one_line_naming_the_file_and_key(node, message):
    with pytest.raises(GenexpError) as err:
        families.parse("x", node, where="w.yaml: ")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_an_unknown_model_option_is_one_line():
    with pytest.raises(GenexpError, match=r"^model=nope: not a model option; pick one of ae, ddpm, "):
        families.get("nope")


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def family_names_in_strings(package: Path = PACKAGE) -> list[str]:
    """``file:line: 'name' in '<string>'`` for each string literal (f-string parts included,
    docstrings not) outside models/ and nets/ that holds a family name as a whole word: equal to
    it (``family == "gan"``) or inside a message (``"ldm needs a first stage"``). A dotted path
    into the families' own package (``genexp.models.vae.VAE``, the build registry) points at
    models/ and does not count."""
    word = "|".join(re.escape(n) for n in NAMES)
    pattern = re.compile(rf"(?<!\w)(?<!models\.)({word})(?!\w)")
    hits = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        if rel.parts[0] in FAMILY_DIRS:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                for m in pattern.finditer(node.value):
                    line = node.lineno + node.value.count("\n", 0, m.start())  # in a multi-line string
                    text = node.value[: m.end()].rsplit("\n", 1)[-1].strip()
                    hits.append(f"genexp/{rel}:{line}: {m.group(1)!r} in {text[-60:]!r}")
    return hits


def test_no_family_name_in_strings_outside_the_families():
    hits = family_names_in_strings()
    assert not hits, "family facts belong in configs/model/<name>.yaml (genexp.families):\n" + "\n".join(hits)


def test_a_run_dir_from_before_a_rename_resumes_under_the_new_keys(tmp_path):
    """A GAN run dir written before the training recipe moved to ``module:`` replays its
    ``model.d_optimizer.lr=4e-4`` as ``module.optimizers.discriminator.lr=4e-4`` (the family node's
    ``renamed``), which composes; a family without renames replays its overrides as they were."""
    from genexp.resume import replayed_overrides

    def run_dir(name: str, target: str, overrides: list[str]) -> Path:
        hydra_dir = tmp_path / name / ".hydra"
        hydra_dir.mkdir(parents=True)
        (hydra_dir / "config.yaml").write_text(f"model:\n  _target_: {target}\n")
        (hydra_dir / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        return hydra_dir.parent

    old = ["model=gan", "model.d_optimizer.lr=4e-4", "model.grad_clip=1.0", "model.z_dim=8"]
    replayed = replayed_overrides(run_dir("gan", "genexp.models.gan.GAN", old))
    assert replayed == [
        "model=gan",
        "module.optimizers.discriminator.lr=4e-4",
        "module.clip_grad_norm=1.0",
        "model.z_dim=8",
    ]
    cfg = compose_cfg([*replayed, "dataset=synthetic"], tmp_path / "out")
    assert cfg.module.optimizers.discriminator.lr == 4e-4 and cfg.module.clip_grad_norm == 1.0
    assert cfg.module.optimizers.generator.lr == cfg.optimizer.lr  # untouched: still the shared lr
    kept = ["model=vae", "model.d_optimizer.lr=4e-4"]  # not a key the VAE renamed: left alone
    assert replayed_overrides(run_dir("vae", "genexp.models.vae.VAE", kept)) == kept


def test_the_node_a_family_samples_with_follows_its_selects():
    """A family that samples by either node (score_sde: ``model.sample_with``) reports the one in
    use; any other family the node it has."""
    score_sde, flow = families.get("score_sde"), families.get("flow_matching")
    assert score_sde.selects == {
        "sampler": {"model.sample_with": "sde"},
        "solver": {"model.sample_with": "ode"},
    }
    both = {"sampler": {"_target_": "P"}, "solver": {"_target_": "S"}}
    assert families.active_node(score_sde, {**both, "sample_with": "sde"}) == "sampler"
    assert families.active_node(score_sde, {**both, "sample_with": "ode"}) == "solver"
    assert families.active_node(flow, {"solver": {"_target_": "S"}}) == "solver"
    assert families.active_node(None, {"sampler": {"_target_": "P"}}) == "sampler"
    assert families.active_node(flow, {"latent_dim": 8}) is None
