"""Train a Faster R-CNN with a pluggable box-regression loss.

    uv run train.py                                  # the default job on the built-in data
    uv run train.py loss=huber loss.delta=0.5        # pick a loss
    uv run train.py -m loss=smooth_l1,huber,l1,l2    # a sweep, one directory per job
    uv run train.py experiment=smoke                 # the whole pipeline in under a minute
"""

from __future__ import annotations

import logging
import os
import random
import sys

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf

from detlib.config import Config, check_ranges, register
from detlib.data.build import build_datasets
from detlib.engine import distributed as dist
from detlib.engine.trainer import train
from detlib.modeling.proposals import check_proposal_ids

register()
log = logging.getLogger("train")


def hparams(cfg: DictConfig) -> dict:
    """The flat parameters TensorBoard's HParams table compares runs by."""
    loss = OmegaConf.to_container(cfg.loss, resolve=True)
    out = {"loss": HydraConfig.get().runtime.choices.get("loss", loss["_target_"].rsplit(".", 1)[-1])}
    out |= {f"loss.{k}": v for k, v in loss.items() if k != "_target_"}
    out |= {"lr": cfg.trainer.lr, "batch_size": cfg.data.batch_size, "seed": cfg.seed, "data": cfg.data.name,
            "max_iters": cfg.trainer.max_iters, "model": HydraConfig.get().runtime.choices.get("model", "?")}
    out |= {f"data.noise.{k}": v for k, v in (cfg.data.get("noise") or {}).items()}
    return out


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    typed: Config = OmegaConf.to_object(cfg)  # library code gets dataclasses, not a DictConfig
    check_ranges(typed)
    typed.data.root = to_absolute_path(os.path.expanduser(typed.data.root))  # relative to where the user launched
    run_dir = HydraConfig.get().runtime.output_dir
    if not dist.is_main():  # under torchrun only rank 0 writes train.log
        for h in [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]:
            logging.getLogger().removeHandler(h)
    random.seed(typed.seed)
    np.random.seed(typed.seed)
    torch.manual_seed(typed.seed)
    if typed.trainer.num_threads:
        torch.set_num_threads(typed.trainer.num_threads)

    box_loss, rpn_box_loss = instantiate(cfg.loss), instantiate(cfg.rpn_loss)  # fail fast on bad parameters
    if not dist.is_main():
        dist.barrier()  # rank 0 builds the data once, then the others read it
    train_set, val_set = build_datasets(typed.data)
    if dist.is_main():
        dist.barrier()
    model = instantiate(cfg.model, num_classes=train_set.num_classes, box_loss=box_loss, rpn_box_loss=rpn_box_loss)
    check_proposal_ids(model, train=train_set.ids, val=val_set.ids)  # Fast R-CNN with a proposals file
    if dist.world_size() > 1:  # same initial weights everywhere; then each rank its own random stream
        random.seed(typed.seed + dist.rank())
        np.random.seed(typed.seed + dist.rank())
        torch.manual_seed(typed.seed + dist.rank())
    log.info("run directory: %s (%d process%s)", run_dir, dist.world_size(), "es" if dist.world_size() > 1 else "")
    log.info("data: %d train / %d val images, classes %s", len(train_set), len(val_set), train_set.class_names)
    log.info("box loss: %r   rpn box loss: %r", box_loss, rpn_box_loss)
    meta = {
        "seed": typed.seed,
        "world_size": dist.world_size(),
        "num_classes": train_set.num_classes,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "loss": OmegaConf.to_container(cfg.loss, resolve=True),
        "data": {"name": typed.data.name, "train": str(train_set.ann_file), "num_train": len(train_set)},
        "optim": {k: getattr(typed.trainer, k) for k in ("lr", "max_iters", "schedule", "warmup_iters", "amp")}
        | {"batch_size": typed.data.batch_size},
    }
    stats = train(model, train_set, val_set, typed.trainer, typed.eval, run_dir, typed.data.batch_size,
                  typed.data.num_workers, typed.seed, meta, hparams(cfg),
                  voc07=typed.data.name == "voc")
    if stats is None:  # SIGTERM/SIGINT: checkpoint saved; stop here, and stop a sweep's remaining jobs too
        sys.exit(0)
    return stats.get("AP")


if __name__ == "__main__":
    dist.init_from_env()  # torchrun: join the process group before Hydra names the (shared) run directory
    try:
        main()
    finally:
        dist.shutdown()
