"""Every command-line flag of the training job, and the `RunConfig` they resolve to.

Flags are defined here and nowhere else (Model Garden style). Validators
reject bad values and bad combinations while absl parses the command line,
so a bad run stops before any work with one line naming the flags. Flags given
on the command line override those of a `--flagfile`.
"""

from __future__ import annotations

from absl import flags

from mamlpp_tf.config import (COMPUTE_DTYPES, DATASETS, NAN_POLICIES, OMNIGLOT_SPLITS,
                              STRATEGIES, TASK_IMPLS, LearnerConfig, RunConfig)
from mamlpp_tf.layers import BN_POLICIES

FLAGS = flags.FLAGS

# Data and episodes.
flags.DEFINE_enum("dataset", "omniglot", DATASETS, "Dataset to meta-learn on.")
flags.DEFINE_string("data_dir", None,
                    "Omniglot: a TFDS data dir (prepared, or where TFDS downloads to; "
                    "default: TFDS's own). mini-ImageNet: the folder holding "
                    "train/val/test/<wnid>/*.jpg. Unused for synthetic.")
flags.DEFINE_boolean("download", True,
                     "Let TFDS download and prepare Omniglot if it is not in --data_dir.")
flags.DEFINE_enum("omniglot_split", "paper", OMNIGLOT_SPLITS,
                  "paper: the official MAML++ 1150/50/423 character split; "
                  "background_evaluation: background alphabets for training (with a "
                  "seeded validation carve-out), evaluation alphabets for testing.")
flags.DEFINE_integer("n_way", 20, "Classes per task (N).", lower_bound=2)
flags.DEFINE_integer("k_shot", 1, "Support images per class (K).", lower_bound=1)
flags.DEFINE_integer("n_query", 1, "Query (target) images per class (Q); official: 1 "
                     "for Omniglot, 15 for mini-ImageNet.", lower_bound=1)
flags.DEFINE_integer("meta_batch_size", 8,
                     "Tasks per meta-iteration, across all replicas.", lower_bound=1)

# Inner loop.
flags.DEFINE_integer("inner_steps", 5, "Inner-loop steps in meta-training (S).",
                     lower_bound=1)
flags.DEFINE_integer("eval_inner_steps", 5,
                     "Inner-loop steps at evaluation; at most --inner_steps (per-step "
                     "batch norm and LSLR have one row per training step).", lower_bound=1)
flags.DEFINE_float("inner_lr", 0.1, "Initial (MAML++) or fixed (MAML) inner learning rate.")
flags.DEFINE_boolean("learn_inner_lr", True,
                     "LSLR: learn one inner learning rate per weight tensor and step.")
flags.DEFINE_boolean("per_step_bn", True,
                     "BNWB+BNRS: per-step batch-norm weights, biases and statistics; "
                     "--noper_step_bn shares one set (plain MAML).")
flags.DEFINE_enum("bn_stats", "batch", BN_POLICIES,
                  "batch: batch statistics for support and query, always (what the "
                  "official code does; transductive: a query's answer depends on the "
                  "other queries); running: per-step running statistics at evaluation "
                  "(the paper's stated intent); support: every pass normalised with the "
                  "support set's statistics (MetaBN); tasknorm: the support set's "
                  "blended with each image's own (TaskNorm-I). support and tasknorm "
                  "train the model the way it is served, one image at a time.")

# Outer loop and schedules.
flags.DEFINE_integer("msl_epochs", 10, "Epochs of multi-step-loss annealing; 0 = off.",
                     lower_bound=0)
flags.DEFINE_boolean("second_order", True, "Second-order meta-gradients.")
flags.DEFINE_integer("first_order_epochs", -1,
                     "Derivative-order annealing: epochs 0..k are first order, second "
                     "order after; -1 = off.", lower_bound=-1)
flags.DEFINE_float("meta_lr", 1e-3, "Initial meta learning rate (Adam).", lower_bound=0)
flags.DEFINE_float("min_meta_lr", 1e-5,
                   "Cosine-annealing floor of the meta learning rate; = --meta_lr "
                   "turns annealing off.", lower_bound=0)
flags.DEFINE_float("grad_clip", 0.0,
                   "Element-wise clip of network gradients (not LSLR); 0 = off "
                   "(official: 10 for mini-ImageNet).", lower_bound=0)
flags.DEFINE_integer("epochs", 100, "Training epochs (also the cosine period).",
                     lower_bound=1)
flags.DEFINE_integer("iterations_per_epoch", 500, "Meta-iterations per epoch.",
                     lower_bound=1)

# Network.
flags.DEFINE_integer("num_filters", 64, "Channels of every convolution.", lower_bound=1)
flags.DEFINE_integer("num_stages", 4, "Conv stages of the backbone.", lower_bound=1)
flags.DEFINE_boolean("max_pooling", True,
                     "Max-pool after each stage; --nomax_pooling uses stride-2 "
                     "convolutions and global average pooling.")

# Protocol.
flags.DEFINE_integer("val_tasks", 600, "Fixed validation tasks, evaluated every epoch.",
                     lower_bound=1)
flags.DEFINE_integer("test_tasks", 600, "Fixed test tasks.", lower_bound=1)
flags.DEFINE_integer("ensemble_top_k", 5,
                     "Validation-best epochs kept and ensembled (averaged logits) at "
                     "test time.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Train seed: initial weights and the training task "
                     "stream.", lower_bound=0)
flags.DEFINE_integer("val_seed", 0, "Seed of the fixed validation and test tasks.",
                     lower_bound=0)

# Run.
flags.DEFINE_string("model_dir", None,
                    "Run directory: checkpoints, TensorBoard logs, config.json and "
                    "results.json. Re-running the same command resumes.")
