"""`LearnerConfig` and `RunConfig`: every hyper-parameter of a run, declared and checked once.

Each field is declared by `option`: its default, its `help` and its bounds or
choices. The training job's flags are generated from these fields
(`mamlpp_tf.flags`: same name, type, default and help), and `__post_init__`
checks the bounds, the choices and the combinations of fields, collecting every
problem into one `ConfigError`. Dataset facts (image shape, images per class,
validation classes) come from `mamlpp_tf.data.registry`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
from typing import Any

from mamlpp_tf.data import omniglot
from mamlpp_tf.data.registry import DATASETS, dataset_info
from mamlpp_tf.nets import BN_STATS_MODES, TASKNORM_ALPHAS, backbone_names

TASK_IMPLS = ("loop", "batched", "auto")
# None: everything in the variable dtype.
COMPUTE_DTYPES = (None, "bfloat16")
DTYPES = ("float32", "float64")
OMNIGLOT_SPLITS = omniglot.SPLITS
STRATEGIES = ("default", "mirrored", "multi_worker")
NAN_POLICIES = ("stop", "skip")
# The inner update rules of `mamlpp_tf.update_rules` and the weights that adapt (inner_loop.py).
INNER_UPDATES = ("lslr", "meta_sgd", "fixed")
ADAPTED_WEIGHTS = ("all", "head", "body")


def option(default: Any, help_text: str, *, lower: float | None = None,
           above: float | None = None, choices: Sequence[Any] | None = None,
           flag: bool = True) -> Any:
    """Declares a config field with what its checks and its flag need.

    Args:
      default: The field's default.
      help_text: What the field means (also its flag's help); metadata `help`.
      lower: Smallest allowed value (inclusive).
      above: Values must exceed this (exclusive).
      choices: The allowed values.
      flag: Whether the training job has a flag for it (False for fields set
        from other flags or only from Python).

    Returns:
      A `dataclasses.field` carrying the above as metadata.
    """
    return dataclasses.field(default=default, metadata=dict(
        help=help_text, lower=lower, above=above, choices=choices, flag=flag))


@dataclasses.dataclass(frozen=True)
class Problem:
    """One failed check: the fields involved, the one to change first, and why.

    Attributes:
      values: The fields involved and their values; the first is at fault.
      reason: Why, worded to follow the first field's name.
    """
    values: dict[str, Any]
    reason: str

    def __str__(self) -> str:
        name, value = next(iter(self.values.items()))
        return f"{name}={value!r} {self.reason}."


class ConfigError(ValueError):
    """A config with bad fields; `str` gives one line per problem.

    Attributes:
      problems: Every `Problem` found.
    """

    def __init__(self, problems: Sequence[Problem]):
        super().__init__("\n".join(str(problem) for problem in problems))
        self.problems = tuple(problems)


def _field_problems(config: Any) -> list[Problem]:
    """The fields of `config` outside their declared bounds or choices."""
    problems = []
    for field in dataclasses.fields(config):
        meta, value = field.metadata, getattr(config, field.name)
        # A tuple field's bounds hold for each of its (one or more) entries.
        entries = value if isinstance(value, tuple) else (value,)
        if isinstance(value, tuple) and not value:
            reason = "must have at least one entry"
        elif meta.get("choices") is not None and value not in meta["choices"]:
            reason = f"must be one of {tuple(meta['choices'])}"
        elif meta.get("lower") is not None and min(entries) < meta["lower"]:
            reason = f"must be >= {meta['lower']}"
        elif meta.get("above") is not None and min(entries) <= meta["above"]:
            reason = f"must be > {meta['above']}"
        else:
            continue
        problems.append(Problem({field.name: value}, reason))
    return problems


# A check across fields: (passed, the fields involved and their values, reason).
Combination = tuple[bool, dict[str, Any], str]


def _check(config: Any, combinations: Callable[[], list[Combination]]) -> None:
    """Raises `ConfigError` listing the problems of `config`.

    Args:
      config: A config dataclass whose fields were declared by `option`.
      combinations: Returns the checks across fields; called once every field
        is valid on its own, so that it may rely on that (e.g. look up the
        dataset).
    """
    problems = _field_problems(config)
    if not problems:
        problems = [Problem(values, reason) for ok, values, reason in combinations() if not ok]
    if problems:
        raise ConfigError(problems)


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
    """Everything that defines a learner's network, inner loop and outer loop.

    Defaults are the official MAML++ Omniglot 5-way 1-shot values (the official
    code's experiment configs, AntreasAntoniou/HowToTrainYourMAMLPytorch). Each
    field's `help` says what it means.

    Raises:
      ConfigError: A field is out of range, or fields do not fit together.
    """
    n_way: int = option(5, "Classes per task (N).", lower=2)
    image_shape: tuple[int, int, int] = option(
        (28, 28, 1), "(H, W, C) of the images; the training job takes it from --dataset.",
        flag=False)
    backbone: str = option(
        "vgg", "The network (mamlpp_tf.nets registry): vgg (the paper's conv net; "
        "--num_filters, --num_stages, --max_pooling), resnet12 (four residual blocks; "
        "--resnet12_widths), mlp (the original MAML's Omniglot MLP; --mlp_hidden).")
    num_filters: int = option(64, "vgg: channels of every convolution.", lower=1)
    num_stages: int = option(4, "vgg: conv stages.", lower=1)
    max_pooling: bool = option(
        True, "vgg: max-pool after each stage; --nomax_pooling uses stride-2 convolutions "
        "and global average pooling.")
    resnet12_widths: tuple[int, ...] = option(
        (64, 128, 256, 512), "resnet12: channels of the four residual blocks "
        "(ALFA/MeTAL: 64,128,256,512).", lower=1)
    mlp_hidden: tuple[int, ...] = option(
        (256, 128, 64, 64), "mlp: widths of the hidden dense-BN-ReLU layers (the original "
        "MAML's Omniglot MLP: 256,128,64,64).", lower=1)
    inner_steps: int = option(5, "Inner-loop steps in meta-training (S).", lower=1)
    eval_inner_steps: int = option(
        5, "Inner-loop steps at evaluation (and in adapt, the task model and the meta-model); "
        "steps beyond --inner_steps reuse the last trained step's per-step batch-norm row and "
        "inner learning rates.", lower=1)
    inner_lr: float = option(
        0.1, "Initial (lslr, meta_sgd) or constant (fixed) inner learning rate.")
    learn_inner_lr: bool = option(
        True, "Learn the inner learning rates; --nolearn_inner_lr is plain MAML's fixed rate, "
        "the same as --inner_update=fixed.")
    inner_update: str = option(
        "lslr", "The inner update rule: lslr (MAML++: one learned rate per adapted tensor and "
        "step), meta_sgd (Meta-SGD: one learned rate per weight element; "
        "--meta_sgd_per_step), fixed (plain MAML: the constant --inner_lr).",
        choices=INNER_UPDATES)
    meta_sgd_per_step: bool = option(
        True, "meta_sgd: one rate tensor per inner step (the per-element form of LSLR); "
        "--nometa_sgd_per_step shares one across steps, as Li et al. 2017.")
    adapt: str = option(
        "all", "Which fast weights the inner loop adapts: all (MAML, MAML++), head (ANIL: the "
        "classifier head only; the body's features are computed once per task and batch-norm "
        "row and reused across steps), body (BOIL: everything but the head, whose inner rate "
        "is zero).", choices=ADAPTED_WEIGHTS)
    per_step_bn: bool = option(
        True, "BNWB+BNRS: per-step batch-norm weights, biases and statistics; "
        "--noper_step_bn shares one set (plain MAML).")
    bn_stats: str = option(
        "batch", "batch: batch statistics for support and query, always (what the official "
        "code does; transductive: a query's answer depends on the other queries); support: "
        "every pass normalised with the support set's statistics (MetaBN); tasknorm: the "
        "support set's blended with each image's own (TaskNorm-I); rn: each query normalised "
        "with the support set plus itself (Reptile's RN). support, tasknorm and rn train the "
        "model the way it is served, one image at a time. running (per-step running "
        "statistics at evaluation) is refused: it evaluates at chance.",
        choices=BN_STATS_MODES)
    tasknorm_alpha: str = option(
        "step", "tasknorm: what the blend α = sigmoid(a·n + b) is learned for: step (one α per "
        "layer and inner step), layer (one per layer, as the reference code), channel (one "
        "per channel and step).", choices=TASKNORM_ALPHAS)
    tasknorm_unbiased: bool = option(
        False, "tasknorm: blend unbiased variances (the reference code's) instead of the "
        "biased ones.")
    msl_epochs: int = option(10, "Epochs of multi-step-loss annealing; 0 = off.", lower=0)
    second_order: bool = option(True, "Second-order meta-gradients.")
    first_order_epochs: int = option(
        -1, "Derivative-order annealing: epochs 0..k are first order, second order after; "
        "-1 = off.", lower=-1)
    meta_lr: float = option(1e-3, "Initial meta learning rate (Adam).", above=0)
    min_meta_lr: float = option(
        1e-5, "Cosine-annealing floor of the meta learning rate; = --meta_lr turns "
        "annealing off.", lower=0)
    epochs: int = option(100, "Training epochs (also the cosine period).", lower=1)
    iterations_per_epoch: int = option(500, "Meta-iterations per epoch.", lower=1)
    grad_clip: float = option(
        0.0, "Element-wise clip of the network's gradients (fast weights, batch norm, "
        "TaskNorm's blend; never the inner learning rates); 0 = off (official: 10 for "
        "mini-ImageNet).", lower=0)
    adam_epsilon: float = option(
        1e-8, "Adam's epsilon (Keras convention, see README).", above=0, flag=False)
    task_impl: str = option(
        "auto", "Task layout of the meta-step: loop (one task after another), batched (all "
        "tasks through the network together), auto (by shape).", choices=TASK_IMPLS)
    jit_compile: bool = option(False, "Compile the meta-steps with XLA.")
    dtype: str = option(
        "float32", "Variable and compute dtype (float64 for tests).", choices=DTYPES,
        flag=False)
    compute_dtype: str | None = option(
        None, "bfloat16: convolutions and the head's matmul in bfloat16, with float32 "
        "variables, batch norm, inner-loop updates and losses (benchmarks/README.md has its "
        "speed and accuracy). Unset: float32 throughout.", choices=COMPUTE_DTYPES)

    @property
    def update_rule(self) -> str:
        """The inner update rule: `inner_update`, or `"fixed"` under `--nolearn_inner_lr`."""
        return self.inner_update if self.learn_inner_lr else "fixed"

    @property
    def dtype_policy(self) -> str:
        """The backbone's Keras dtype policy name."""
        return "mixed_bfloat16" if self.compute_dtype == "bfloat16" else self.dtype

    def __post_init__(self):
        # JSON (config.json) and flags give lists; the config holds tuples.
        for name in ("image_shape", "resnet12_widths", "mlp_hidden"):
            object.__setattr__(self, name, tuple(int(d) for d in getattr(self, name)))
        _check(self, self._combinations)

    def _combinations(self) -> list[Combination]:
        """The checks across fields."""
        return [
            (self.backbone in backbone_names(), dict(backbone=self.backbone),
             f"must be a registered backbone: one of {backbone_names()}"),
            (self.backbone != "resnet12" or len(self.resnet12_widths) == 4,
             dict(resnet12_widths=self.resnet12_widths, backbone=self.backbone),
             "must give the widths of the 4 residual blocks"),
            (len(self.image_shape) == 3 and min(self.image_shape) >= 1,
             dict(image_shape=self.image_shape), "must be (H, W, C) with positive sizes"),
            (self.learn_inner_lr or self.inner_update != "meta_sgd",
             dict(learn_inner_lr=self.learn_inner_lr, inner_update=self.inner_update),
             "is plain MAML's fixed rate (inner_update='fixed') and contradicts "
             "inner_update='meta_sgd', whose rates are learned"),
            (self.bn_stats != "running", dict(bn_stats=self.bn_stats),
             "evaluates at chance: with the statistics fixed, the learned inner rates make "
             "the evaluation inner loop diverge; train with bn_stats='support' or 'rn' to "
             "serve one image at a time"),
            (self.bn_stats == "tasknorm" or self.tasknorm_alpha == "step",
             dict(tasknorm_alpha=self.tasknorm_alpha, bn_stats=self.bn_stats),
             "is a TaskNorm option: it needs bn_stats='tasknorm'"),
            (self.bn_stats == "tasknorm" or not self.tasknorm_unbiased,
             dict(tasknorm_unbiased=self.tasknorm_unbiased, bn_stats=self.bn_stats),
             "is a TaskNorm option: it needs bn_stats='tasknorm'"),
            (self.min_meta_lr <= self.meta_lr,
             dict(min_meta_lr=self.min_meta_lr, meta_lr=self.meta_lr),
             "must be in [0, meta_lr]: the annealing floor may not exceed the initial rate"),
            (self.compute_dtype is None or self.dtype == "float32",
             dict(compute_dtype=self.compute_dtype, dtype=self.dtype),
             "needs dtype='float32' (bfloat16 products with float32 variables)"),
        ]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines one training run: data, episodes, learner and protocol.

    Built from flags by `mamlpp_tf.flags`, written to `<model_dir>/config.json`
    and read back by `evaluate`, `report` and the exporters, so nothing below
    the command line reads flags. Each field's `help` says what it means;
    `learner` holds the learner's hyper-parameters.

    Raises:
      ConfigError: A field is out of range, or fields (the learner's included)
        do not fit together or the dataset.
    """
    learner: LearnerConfig
    dataset: str = option("omniglot", "Dataset to meta-learn on.", choices=DATASETS)
    data_dir: str | None = option(
        None, "Omniglot: a TFDS data dir (prepared, or where TFDS downloads to; default: "
        "TFDS's own). mini-ImageNet: the folder holding train/val/test/<wnid>/*.jpg. Unused "
        "for synthetic.")
    download: bool = option(
        True, "Let TFDS download and prepare Omniglot if it is not in --data_dir.")
    omniglot_split: str = option(
        "paper", "paper: the official MAML++ 1150/50/423 character split; "
        "background_evaluation: background alphabets for training (with a seeded "
        "validation carve-out), evaluation alphabets for testing.", choices=OMNIGLOT_SPLITS)
    k_shot: int = option(1, "Support images per class (K).", lower=1)
    n_query: int = option(1, "Query (target) images per class (Q); official: 1 for "
                          "Omniglot, 15 for mini-ImageNet.", lower=1)
    meta_batch_size: int = option(8, "Tasks per meta-iteration, across all replicas.",
                                  lower=1)
    val_tasks: int = option(600, "Fixed validation tasks, evaluated every epoch.", lower=1)
    test_tasks: int = option(600, "Fixed test tasks.", lower=1)
    ensemble_top_k: int = option(
        5, "Validation-best epochs kept and ensembled (averaged logits) at test time.",
        lower=1)
    seed: int = option(0, "Train seed: initial weights and the training task stream.",
                       lower=0)
    val_seed: int = option(0, "Seed of the fixed validation and test tasks.", lower=0)
    model_dir: str = option(
        "runs/omniglot", "Run directory: checkpoints, TensorBoard logs, config.json and "
        "results.json. Re-running the same command resumes.")
    strategy: str = option(
        "default", "default: one device; mirrored: the meta-batch's tasks split across "
        "local GPUs; multi_worker: across machines (TF_CONFIG).", choices=STRATEGIES)
    cpu_replicas: int = option(
        0, "Split the CPU into this many logical devices so the distributed path runs "
        "without GPUs (for tests); 0 = off.", lower=0)
    checkpoint_every: int = option(100, "Iterations between mid-epoch checkpoints.",
                                   lower=1)
    nan_policy: str = option(
        "stop", "A NaN/Inf meta-loss or meta-gradient is never applied. stop: end the run "
        "naming the iteration and the last good checkpoint; skip: drop that update and go "
        "on (counted in TensorBoard and results.json).", choices=NAN_POLICIES)

    def __post_init__(self):
        _check(self, self._combinations)

    def _combinations(self) -> list[Combination]:
        """The checks across fields and against the dataset's facts."""
        info = dataset_info(self.dataset)
        shots, n_way = self.k_shot + self.n_query, self.learner.n_way
        return [
            (bool(self.model_dir), dict(model_dir=self.model_dir), "must be set"),
            (info.images_per_class is None or shots <= info.images_per_class,
             dict(k_shot=self.k_shot, n_query=self.n_query, dataset=self.dataset),
             f"+ n_query = {shots} exceeds {info.title}'s {info.images_per_class} images "
             "per class"),
            (info.val_classes is None or n_way <= info.val_classes,
             dict(n_way=n_way, dataset=self.dataset),
             f"exceeds the {info.val_classes} classes of {info.title}'s validation split"),
            (info.source != "folder" or bool(self.data_dir),
             dict(data_dir=self.data_dir, dataset=self.dataset),
             f"must be set: {info.title} is read from a folder"),
        ]

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (the learner's fields nested under `learner`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> RunConfig:
        """Inverse of `to_dict`; unknown keys raise `TypeError` naming them."""
        values = dict(values)
        learner = LearnerConfig(**values.pop("learner"))
        return cls(learner=learner, **values)
