"""Recipes ship with the package, load by name, and agree with their command's config (as litgpt's config hub
test does); each flag is declared once, on its config field."""

import dataclasses
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from zhllama.config import (
    CleanConfig,
    DpoConfig,
    LoadConfig,
    ServeConfig,
    SftConfig,
    TrainConfig,
    flag_of,
    load_config,
    recipe_files,
    recipe_names,
    recipe_path,
)
from zhllama.errors import ZhllamaError

REPO = Path(__file__).resolve().parents[1]
# A recipe's name says which command reads it.
CONFIG_BY_PREFIX = {"pretrain_": TrainConfig, "sft_": SftConfig, "dpo_": DpoConfig, "clean_": CleanConfig}


def config_for(name: str):
    matches = [cls for prefix, cls in CONFIG_BY_PREFIX.items() if name.startswith(prefix)]
    assert len(matches) == 1, f"recipe {name!r} does not say which command it is for (prefix: {list(CONFIG_BY_PREFIX)})"
    return matches[0]


@pytest.mark.parametrize("name", [n for n in recipe_names() if not n.startswith("accelerate_")])
def test_every_recipe_loads_into_its_config(name):
    cls = config_for(name)
    path = recipe_path(name)
    values = yaml.safe_load(path.read_text(encoding="utf-8"))
    cfg = load_config(cls, name)
    assert isinstance(cfg, cls)
    for key, value in values.items():  # every value the recipe sets arrives, typed as the field says
        got = getattr(cfg, key)
        if dataclasses.is_dataclass(got):
            for sub, subvalue in value.items():
                assert getattr(got, sub) == subvalue, f"{name}: {key}.{sub}"
        elif isinstance(got, tuple):
            assert got == tuple(tuple(v) if isinstance(v, list) else v for v in value)
        else:
            assert got == value, f"{name}: {key}"
    if cls is SftConfig:
        assert cfg.template, f"{name}: an SFT recipe names its template"
    # the recipe by path loads the same as by name
    assert load_config(cls, path) == cfg


def test_engine_configs():
    from accelerate.commands.config.config_args import ClusterConfig

    engine = {p.stem: p for p in recipe_files() if p.stem.startswith(("accelerate_", "ds_"))}
    assert set(engine) == {"accelerate_fsdp", "accelerate_deepspeed_zero2", "accelerate_deepspeed_zero3", "ds_zero2",
                           "ds_zero3"}
    fsdp = ClusterConfig.from_yaml_file(str(engine["accelerate_fsdp"]))
    assert fsdp.distributed_type == "FSDP" and fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    for stage in (2, 3):
        zero = ClusterConfig.from_yaml_file(str(engine[f"accelerate_deepspeed_zero{stage}"]))
        assert zero.distributed_type == "DEEPSPEED" and zero.deepspeed_config["zero_stage"] == stage
    for stage in (2, 3):
        ds = json.loads(engine[f"ds_zero{stage}"].read_text())
        assert ds["zero_optimization"]["stage"] == stage


def test_unknown_recipe_names_the_shipped_ones(tmp_path):
    with pytest.raises(ZhllamaError, match=r"nope: no such recipe file.*sft_lora"):
        load_config(SftConfig, "nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: [1\n")
    with pytest.raises(ZhllamaError, match="not valid YAML"):
        load_config(TrainConfig, bad)
    bad.write_text("max_stepz: 3\n")
    with pytest.raises(ZhllamaError, match="unknown config field 'max_stepz'"):
        load_config(TrainConfig, bad)


def test_flags_override_the_recipe_and_none_keeps_it():
    cfg = load_config(SftConfig, "sft_lora", {"max_steps": 7, "lr": None, "template": "chatml"})
    recipe = yaml.safe_load(recipe_path("sft_lora").read_text())
    assert (cfg.max_steps, cfg.lr, cfg.template) == (7, recipe["lr"], "chatml")


def test_tuple_fields_are_typed():
    cfg = load_config(CleanConfig, None, {"top_ngram_shares": [[2, 0.25], [3, 0.2]]})
    assert cfg.top_ngram_shares == ((2, 0.25), (3, 0.2))
    with pytest.raises(ZhllamaError, match=r"top_ngram_shares\[0\]' must have 2 items"):
        load_config(CleanConfig, None, {"top_ngram_shares": [[2]]})
    with pytest.raises(ZhllamaError, match="must be a number"):
        load_config(CleanConfig, None, {"top_ngram_shares": [[2, "x"]]})


def test_each_flag_is_declared_once_per_config():
    for cls in (TrainConfig, SftConfig, CleanConfig, LoadConfig, ServeConfig):
        names = [name for f in dataclasses.fields(cls) if flag_of(f)
                 for decl in flag_of(f).names for name in decl.split("/")]
        names += [s[0] for f in dataclasses.fields(cls) if flag_of(f) for s in flag_of(f).shortcuts]
        assert len(names) == len(set(names)), cls
    # commands that share a setting share its flag name
    assert {f.name for f in dataclasses.fields(LoadConfig)} <= {f.name for f in dataclasses.fields(ServeConfig)}
    assert flag_of(next(f for f in dataclasses.fields(TrainConfig) if f.name == "rope_factor")).names == \
        ("--rope-factor",)


def test_recipes_are_in_the_installed_package(tmp_path):
    """A non-editable install has the recipes: build the wheel from a copy of the tree and look inside."""
    tree = tmp_path / "tree"
    shutil.copytree(REPO / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, tree / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(tree),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, cwd=tree)
    [wheel] = (tmp_path / "dist").glob("zhllama-*.whl")
    shipped = {Path(n).name for n in zipfile.ZipFile(wheel).namelist() if "/recipes/" in n}
    assert shipped == {p.name for p in recipe_files()}
