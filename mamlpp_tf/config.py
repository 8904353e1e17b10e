"""`LearnerConfig`: the hyper-parameters of one MAML/MAML++ learner, validated once."""

from __future__ import annotations

import dataclasses

from mamlpp_tf.layers import BN_POLICIES

TASK_IMPLS = ("loop", "batched", "auto")
# None: everything in the variable dtype.
COMPUTE_DTYPES = (None, "bfloat16")


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
    """Everything that defines a learner's network, inner loop and outer loop.

    Defaults are the official MAML++ Omniglot 5-way 1-shot values (the official code's
    experiment configs, AntreasAntoniou/HowToTrainYourMAMLPytorch).

    Attributes:
      n_way: Classes per task (size of the head).
      image_shape: `(H, W, C)` of the images.
      num_filters: Channels of every convolution.
      num_stages: Conv stages of the backbone.
      max_pooling: Max-pool after each stage; False = strided convolutions.
      inner_steps: Inner steps `S` in meta-training (rows of per-step BN).
      eval_inner_steps: Inner steps at evaluation; at most `inner_steps`
        because per-step batch norm has only `inner_steps` rows.
      inner_lr: Initial (MAML++) or fixed (MAML) inner learning rate.
      learn_inner_lr: LSLR: learn one rate per tensor and step.
      per_step_bn: BNWB+BNRS: per-step batch-norm weights and statistics.
      bn_stats: Batch-norm statistics (see `PerStepBatchNorm`): `"batch"`
        (official behaviour, transductive), `"running"` (per-step running
        statistics at evaluation), `"support"` (MetaBN: the support set's) or
        `"tasknorm"` (TaskNorm-I: the support set's blended with each
        image's). The last two are trained as they are served: a query's
        prediction never depends on the other queries.
      msl_epochs: Epochs of multi-step loss annealing; 0 turns MSL off.
      second_order: Use second-order meta-gradients (after `first_order_epochs`).
      first_order_epochs: Derivative-order annealing: epochs `0..k` are first
        order; -1 turns DA off.
      meta_lr: Initial meta learning rate (Adam).
      min_meta_lr: Cosine-annealing floor; equal to `meta_lr` turns CA off.
      epochs: Total epochs (the cosine period `T_max`).
      iterations_per_epoch: Meta-iterations per epoch.
      grad_clip: Element-wise clip of network gradients (not LSLR), 0 = off.
      adam_epsilon: Adam's epsilon (Keras convention, see README).
      task_impl: `"loop"` (tasks one after another, the reference),
        `"batched"` (all tasks through the network together, each with its
        own weights and batch statistics) or `"auto"` (batched for tasks of
        at most 40 query images, where it is faster; see
        benchmarks/README.md).
      jit_compile: Compile the steps with XLA.
      dtype: Variable and compute dtype (`"float32"`; `"float64"` for tests).
      compute_dtype: `"bfloat16"` runs the convolutions and the head's matmul
        in bfloat16 (Keras' `"mixed_bfloat16"` policy on the backbone) while
        variables, batch norm, the inner-loop updates and the losses stay in
        `dtype` (float32); None computes everything in `dtype`.
    """
    n_way: int = 5
    image_shape: tuple[int, int, int] = (28, 28, 1)
    num_filters: int = 64
    num_stages: int = 4
    max_pooling: bool = True
    inner_steps: int = 5
    eval_inner_steps: int = 5
    inner_lr: float = 0.1
    learn_inner_lr: bool = True
    per_step_bn: bool = True
    bn_stats: str = "batch"
    msl_epochs: int = 10
    second_order: bool = True
    first_order_epochs: int = -1
    meta_lr: float = 1e-3
    min_meta_lr: float = 1e-5
    epochs: int = 100
    iterations_per_epoch: int = 500
    grad_clip: float = 0.0
    adam_epsilon: float = 1e-8
    task_impl: str = "auto"
    jit_compile: bool = False
    dtype: str = "float32"
    compute_dtype: str | None = None

    @property
    def dtype_policy(self) -> str:
        """The backbone's Keras dtype policy name."""
        return "mixed_bfloat16" if self.compute_dtype == "bfloat16" else self.dtype

    def __post_init__(self):
        object.__setattr__(self, "image_shape", tuple(int(d) for d in self.image_shape))
        checks = [
            (self.n_way >= 2, "n_way", "must be >= 2"),
            (len(self.image_shape) == 3 and min(self.image_shape) >= 1, "image_shape",
             "must be (H, W, C) with positive sizes"),
            (self.num_filters >= 1, "num_filters", "must be >= 1"),
            (self.num_stages >= 1, "num_stages", "must be >= 1"),
            (self.inner_steps >= 1, "inner_steps", "must be >= 1"),
            (1 <= self.eval_inner_steps <= self.inner_steps, "eval_inner_steps",
             f"must be in [1, inner_steps={self.inner_steps}]: per-step batch norm "
             "and LSLR have one row per training step"),
            (self.bn_stats in BN_POLICIES, "bn_stats", f"must be one of {BN_POLICIES}"),
            (self.bn_stats != "running" or self.per_step_bn, "bn_stats",
             "'running' needs per_step_bn (shared BN keeps no running statistics)"),
            (self.msl_epochs >= 0, "msl_epochs", "must be >= 0 (0 = off)"),
            (self.first_order_epochs >= -1, "first_order_epochs", "must be >= -1"),
            (self.meta_lr > 0, "meta_lr", "must be > 0"),
            (0 <= self.min_meta_lr <= self.meta_lr, "min_meta_lr",
             "must be in [0, meta_lr]"),
            (self.epochs >= 1, "epochs", "must be >= 1"),
            (self.iterations_per_epoch >= 1, "iterations_per_epoch", "must be >= 1"),
            (self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 = off)"),
            (self.adam_epsilon > 0, "adam_epsilon", "must be > 0"),
            (self.task_impl in TASK_IMPLS, "task_impl", f"must be one of {TASK_IMPLS}"),
            (self.dtype in ("float32", "float64"), "dtype",
             "must be 'float32' or 'float64'"),
            (self.compute_dtype in COMPUTE_DTYPES, "compute_dtype",
             f"must be one of {COMPUTE_DTYPES}"),
            (self.compute_dtype is None or self.dtype == "float32", "compute_dtype",
             "needs dtype='float32' (bfloat16 products with float32 variables)"),
        ]
        for ok, field, message in checks:
            if not ok:
                raise ValueError(f"{field}={getattr(self, field)!r} {message}.")


