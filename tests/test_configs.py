"""Every command's primary config (``redundancy/conf/<command>/<command>.yaml``) composes against its
typed schema, and typos fail."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from redundancy.cli import CONF

MODULES = {"microvqa": "redundancy.micro.microvqa", "train": "redundancy.micro.train"}  # else redundancy.<command>
PRIMARY = sorted(p.parent.name for p in CONF.glob("*/*.yaml") if p.stem == p.parent.name)
for _name in PRIMARY:  # each command's module registers its typed schema
    importlib.import_module(MODULES.get(_name, f"redundancy.{_name}"))


def test_every_command_has_its_folder() -> None:
    assert PRIMARY == ["bench", "figures", "flops", "health", "maps", "microvqa", "sweep", "train"]


@pytest.mark.parametrize("name", PRIMARY)
def test_config_composes(name: str) -> None:
    with initialize_config_dir(config_dir=str(CONF / name), version_base=None):
        cfg = compose(config_name=name)
    typed = OmegaConf.to_object(cfg)  # resolves and builds the typed object
    assert dataclasses.is_dataclass(typed) and type(typed).__name__.lower() == f"{name}config", type(typed)


@pytest.mark.parametrize("name", PRIMARY)
def test_typo_fails(name: str) -> None:
    with initialize_config_dir(config_dir=str(CONF / name), version_base=None):
        with pytest.raises(ConfigCompositionException):
            compose(config_name=name, overrides=["ratoi=0.1"])
