"""`train(cfg)`: one stage, read top to bottom.

compose -> build_vlm -> init_from -> stages.apply -> data -> Lightning fit -> checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from vlmlab import checkpoints, stages
from vlmlab.data.datamodule import EpochSetter, VLMDataModule
from vlmlab.data.prepare import resolve_dataset
from vlmlab.data.templates import get_template
from vlmlab.data.tokenize import TextEncoder
from vlmlab.errors import ConfigError
from vlmlab.eval.heldout import HeldoutEval
from vlmlab.logs import setup_logging
from vlmlab.models import build_vlm
from vlmlab.stages.policy import format_table
from vlmlab.tracking.mlflow import flatten, git_commit, tracking_uri
from vlmlab.training.module import VLMModule

log = logging.getLogger(__name__)

COMPONENTS = ("encoder", "connector", "llm")


def hydra_choices(cfg: DictConfig) -> dict[str, str]:
    """Config-group choices (encoder=clip336 ...) of the current Hydra run, if any."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        choices = HydraConfig.get().runtime.choices
        return {
            k: str(v) for k, v in choices.items() if not k.startswith("hydra") and v is not None
        }
    return {}


def task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def world_size(cfg: DictConfig) -> int:
    devices = cfg.trainer.get("devices", 1)
    if not isinstance(devices, int):
        raise ConfigError(
            "trainer.devices",
            f"got {devices!r}.",
            "give an integer so the global batch can be derived.",
        )
    return devices * int(cfg.trainer.get("num_nodes", 1))


def accumulation(cfg: DictConfig) -> int:
    """Gradient accumulation so that micro batch x devices x nodes x accumulation = global batch."""
    per_step = int(cfg.data.batch_size) * world_size(cfg)
    global_batch = int(cfg.stage.global_batch_size)
    if global_batch % per_step:
        raise ConfigError(
            "stage.global_batch_size",
            f"{global_batch} is not divisible by data.batch_size x devices x nodes = {per_step}.",
            "change stage.global_batch_size or data.batch_size.",
        )
    return global_batch // per_step


def resolve_init(
    cfg: DictConfig, fingerprints: dict[str, str], ckpt_root: Path, choices: dict[str, str]
) -> Path | None:
    """`stage.init_from`: null, a checkpoint folder, or `auto` (newest finished `stage.previous`)."""
    init_from = cfg.stage.get("init_from")
    previous = cfg.stage.get("previous")
    if init_from in (None, "", "null") or (init_from == "auto" and previous is None):
        return None
    if init_from != "auto":
        path = Path(init_from)
        meta = checkpoints.read_meta(path) if (path / checkpoints.META).is_file() else None
        if meta is None:
            raise ConfigError(
                "stage.init_from", f"{path} is not a vlmlab checkpoint folder (no meta.json)."
            )
        differ = [c for c, fp in meta.get("fingerprints", {}).items() if fingerprints.get(c) != fp]
        if differ:
            raise ConfigError(
                "stage.init_from",
                f"{path} was trained with a different {', '.join(differ)} than this run.",
            )
        return path
    found = checkpoints.find_latest(ckpt_root, str(previous), fingerprints)
    if found is None:
        keep = [o for o in task_overrides() if not o.startswith(("stage=", "stage.", "+stage"))]
        command = " ".join(["python train.py", f"stage={previous}", *keep])
        parts = " ".join(f"{c}={choices.get(c, '?')}" for c in COMPONENTS)
        raise ConfigError(
            "stage.init_from",
            f"auto found no finished stage-{previous} run with {parts} under {ckpt_root}.",
            f"run `{command}` first, or set stage.init_from=<checkpoint folder> (or null to start from the base weights).",
        )
    return found


