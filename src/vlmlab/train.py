"""`train(cfg)`: one stage, read top to bottom.

compose -> build_vlm -> init_from -> stages.apply -> data -> Lightning fit -> checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from vlmlab import checkpoints, launch, schema, stages
from vlmlab.data.datamodule import StreamPosition, VLMDataModule
from vlmlab.data.prepare import resolve_dataset
from vlmlab.data.tokenize import TextEncoder
from vlmlab.errors import ConfigError
from vlmlab.eval.callback import build_eval_callback
from vlmlab.logs import setup_logging
from vlmlab.models import as_dict, build_vlm
from vlmlab.stages.policy import format_table
from vlmlab.tracking import callbacks as tracking_callbacks
from vlmlab.tracking.mlflow import (
    flatten,
    git_commit,
    manifest_checksum,
    run_link,
    run_name,
    tracking_uri,
)
from vlmlab.tracking.outcome import ExceptionRecorder, track_outcome
from vlmlab.tracking.sweep import parent_run_id, swept_keys
from vlmlab.training import strategy as strategies
from vlmlab.training.audit import SampleRecorder
from vlmlab.training.deepspeed import optimizer_class
from vlmlab.training.emulate import EmulatedRanks
from vlmlab.training.module import VLMModule
from vlmlab.training.precision import apply_master_weights
from vlmlab.training.resumable import EpochEndCheckpoint, StepCheckpoint
from vlmlab.training.throughput import FlopsModel, Throughput

log = logging.getLogger(__name__)

COMPONENTS = ("encoder", "connector", "llm")
# Keys that do not change what a run computes: a resumed run may differ in them.
_NOT_IDENTITY = (
    "resume",
    "checkpoint",
    "trainer.max_steps",
    "trainer.enable_progress_bar",
    "logger.run_name",
    "debug",
    "trainer.peak_tflops",
)


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


def without_hydra(cfg: DictConfig) -> DictConfig:
    return (
        OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    )


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


def run_key(cfg: DictConfig) -> str:
    """Identity of a run's computation: equal keys may resume each other's checkpoints."""
    data = OmegaConf.to_container(without_hydra(cfg), resolve=True)
    assert isinstance(data, dict)
    for dotted in _NOT_IDENTITY:
        *parents, leaf = dotted.split(".")
        node = data
        for parent in parents:
            node = node.get(parent, {})
        node.pop(leaf, None)
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"stage{cfg.stage.name}-{digest}"


def resolve_resume(cfg: DictConfig, resume_dir: Path) -> tuple[Path | None, dict[str, Any]]:
    """`resume`: null, auto (this config's unfinished run) or a Lightning .ckpt path."""
    value = cfg.get("resume")
    requeued = launch.requeued_checkpoint(resume_dir)  # this SLURM job saved, then requeued
    if requeued is not None:
        path = requeued
    elif value in (None, "", "null"):
        return None, {}
    elif value == "auto":
        # the newest checkpoint that loads: a save killed midway never wins (checkpoints.py);
        # one older than the run's FINISHED mark belongs to that finished run
        last = checkpoints.newest_loadable(resume_dir)
        finished = resume_dir / "FINISHED"
        if last is None or (
            finished.is_file() and checkpoints.saved_at(last) <= finished.stat().st_mtime_ns
        ):
            log.info("resume=auto: no unfinished run of this config; starting fresh")
            return None, {}
        path = last
    else:
        path = Path(value)
        if not checkpoints.is_loadable(path):  # a .ckpt file, or an FSDP sharded .ckpt folder
            raise ConfigError(
                "resume",
                f"{path} is not a loadable checkpoint.",
                "use auto or a path to a .ckpt.",
            )
    state_file = path.parent / "run.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    log.info("resuming from %s", path)
    return path, state


def resolve_init(
    cfg: DictConfig,
    fingerprints: dict[str, str],
    ckpt_root: Path,
    choices: dict[str, str],
    uri: str,
) -> Path | None:
    """`stage.init_from`: null, a checkpoint folder, an MLflow run (id or runs:/), or `auto`."""
    init_from = cfg.stage.get("init_from")
    previous = cfg.stage.get("previous")
    if init_from in (None, "", "null") or (init_from == "auto" and previous is None):
        return None
    if init_from != "auto":
        path = (
            checkpoints.from_mlflow(init_from, uri)
            if checkpoints.is_run_reference(init_from)
            else Path(init_from)
        )
        if not (path / checkpoints.META).is_file():
            raise ConfigError(
                "stage.init_from", f"{path} is not a vlmlab checkpoint folder (no meta.json)."
            )
        meta = checkpoints.read_meta(path)
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


def build_logger(
    cfg: DictConfig,
    root: Path,
    choices: dict[str, str],
    run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
) -> Any:
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
    tags.update(extra_tags or {})
    parent = parent_run_id()
    if parent and run_id is None:  # a sweep job: child of the sweep's parent run
        tags["mlflow.parentRunId"] = parent
    name = cfg.logger.get("run_name") or run_name(
        str(choices.get("stage", cfg.stage.name)), choices, task_overrides(), swept_keys()
    )
    return MLFlowLogger(
        experiment_name=str(cfg.logger.experiment_name),
        run_name=name,
        tracking_uri=tracking_uri(cfg.logger.get("tracking_uri"), root),
        tags=tags,
        artifact_location=str((root / "mlartifacts").resolve().as_uri()),
        run_id=run_id,
    )


@dataclass
class _Tracked:
    """What `train` needs to end the MLflow run when `_train` raises."""

    logger: Any = None
    recorder: ExceptionRecorder = field(default_factory=ExceptionRecorder)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one stage; returns the checkpoint folder and the final metrics.

    A run that raises ends FAILED (KILLED on Ctrl-C) with its error, see tracking.outcome.
    """
    tracked = _Tracked()
    try:
        return _train(cfg, tracked)
    except BaseException:
        with track_outcome(tracked.logger, tracked.recorder):
            raise


def _train(cfg: DictConfig, tracked: _Tracked) -> dict[str, Any]:
    started = time.time()
    setup_logging()
    schema.validate(cfg)  # every unknown key at once, before any model is built
    root = Path(cfg.paths.root).resolve()
    ckpt_root = root / "checkpoints"
    choices = hydra_choices(cfg)
    uri = tracking_uri(cfg.logger.get("tracking_uri"), root) if cfg.logger.kind == "mlflow" else ""
    L.seed_everything(int(cfg.seed), workers=True)
    stages.check_before_build(cfg.stage, cfg.trainer)
    trainer_args = strategies.trainer_kwargs(cfg)  # every trainer problem before a model is built
    resume_dir = root / "resume" / run_key(cfg)
    resume_from, resume_state = resolve_resume(cfg, resume_dir)

    # embed -> encode -> project -> scatter -> decode
    quantize = as_dict(cfg.stage.quantize) if cfg.stage.get("quantize") else None
    model, tokenizer = build_vlm(cfg.encoder, cfg.connector, cfg.llm, quantization=quantize)
    fingerprints = {c: checkpoints.component_fingerprint(cfg[c]) for c in COMPONENTS}
    # Validate init_from and the policy together: one message lists every problem.
    problems: list[ConfigError] = []
    init: Path | None = None
    init_from = str(cfg.stage.get("init_from") or "")
    hf_base = init_from.removeprefix("hf:") if init_from.startswith("hf:") else None
    try:
        if resume_from is not None:
            init = Path(resume_state["init"]) if resume_state.get("init") else None
            hf_base = resume_state.get("hf_base")
        elif hf_base is None:
            init = resolve_init(cfg, fingerprints, ckpt_root, choices, uri)
        if hf_base is not None:  # an HF Llava directory: every weight, then this stage trains on it
            from vlmlab.models.hf_llava import load_hf_weights

            load_hf_weights(model, hf_base)
    except ConfigError as err:
        problems.append(err)
    if init is not None:
        checkpoints.load_chain(model, init)
    try:
        plan = stages.apply(cfg.stage, model)
    except ConfigError as err:
        problems.append(err)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise ConfigError(
            "stage", "problems found before training:\n  " + "\n  ".join(map(str, problems))
        )
    # fp32 master weights for everything that trains, one dtype per FSDP unit (training/precision.py)
    strategy = strategies.strategy_name(cfg.trainer)
    units = (
        strategies.fsdp_units(model, strategies.fsdp_settings(cfg.trainer)["wrap"])
        if strategy == "fsdp"
        else None
    )
    apply_master_weights(model, str(cfg.trainer.get("precision", "32-true")), strategy, units)
    table = format_table(plan.table)
    log.info("stage %s parameters:\n%s", cfg.stage.name, table)

    text_encoder = TextEncoder.for_model(
        model, tokenizer, str(cfg.stage.template), int(cfg.data.max_length)
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
        sources=dataset.get("sources"),
        mixture_size=cfg.data.get("mixture_size"),
        group_by_length=bool(cfg.data.get("group_by_length", False)),
        group_megabatch=int(cfg.data.get("group_megabatch", 16)),
    )
    datamodule.prepare_data()  # before the schedule is sized from the manifest
    emulate = strategies.emulated_ranks(cfg)
    if emulate > 1:  # the one-process reference of an N-rank run (training/emulate.py)
        datamodule = EmulatedRanks(datamodule, emulate)

    accumulate = accumulation(cfg)
    epochs = int(cfg.stage.epochs)
    total_steps = max(1, epochs * datamodule.batches_per_epoch(world_size(cfg)) // accumulate)
    logger = build_logger(
        cfg,
        root,
        choices,
        run_id=resume_state.get("mlflow_run_id"),
        extra_tags={
            "data.manifest_sha256": manifest_checksum(Path(dataset["shard_dir"]))
            if dataset["shard_dir"] is not None
            else datamodule.mixture().checksum()  # a mixture: its manifests and weights
        },
    )
    tracked.logger = logger
    run_id = getattr(logger, "run_id", None)
    module = VLMModule(
        model,
        as_dict(cfg.stage.optim),
        total_steps,
        groups=plan.groups,
        extra_state={"init": str(init) if init else None, "mlflow_run_id": run_id},
        parallelize=strategies.fsdp_parallelizer(cfg),
        global_token_loss=strategies.uses_global_token_loss(cfg),
        sharded=strategies.shards_parameters(cfg),  # every forward runs every sharded unit
        optimizer_cls=optimizer_class(cfg),  # DeepSpeedCPUAdam under ZeRO-Offload
    )

    callbacks: list[L.Callback] = [
        StreamPosition(),
        StepCheckpoint(str(resume_dir), int(cfg.checkpoint.every_n_steps)),
        EpochEndCheckpoint(str(resume_dir)),  # a resume never replays a finished epoch
        Throughput(FlopsModel.of(model), strategies.peak_flops(cfg.trainer)),
    ]
    record = (cfg.get("debug") or {}).get("record_samples")
    if record:
        callbacks.append(SampleRecorder(record))
    sharded = strategies.shards_parameters(cfg)
    eval_cb = build_eval_callback(cfg, dataset, text_encoder, root / "eval" / run_key(cfg))
    if sharded and eval_cb is not None:
        # generation runs on rank 0 only; with sharded weights the other ranks would not join
        log.warning(
            "eval.benchmarks are skipped under FSDP / ZeRO-3 (sharded weights): run "
            "`vlmlab eval <checkpoint> --bench ...` on the saved checkpoint instead"
        )
        eval_cb = None
    if eval_cb is not None:  # eval.benchmarks at the end of the stage; eval/accuracy aliased
        callbacks.append(eval_cb)
    if logger is not None:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
        callbacks.append(tracking_callbacks.GradNorm())
        samples = 0 if sharded else int(cfg.logger.get("samples", 0) or 0)
        if samples and dataset.get("heldout") is not None and dataset.get("image_root"):
            callbacks.append(
                tracking_callbacks.SampleGenerations(
                    text_encoder,
                    model.encoder.image_transform,
                    dataset["heldout"],
                    dataset["image_root"],
                    num_samples=samples,
                )
            )
    callbacks.append(tracking_callbacks.RankAgreement(run_key(cfg)))
    callbacks.append(launch.SlurmRequeue(resume_dir))  # inactive outside a SLURM job
    callbacks.append(tracked.recorder)
    keep_previous = bool(cfg.checkpoint.get("keep_previous", True))
    trainer_args["plugins"] = [checkpoints.atomic_checkpoint_io(keep_previous)]
    callbacks.extend(_extra_callbacks(trainer_args.pop("extra_callbacks", None) or []))
    trainer = L.Trainer(
        **trainer_args,
        max_epochs=epochs,
        accumulate_grad_batches=accumulate,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        default_root_dir=str(launch.lightning_root(resume_dir)),  # hpc_ckpt_* of this run only
    )
    if trainer.is_global_zero:
        resume_dir.mkdir(parents=True, exist_ok=True)
        (resume_dir / "run.json").write_text(
            json.dumps(
                {"init": str(init) if init else None, "hf_base": hf_base, "mlflow_run_id": run_id}
            )
        )
        if logger is not None and resume_from is None:
            _log_run_start(logger, cfg, table, plan, init)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if eval_cb is not None:
        metrics.update(eval_cb.metrics)
    # Stopped early (max_steps, Ctrl-C) = resumable, not complete: never picked by init_from=auto.
    hit_max_steps = trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps
    complete = trainer.current_epoch >= epochs and not trainer.interrupted and not hit_max_steps
    result: dict[str, Any] = {"metrics": metrics, "checkpoint": None, "complete": complete}
    result["seconds"] = time.time() - started
    # every rank takes part: FSDP-sharded weights are gathered one tensor at a time
    final_weights = checkpoints.gather_trainable(model, keep=trainer.is_global_zero)
    if trainer.is_global_zero:
        meta = {
            "complete": complete,
            "stage": str(cfg.stage.name),
            "choices": choices,
            "fingerprints": {c: fingerprints[c] for c in list(cfg.stage.get("uses") or COMPONENTS)},
            "config": {c: as_dict(cfg[c]) for c in COMPONENTS},
            "template": str(cfg.stage.template),
            "lora": plan.lora,
            "parent": str(init) if init is not None else None,
            "hf_base": hf_base,  # the root of the chain when it started from an HF Llava folder
            "mlflow_run_id": run_id,
            "global_step": trainer.global_step,
            "metrics": metrics,
        }
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"{stamp}-stage{cfg.stage.name}-{'-'.join(choices.get(c, c) for c in COMPONENTS)}-{time.time_ns() % 10**6:06d}"
        result["checkpoint"] = str(
            checkpoints.save_trainable(model, ckpt_root / name, meta, final_weights)
        )
        if complete:
            (resume_dir / "FINISHED").write_text(result["checkpoint"] + "\n")
        if logger is not None:
            logger.experiment.set_tag(run_id, "checkpoint", result["checkpoint"])
            logger.experiment.log_text(run_id, json.dumps(meta, indent=1), "checkpoint_meta.json")
    log.info("stage %s done in %.1fs: %s", cfg.stage.name, result["seconds"], metrics)
    return result


def _log_run_start(
    logger: Any, cfg: DictConfig, table: str, plan: stages.StagePlan, init: Path | None
) -> None:
    clean = without_hydra(cfg)
    logger.log_hyperparams(flatten(clean))
    client, run_id = logger.experiment, logger.run_id
    client.log_text(run_id, OmegaConf.to_yaml(clean, resolve=True), "config.yaml")
    client.log_text(run_id, "\n".join(task_overrides()) + "\n", "overrides.txt")
    client.log_text(run_id, table + "\n", "trainable_parameters.txt")
    for row in plan.table:
        client.log_param(run_id, f"params.{row['component']}.trainable", row["trainable"])
    client.log_param(run_id, "trainer.world_size", world_size(cfg))
    client.log_param(run_id, "trainer.accumulate_grad_batches", accumulation(cfg))
    for group in plan.groups:
        client.log_param(run_id, f"optim.group.{group['name']}.lr", group["lr"])
    if init is not None:
        client.set_tag(run_id, "init_from", str(init))
        parent_run = checkpoints.read_meta(init).get("mlflow_run_id")
        if parent_run:  # lineage: `stage.init_from=<this tag's value>` reproduces the start
            client.set_tag(run_id, "vlmlab.parent_stage_run", parent_run)
            client.set_tag(run_id, "parent_stage_run", parent_run)  # older name, kept for readers
            client.set_tag(
                run_id,
                "mlflow.note.content",
                f"Stage {cfg.stage.name} started from run {run_link(client, parent_run)} "
                f"(checkpoint `{init}`).",
            )


def _extra_callbacks(specs: list[Any]) -> list[L.Callback]:
    """`trainer.extra_callbacks`: Lightning callbacks given as `{_target_: ..., **kwargs}`."""
    from hydra.utils import instantiate

    built = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or "_target_" not in spec:
            raise ConfigError(
                f"trainer.extra_callbacks[{i}]",
                f"got {spec!r}.",
                "give a mapping with `_target_: package.module.CallbackClass` and its arguments.",
            )
        try:
            callback = instantiate(spec)
        except Exception as err:
            raise ConfigError(
                f"trainer.extra_callbacks[{i}]",
                f"could not build {spec['_target_']}: {err}",
                "check the import path and the arguments.",
            ) from err
        if not isinstance(callback, L.Callback):
            raise ConfigError(
                f"trainer.extra_callbacks[{i}]",
                f"{spec['_target_']} is not a lightning.Callback.",
            )
        built.append(callback)
    return built
