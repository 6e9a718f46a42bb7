"""Every primary config in conf/ composes against its typed schema, and typos fail."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf


CONF = Path(__file__).resolve().parents[1] / "conf"
PRIMARY = sorted(p.stem for p in CONF.glob("*.yaml"))
for _name in PRIMARY:  # each primary config belongs to the entry module its name starts with
    importlib.import_module(f"redundancy.{_name.split('_')[0]}")  # registers its typed schema


@pytest.mark.parametrize("name", PRIMARY)
def test_config_composes(name: str) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name=name)
    assert OmegaConf.to_object(cfg)  # resolves and builds the typed object


@pytest.mark.parametrize("name", PRIMARY)
def test_typo_fails(name: str) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        with pytest.raises(ConfigCompositionException):
            compose(config_name=name, overrides=["ratoi=0.1"])
