"""Every primary config in conf/ composes against its typed schema, and typos fail."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import redundancy.bench  # noqa: F401  (registers bench_schema)
import redundancy.flops  # noqa: F401  (registers flops_schema)
import redundancy.microvqa  # noqa: F401  (registers its schema)

CONF = Path(__file__).resolve().parents[1] / "conf"
PRIMARY = sorted(p.stem for p in CONF.glob("*.yaml"))


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