flags.DEFINE_integer("checkpoint_every", 100, "Iterations between mid-epoch checkpoints.",
                     lower_bound=1)
flags.DEFINE_enum("nan_policy", "stop", NAN_POLICIES,
                  "A NaN/Inf meta-loss or meta-gradient is never applied. stop: end the run "
                  "naming the iteration and the last good checkpoint; skip: drop that "
                  "update and go on (counted in TensorBoard and results.json).")
flags.DEFINE_boolean("override_config", False,
                     "Resume a --model_dir created with other flags anyway, recording the "
                     "new ones (by default such a resume is refused with the differences).")
flags.DEFINE_integer("log_every", 10,
                     "Iterations between TensorBoard training summaries and, when stdout "
                     "is not a terminal (a log file), progress lines: iterations done, "
                     "iterations/s, ETA, mean train loss and accuracy.", lower_bound=1)
flags.DEFINE_enum("strategy", "default", STRATEGIES,
                  "default: one device; mirrored: the meta-batch's tasks split across "
                  "local GPUs; multi_worker: across machines (TF_CONFIG).")
flags.DEFINE_integer("cpu_replicas", 0,
                     "Split the CPU into this many logical devices so the distributed "
                     "path runs without GPUs (for tests); 0 = off.", lower_bound=0)
flags.DEFINE_enum("task_impl", "auto", TASK_IMPLS,
                  "Task layout of the meta-step: loop (one task after another), "
                  "batched (all tasks through the network together), auto (by shape).")
flags.DEFINE_boolean("jit_compile", False, "Compile the meta-steps with XLA.")
flags.DEFINE_enum("compute_dtype", None, [d for d in COMPUTE_DTYPES if d],
                  "bfloat16: convolutions and the head's matmul in bfloat16, with float32 "
                  "variables, batch norm, inner-loop updates and losses (benchmarks/README.md "
                  "has its speed and accuracy). Unset: float32 throughout.")

flags.mark_flag_as_required("model_dir")


def _combination(flag_names: list[str], check, message: str) -> None:
    """Registers a multi-flag validator (absl's error names the flags and their values)."""
    flags.register_multi_flags_validator(flag_names, check, message=message)


_combination(["eval_inner_steps", "inner_steps"],
             lambda f: f["eval_inner_steps"] <= f["inner_steps"],
             "eval steps may not exceed training steps (per-step BN and LSLR have one "
             "row per training step)")
_combination(["bn_stats", "per_step_bn"],
             lambda f: f["bn_stats"] != "running" or f["per_step_bn"],
             "running statistics need per-step batch norm")
_combination(["min_meta_lr", "meta_lr"], lambda f: f["min_meta_lr"] <= f["meta_lr"],
             "the annealing floor must not exceed the initial rate")
_combination(["dataset", "k_shot", "n_query"],
             lambda f: f["dataset"] != "omniglot" or f["k_shot"] + f["n_query"] <= 20,
             "Omniglot has 20 images per class: k_shot + n_query must be <= 20")
_combination(["dataset", "n_way"],
             lambda f: f["dataset"] != "mini_imagenet" or f["n_way"] <= 16,
             "mini-ImageNet's validation split has 16 classes: n_way must be <= 16")
_combination(["dataset", "data_dir"],
             lambda f: f["dataset"] != "mini_imagenet" or f["data_dir"],
             "mini-ImageNet is read from a folder: set --data_dir")


def run_config_from_flags() -> RunConfig:
    """Resolves the parsed flags into a validated `RunConfig`."""
    learner = LearnerConfig(
        n_way=FLAGS.n_way, image_shape=_image_shape(FLAGS.dataset),
        num_filters=FLAGS.num_filters, num_stages=FLAGS.num_stages,
        max_pooling=FLAGS.max_pooling, inner_steps=FLAGS.inner_steps,
        eval_inner_steps=FLAGS.eval_inner_steps, inner_lr=FLAGS.inner_lr,
        learn_inner_lr=FLAGS.learn_inner_lr, per_step_bn=FLAGS.per_step_bn,
        bn_stats=FLAGS.bn_stats, msl_epochs=FLAGS.msl_epochs,
        second_order=FLAGS.second_order, first_order_epochs=FLAGS.first_order_epochs,
        meta_lr=FLAGS.meta_lr, min_meta_lr=FLAGS.min_meta_lr, epochs=FLAGS.epochs,
        iterations_per_epoch=FLAGS.iterations_per_epoch, grad_clip=FLAGS.grad_clip,
        task_impl=FLAGS.task_impl, jit_compile=FLAGS.jit_compile,
        compute_dtype=FLAGS.compute_dtype)
    return RunConfig(
        learner=learner, dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
        download=FLAGS.download, omniglot_split=FLAGS.omniglot_split,
        k_shot=FLAGS.k_shot, n_query=FLAGS.n_query, meta_batch_size=FLAGS.meta_batch_size,
        val_tasks=FLAGS.val_tasks, test_tasks=FLAGS.test_tasks,
        ensemble_top_k=FLAGS.ensemble_top_k, seed=FLAGS.seed, val_seed=FLAGS.val_seed,
        model_dir=FLAGS.model_dir, strategy=FLAGS.strategy,
        cpu_replicas=FLAGS.cpu_replicas, checkpoint_every=FLAGS.checkpoint_every,
        nan_policy=FLAGS.nan_policy)


def _image_shape(dataset: str) -> tuple[int, int, int]:
    """Input shape of each dataset (fixed by its preprocessing)."""
    return {"omniglot": (28, 28, 1), "mini_imagenet": (84, 84, 3),
            "synthetic": (28, 28, 1)}[dataset]
