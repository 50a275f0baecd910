"""The CSV schema, in one place. Accuracies are percentages; times are seconds."""
from __future__ import annotations

# One row per run (runs.csv).
RUN_COLUMNS = (
    "run_id",  # hash of the resolved configuration (stable across resumes)
    "spec",  # normalizer spec string, the row label everywhere
    "norm",  # registry name of the normalizer
    "dataset",
    "model",
    "norm_batch",  # samples behind each normalization statistic (micro-batch)
    "sgd_batch",  # samples per optimizer step
    "seed",
    "epochs",
    "lr",  # peak learning rate after linear scaling
    "status",  # ok | failed | diverged | oom
    "reason",  # why a run is not ok; empty otherwise
    "final_val_acc",  # validation-split accuracy after the last epoch, % (empty: no
    # validation split, --val-fraction 0); what tuning selects on
    "final_test_acc",  # test-split accuracy after the last epoch, %: the final comparison
    "final_val_acc_population",  # final_val_acc with population statistics in eval
    # (--diagnose; empty: not diagnosed, or not applicable: no batch-dependent layer)
    "best_val_acc",  # best validation accuracy at the end of an epoch, %
    "val_samples",  # validation samples behind each val accuracy (the intervals' N)
    "test_samples",  # test samples behind final_test_acc (the intervals' N)
    "final_train_loss",
    "train_time_s",  # seconds in training steps (evaluation excluded)
    "samples_per_s",  # training samples per second
    "peak_mem_mb",  # peak CUDA memory of the training steps, MiB, dataset excluded (empty off CUDA)
    "device",
    "amp",
    "compile",
    "deterministic",
    "threads",  # torch intra-op threads the run trained with (empty: it never reported)
    "diagnose",  # statistics diagnostics after every epoch (stats.csv)
    "torch_version",
    "versions",  # JSON: python, numpy, bknbench, kernels (native | torch)
    "git_commit",
    "config",  # JSON: the fully resolved RunConfig
    "plugins",  # JSON list of "source@sha256:HEX": the plugins the run used (empty: none)
)

# One row per run and evaluation (metrics.csv): --evals-per-epoch K evenly spaced in each
# epoch, the last at its end.
METRIC_COLUMNS = (
    "run_id",
    "epoch",  # 1-based, the epoch the evaluation falls in
    "step",  # optimizer steps so far
    "samples_seen",  # training samples processed so far
    "train_loss",  # mean over the epoch's training steps so far
    "train_acc",  # %, in training mode, over the same steps
    "val_loss",
    "val_acc",  # %, in eval mode on the validation split (empty without one)
    "lr",  # learning rate at the evaluation
    "wall_s",  # seconds since the run started
)

# One row per run, epoch, batch-dependent layer and metric (stats.csv, --diagnose); the
# metric names are listed in docs/diagnostics.md.
STATS_COLUMNS = (
    "run_id",
    "epoch",  # 1-based; measured after the epoch's training, with its weights
    "layer",  # 0-based index among the model's batch-dependent normalization layers
    "layer_name",  # module path in the model, e.g. "4" or "layer1.0.bn2"
    "metric",
    "value",
)

STATUSES = ("ok", "failed", "diverged", "oom")

# One row per tuning trial (tuning.csv, `run --tune`): the columns below, with a column per
# tuned key (in the units of its flag: lr is the peak rate per 128 samples, as --lr)
# between norm_batch and seed.
TUNING_FILE = "tuning.csv"
TUNING_REQUIRED = (
    "spec",
    "norm_batch",
    "seed",  # a tuning seed (--tune-seeds)
    "final_val_acc",  # validation accuracy after the last epoch, % (empty: not ok)
    "status",  # ok | failed | diverged | oom: a trial not ok counts as 0%, the worst
    "run_id",
    "chosen",  # 1 on the rows of the cell's chosen point (best mean final_val_acc)
    "at_edge",  # 1 when a chosen value is the smallest or largest of its grid
)