DATASETS = ("omniglot", "mini_imagenet", "synthetic")
OMNIGLOT_SPLITS = ("paper", "background_evaluation")
STRATEGIES = ("default", "mirrored", "multi_worker")
NAN_POLICIES = ("stop", "skip")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines one training run: data, episodes, learner and protocol.

    Built from flags by `mamlpp_tf.flags`, written to `<model_dir>/config.json`
    and read back by `evaluate`, `report` and the exporters, so nothing below
    the command line reads flags.

    Attributes:
      learner: The learner's hyper-parameters.
      dataset: One of `DATASETS`.
      data_dir: Dataset location (TFDS dir for Omniglot, folder for
        mini-ImageNet); None = TFDS's default.
      download: Let TFDS download Omniglot.
      omniglot_split: `"paper"` (official 1150/50/423) or
        `"background_evaluation"`.
      k_shot: Support images per class.
      n_query: Query images per class.
      meta_batch_size: Tasks per meta-iteration (global, across replicas).
      val_tasks: Fixed validation tasks per evaluation.
      test_tasks: Fixed test tasks.
      ensemble_top_k: Validation-best epochs kept and ensembled at test time.
      seed: Train seed: weight initialisation and the training task stream.
      val_seed: Seed of the fixed validation and test tasks (0 officially).
      model_dir: Run directory.
      strategy: One of `STRATEGIES`.
      cpu_replicas: Split the CPU into this many logical devices (testing the
        distributed path without GPUs); 0 = off.
      checkpoint_every: Iterations between mid-epoch checkpoints.
      nan_policy: On a non-finite meta-loss or gradient (never applied):
        `"stop"` the run, or `"skip"` the update and go on.
    """
    learner: LearnerConfig
    dataset: str = "omniglot"
    data_dir: str | None = None
    download: bool = True
    omniglot_split: str = "paper"
    k_shot: int = 1
    n_query: int = 1
    meta_batch_size: int = 8
    val_tasks: int = 600
    test_tasks: int = 600
    ensemble_top_k: int = 5
    seed: int = 0
    val_seed: int = 0
    model_dir: str = "runs/omniglot"
    strategy: str = "default"
    cpu_replicas: int = 0
    checkpoint_every: int = 100
    nan_policy: str = "stop"

    def __post_init__(self):
        checks = [
            (self.dataset in DATASETS, "dataset", f"must be one of {DATASETS}"),
            (self.omniglot_split in OMNIGLOT_SPLITS, "omniglot_split",
             f"must be one of {OMNIGLOT_SPLITS}"),
            (self.k_shot >= 1, "k_shot", "must be >= 1"),
            (self.n_query >= 1, "n_query", "must be >= 1"),
            (self.dataset != "omniglot" or self.k_shot + self.n_query <= 20, "k_shot",
             f"+ n_query = {self.k_shot + self.n_query} exceeds Omniglot's 20 images per "
             "class"),
            (self.meta_batch_size >= 1, "meta_batch_size", "must be >= 1"),
            (self.val_tasks >= 1, "val_tasks", "must be >= 1"),
            (self.test_tasks >= 1, "test_tasks", "must be >= 1"),
            (self.ensemble_top_k >= 1, "ensemble_top_k", "must be >= 1"),
            (self.seed >= 0, "seed", "must be >= 0"),
            (self.val_seed >= 0, "val_seed", "must be >= 0"),
            (bool(self.model_dir), "model_dir", "must be set"),
            (self.strategy in STRATEGIES, "strategy", f"must be one of {STRATEGIES}"),
            (self.cpu_replicas >= 0, "cpu_replicas", "must be >= 0"),
            (self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1"),
            (self.nan_policy in NAN_POLICIES, "nan_policy", f"must be one of {NAN_POLICIES}"),
        ]
        for ok, field, message in checks:
            if not ok:
                raise ValueError(f"{field}={getattr(self, field)!r} {message}.")

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (the learner's fields nested under `learner`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        """Inverse of `to_dict`; unknown keys raise `TypeError` naming them."""
        values = dict(values)
        learner = LearnerConfig(**values.pop("learner"))
        return cls(learner=learner, **values)
