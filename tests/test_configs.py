"""Every YAML in configs/ composes against the typed schema; typos and bad values are refused."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError

from dipgo.errors import ConfigError
from dipgo.search.compose import GROUPS, compose_config, list_options
from dipgo.search.config import Config


def _all_group_options() -> list[tuple[str, str]]:
    return [(g, o) for g in GROUPS for o in list_options(g)]


def test_every_yaml_is_reachable_from_a_group() -> None:
    root = resources.files("dipgo.configs")
    on_disk = {f"{d.name}/{f.name[:-5]}" for d in root.iterdir() if d.is_dir() for f in d.iterdir() if f.name.endswith(".yaml")}
    listed = {f"{g}/{o}" for g, o in _all_group_options()}
    assert on_disk == listed, f"YAML files outside the known groups: {on_disk - listed}"


@pytest.mark.parametrize(("group", "option"), _all_group_options())
def test_every_config_composes(group: str, option: str) -> None:
    cfg, choices = compose_config([f"{group}={option}"])
    assert choices[group] == option
    # the schema is attached: the composed config is typed and refuses new keys
    assert OmegaConf.get_type(cfg) is Config
    assert OmegaConf.is_struct(cfg)
    with pytest.raises(ConfigAttributeError):
        cfg.not_a_schema_key = 1


def test_recipe_sets_its_name_and_groups() -> None:
    cfg, choices = compose_config(["recipe=digits_dit_reuse"])
    assert cfg.recipe_name == "digits_dit_reuse"
    assert cfg.model.name == "digits_dit"
    assert choices["model"] == "digits_dit"


def test_unet_reuse_recipes_learn_the_placement_and_keep_their_gate_steps() -> None:
    """The DPM-25 recipe inherits the default's placement but not its short gate training: its
    benchmark (docs/RESULTS.md) was measured with 100 gate steps, the default's with 20."""
    ddim, _ = compose_config(["recipe=digits_unet_reuse"])
    dpm, _ = compose_config(["recipe=digits_unet_reuse_dpm25"])
    assert ddim.search.placement.enabled and dpm.search.placement.enabled
    assert (ddim.trainer.max_steps, dpm.trainer.max_steps) == (20, 100)
    assert (dpm.supernet.scheduler, dpm.supernet.num_steps) == ("dpmsolver++", 25)


def test_dpm25_recipes_also_learn_a_solver_schedule_and_ddim50_recipes_do_not() -> None:
    """The learned UniPC schedule is measured on the DPM-Solver++-25 references (docs/RESULTS.md);
    the DDIM-50 recipes keep their forecast plans and their 5-minute search."""
    for model in ("unet", "dit"):
        dpm, _ = compose_config([f"recipe=digits_{model}_reuse_dpm25"])
        ddim, _ = compose_config([f"recipe=digits_{model}_reuse"])
        assert dpm.search.schedule.enabled and not ddim.search.schedule.enabled
        assert (dpm.search.schedule.solver, dpm.search.schedule.batch) == ("unipc", 8)


def test_override_is_typed() -> None:
    cfg, _ = compose_config(["search.target=0.3", "trainer.max_steps=7"])
    assert cfg.search.target == pytest.approx(0.3)
    assert cfg.trainer.max_steps == 7


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["recipe=nope"], "unknown recipe 'nope'; available recipe options: digits_dit_joint, digits_dit_reuse"),
        (["model=nope"], "unknown model 'nope'"),
        (["search.tgt=0.3"], "unknown config key 'search.tgt'; keys accepted under search: target"),
        (["search.target=abc"], "search.target='abc' is invalid"),
        (["trainer.max_steps=1.5"], "trainer.max_steps='1.5' is invalid"),
        (["search.target=0"], "search.target must be in (0, 1]"),
        (["search.target=1.5"], "search.target must be in (0, 1]"),
        (["supernet.scheduler=foo"], "supernet.scheduler='foo' is not supported; accepted: ddim"),
        (["supernet.scheduler=unipc3"], "supernet.scheduler='unipc3' is not supported; accepted: ddim, dpmsolver++, euler, unipc"),
        (["search.target"], "cannot parse override 'search.target'"),
    ],
)
def test_bad_config_is_one_sentence(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose_config(overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_saved_config_with_the_old_sds_boolean_still_loads(tmp_path: Path) -> None:
    """Runs written before ``supernet.sds`` became a group keep working with resume/bench/export."""
    from dipgo.search.compose import load_saved_config

    cfg, _ = compose_config(["recipe=minilm_sparse"])
    data = OmegaConf.to_container(cfg, resolve=True)
    data["supernet"]["sds"] = True
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(data))
    base, _ = compose_config()
    merged = OmegaConf.merge(base, load_saved_config(tmp_path / "config.yaml"))
    assert merged.supernet.sds.enabled is True and merged.supernet.sds.steps == 100
