"""Training: `TrainConfig` and `train(cfg) -> summary`.

One function runs the paper's recipe on one CPU, one GPU, or many processes under `torchrun` (DDP; FSDP2 with
`fsdp=True`). Rank 0 owns the run directory:

    config.json    the resolved TrainConfig
    metrics.csv    one row per epoch: losses, top-1/top-5, learning rate, throughput
    summary.json   final and best top-1/top-5, epochs, wall time
    last.pt        the full training state (atomic; written every epoch, every `save_every_steps` and on stop)
    last.prev.pt   the last.pt before the latest write, kept until the new one is complete and verified; a
                   resume falls back to it (with a warning) when last.pt is damaged
    best.pt        the weights of the best epoch (same format, without optimiser state); a resume rewrites it
                   from last.pt when a kill came between the two
    run.lock       the owner's PID and host while a run uses the directory (a second run is refused)
    curves.png     loss, accuracy and learning rate per epoch

Checkpoints are in the "cvt.train" format of `cvt.checkpoint.training`, readable with
`torch.load(weights_only=True)` and by `cvt.load_model`. Resuming restores the model, optimiser, schedule, loss
scaler, EMA, the Python/NumPy/torch RNG states of every rank and the position in the data order: the sampler skips
the batches already seen, so a run interrupted in the middle of an epoch ends bit-identical to an uninterrupted
one (CPU, `deterministic=True`).

Pre-emption: SIGTERM or SIGUSR1 stops the run at the next optimiser step, on every rank at the same step, with
the full state in last.pt; `cvt train` then exits with code 75 (`PREEMPTED_EXIT_CODE`) and `--resume` continues
bit-identically. `resume="auto"` (`--resume` without a path) resumes from last.pt when there is one and starts
afresh otherwise, so the same command serves the first start and every restart (`torchrun --max-restarts`).

    config       TrainConfig, key=value overrides, config files
    rng          seeding, RNG states, deterministic algorithms
    distributed  the processes: environment, samplers, DDP/FSDP2, collective state
    finetune     the fine-tuning defaults of `cvt train --model` (sized to the dataset and to the start)
    optimizer    weight-decay groups, layer decay, AdamW/SGD, the warm-up cosine schedule
    build        data, loaders, model (named by its architecture), optimiser, schedule, Mixup and loss of a run
    state        where a run stands, saved to and restored from its checkpoint
    run_dir      config.json, metrics.csv, summary.json, curves.png, TensorBoard
    preempt      SIGTERM/SIGUSR1: stop at the next step on every rank, state saved
    loop         train(cfg): its plan and time estimate, the epoch loop
"""

from .config import (
    AMP_MODES,
    TrainConfig,
    apply_overrides,
    find_config,
    load_config,
    load_config_module,
    parse_overrides,
    shipped_configs,
)
from .distributed import ResumableSampler
from .finetune import FineTuneStart, finetune_config, plan_finetune
from .loop import train
from .preempt import PREEMPTED_EXIT_CODE
from .rng import rng_state, set_rng_state
from .run_dir import plot_curves
from .state import read_resume_checkpoint, resolve_resume

__all__ = [
    "AMP_MODES",
    "PREEMPTED_EXIT_CODE",
    "ResumableSampler",
    "TrainConfig",
    "apply_overrides",
    "find_config",
    "finetune_config",
    "plan_finetune",
    "FineTuneStart",
    "load_config",
    "load_config_module",
    "parse_overrides",
    "plot_curves",
    "read_resume_checkpoint",
    "resolve_resume",
    "rng_state",
    "set_rng_state",
    "shipped_configs",
    "train",
]
