"""Where the Hydra config tree lives, and composing it in-process (tests, `vlmlab demo`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict


def conf_dir() -> Path:
    """$VLMLAB_CONF, else the repo's `conf/` (editable install or source checkout)."""
    env = os.environ.get("VLMLAB_CONF")
    if env:
        return Path(env).resolve()
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "conf" / "train.yaml"
        if candidate.is_file():
            return candidate.parent
    raise FileNotFoundError(
        "vlmlab config tree not found: install with `pip install -e .` from the repo or set VLMLAB_CONF=<repo>/conf."
    )


_NUMERIC_CHOICE = re.compile(r"^(?P<key>[+~]{0,2}[A-Za-z_][\w/@.]*)=(?P<value>\d+(,\d+)*)$")


def quote_numeric_choices(overrides: list[str], root: Path | None = None) -> list[str]:
    """`stage=2` -> `stage='2'`: Hydra parses 2 as an int and rejects it as a group option.

    Only keys that are config groups (folders of conf/) are touched, so `seed=1,2` stays numeric.
    """
    root = root or conf_dir()
    out = []
    for item in overrides:
        match = _NUMERIC_CHOICE.match(item)
        group = match and match["key"].lstrip("+~").split("@")[0]
        if match and group and (root / group).is_dir():
            values = ",".join(f"'{v}'" for v in match["value"].split(","))
            item = f"{match['key']}={values}"
        out.append(item)
    return out


def compose(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """Compose like `python train.py <overrides>` and register it as the current Hydra config."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose(
            config_name=config_name,
            overrides=quote_numeric_choices(list(overrides or [])),
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    return apply_stage_overrides(cfg)


def apply_stage_overrides(cfg: DictConfig) -> DictConfig:
    """Merge `stage_overrides[<stage name>]` (an experiment's per-stage deltas) into the config.

    An experiment states its recipe per stage (`stage_overrides: {"1": {stage: {optim: {lr: 2e-3}}}}`);
    the entry of the stage that runs is merged at the root, then the table is emptied, so the
    call is idempotent and the logged config is the effective one.
    """
    table = cfg.get("stage_overrides")
    if not table:
        return cfg
    delta = table.get(str(cfg.stage.name))
    with open_dict(cfg):
        if delta:
            merged = OmegaConf.merge(cfg, delta)
            for key in delta:
                cfg[key] = merged[key]
        cfg.stage_overrides = {}
    return cfg