def build_logger(cfg: DictConfig, root: Path, choices: dict[str, str]) -> Any:
    if cfg.logger.kind == "none":
        return None
    if cfg.logger.kind != "mlflow":
        raise ConfigError("logger.kind", f"got {cfg.logger.kind!r}.", "use mlflow or none.")
    from lightning.pytorch.loggers import MLFlowLogger

    tags = {f"choice.{k}": v for k, v in choices.items()}
    tags.update(
        {k: v for k, v in choices.items() if k in (*COMPONENTS, "stage", "data", "experiment")}
    )
    tags["stage"] = str(cfg.stage.name)
    tags.update(git_commit())
    run_name = cfg.logger.get("run_name") or "-".join(
        [f"stage{choices.get('stage', cfg.stage.name)}", *(choices.get(c, c) for c in COMPONENTS)]
    )
    return MLFlowLogger(
        experiment_name=str(cfg.logger.experiment_name),
        run_name=run_name,
        tracking_uri=tracking_uri(cfg.logger.get("tracking_uri"), root),
        tags=tags,
        artifact_location=str((root / "mlartifacts").resolve().as_uri()),
    )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one stage; returns the checkpoint folder and the final metrics."""
    started = time.time()
    setup_logging()
    root = Path(cfg.paths.root).resolve()
    ckpt_root = root / "checkpoints"
    choices = hydra_choices(cfg)
    L.seed_everything(int(cfg.seed), workers=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    # embed -> encode -> project -> scatter -> decode
    model, tokenizer = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    fingerprints = {c: checkpoints.component_fingerprint(cfg[c]) for c in COMPONENTS}
    init = resolve_init(cfg, fingerprints, ckpt_root, choices)
    if init is not None:
        checkpoints.load_chain(model, init)

    plan = stages.apply(cfg.stage, model)
    table = format_table(plan.table)
    log.info("stage %s parameters:\n%s", cfg.stage.name, table)

    template = get_template(cfg.stage.template, tokenizer.eos_token)
    text_encoder = TextEncoder(
        tokenizer, template, model.num_image_tokens, model.image_token_id, int(cfg.data.max_length)
    )
    dataset = resolve_dataset(cfg.data, str(cfg.stage.dataset))
    datamodule = VLMDataModule(
        dataset["shard_dir"],
        text_encoder,
        model.encoder.image_transform,
        batch_size=int(cfg.data.batch_size),
        num_workers=int(cfg.data.num_workers),
        shuffle_buffer=int(cfg.data.shuffle_buffer),
        seed=int(cfg.seed),
        prepare=dataset["prepare"],
    )
    datamodule.prepare_data()  # before the schedule is sized from the manifest

    accumulate = accumulation(cfg)
    epochs = int(cfg.stage.epochs)
    total_steps = max(1, epochs * datamodule.batches_per_epoch(world_size(cfg)) // accumulate)
    module = VLMModule(model, OmegaConf.to_container(cfg.stage.optim, resolve=True), total_steps)  # type: ignore[arg-type]

    callbacks: list[L.Callback] = [EpochSetter()]
    heldout_cb = None
    if cfg.stage.get("evaluate") and dataset.get("heldout") is not None:
        heldout_cb = HeldoutEval(
            text_encoder,
            model.encoder.image_transform,
            dataset["heldout"],
            dataset["image_root"],
            **OmegaConf.to_container(cfg.data.heldout, resolve=True),
        )  # type: ignore[arg-type]
        callbacks.append(heldout_cb)
    logger = build_logger(cfg, root, choices)
    if logger is not None:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer = L.Trainer(
        **trainer_kwargs,  # type: ignore[arg-type]
        max_epochs=epochs,
        accumulate_grad_batches=accumulate,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_checkpointing=False,
        default_root_dir=str(root / "lightning"),
    )
    if logger is not None and trainer.is_global_zero:
        clean = (
            OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k != "hydra"])
            if "hydra" in cfg
            else cfg
        )
        logger.log_hyperparams(flatten(clean))
        client, run_id = logger.experiment, logger.run_id
        client.log_text(run_id, OmegaConf.to_yaml(clean, resolve=True), "config.yaml")
        client.log_text(run_id, "\n".join(task_overrides()) + "\n", "overrides.txt")
        client.log_text(run_id, table + "\n", "parameters.txt")
        for row in plan.table:
            client.log_param(run_id, f"params.{row['component']}.trainable", row["trainable"])
        if init is not None:
            client.set_tag(run_id, "init_from", str(init))
    trainer.fit(module, datamodule=datamodule)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if heldout_cb is not None and heldout_cb.result is not None:
        metrics["eval/accuracy"] = heldout_cb.result["accuracy"]
    result: dict[str, Any] = {
        "metrics": metrics,
        "checkpoint": None,
        "seconds": time.time() - started,
    }
    if trainer.is_global_zero:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"{stamp}-stage{cfg.stage.name}-{'-'.join(choices.get(c, c) for c in COMPONENTS)}-{int(time.time() * 1e6) % 10**6:06d}"
        uses = list(cfg.stage.get("uses") or COMPONENTS)
        meta = {
            "stage": str(cfg.stage.name),
            "choices": choices,
            "fingerprints": {c: fingerprints[c] for c in uses},
            "parent": str(init) if init is not None else None,
            "mlflow_run_id": getattr(logger, "run_id", None),
            "global_step": trainer.global_step,
            "metrics": metrics,
        }
        result["checkpoint"] = str(checkpoints.save_trainable(model, ckpt_root / name, meta))
        if logger is not None:
            logger.experiment.set_tag(logger.run_id, "checkpoint", result["checkpoint"])
            logger.experiment.log_text(
                logger.run_id, json.dumps(meta, indent=1), "checkpoint_meta.json"
            )
    log.info("stage %s done in %.1fs: %s", cfg.stage.name, result["seconds"], metrics)
    return result
