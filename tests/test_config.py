"""The configs declare every hyper-parameter once: flags, checks and messages follow from them."""

import dataclasses

from absl import flags
from absl.testing import flagsaver
import pytest

from mamlpp_tf import flags as run_flags
from mamlpp_tf.config import ConfigError, LearnerConfig, RunConfig

FLAGS = flags.FLAGS

# Every flag of the training job before the flags were generated from the configs, and
# those added since (the networks'): kind, default, and the enum values or the integer/float
# lower bound.
FLAGS_BEFORE = {
    "adapt": ("enum", "all", ("all", "head", "body")),
    "backbone": ("string", "vgg", None),
    "bn_stats": ("enum", "batch", ("batch", "running", "support", "tasknorm", "rn")),
    "checkpoint_every": ("integer", 100, 1),
    "compute_dtype": ("enum", None, ("bfloat16",)),
    "cpu_replicas": ("integer", 0, 0),
    "data_dir": ("string", None, None),
    "dataset": ("enum", "omniglot", ("omniglot", "mini_imagenet", "synthetic")),
    "download": ("bool", True, None),
    "ensemble_top_k": ("integer", 5, 1),
    "epochs": ("integer", 100, 1),
    "eval_inner_steps": ("integer", 5, 1),
    "first_order_epochs": ("integer", -1, -1),
    "grad_clip": ("float", 0.0, 0),
    "inner_lr": ("float", 0.1, None),
    "inner_update": ("enum", "lslr", ("lslr", "meta_sgd", "fixed")),
    "inner_steps": ("integer", 5, 1),
    "iterations_per_epoch": ("integer", 500, 1),
    "jit_compile": ("bool", False, None),
    "k_shot": ("integer", 1, 1),
    "learn_inner_lr": ("bool", True, None),
    "log_every": ("integer", 10, 1),
    "max_pooling": ("bool", True, None),
    "meta_batch_size": ("integer", 8, 1),
    "meta_lr": ("float", 0.001, 0),
    "meta_sgd_per_step": ("bool", True, None),
    "mlp_hidden": ("list", ["256", "128", "64", "64"], None),
    "min_meta_lr": ("float", 1e-05, 0),
    "model_dir": ("string", None, None),
    "msl_epochs": ("integer", 10, 0),
    "n_query": ("integer", 1, 1),
    "n_way": ("integer", 20, 2),
    "nan_policy": ("enum", "stop", ("stop", "skip")),
    "num_filters": ("integer", 64, 1),
    "num_stages": ("integer", 4, 1),
    "omniglot_split": ("enum", "paper", ("paper", "background_evaluation")),
    "override_config": ("bool", False, None),
    "per_step_bn": ("bool", True, None),
    "resnet12_widths": ("list", ["64", "128", "256", "512"], None),
    "second_order": ("bool", True, None),
    "seed": ("integer", 0, 0),
    "strategy": ("enum", "default", ("default", "mirrored", "multi_worker")),
    "task_impl": ("enum", "auto", ("loop", "batched", "auto")),
    "tasknorm_alpha": ("enum", "step", ("step", "layer", "channel")),
    "tasknorm_unbiased": ("bool", False, None),
    "test_tasks": ("integer", 600, 1),
    "val_seed": ("integer", 0, 0),
    "val_tasks": ("integer", 600, 1),
}


def _describe(flag) -> tuple:
    parser = flag.parser
    if flag.boolean:
        return "bool", flag.default, None
    if hasattr(parser, "enum_values"):
        return "enum", flag.default, tuple(parser.enum_values)
    kind = {"IntegerParser": "integer", "FloatParser": "float", "ListParser": "list"}.get(
        type(parser).__name__, "string")
    return kind, flag.default, getattr(parser, "lower_bound", None)


def test_the_generated_flags_are_the_flags_of_before():
    defined = {flag.name: _describe(flag)
               for flag in FLAGS.flags_by_module_dict()[run_flags.__name__]}
    assert defined == FLAGS_BEFORE
    assert all(FLAGS[name].help for name in defined)


def _resolve(*argv):
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        FLAGS(["train", "--model_dir=/x", *argv])
        return run_flags.run_config_from_flags()


def test_each_flag_reaches_its_field():
    config = _resolve("--dataset=synthetic", "--n_way=7", "--k_shot=3", "--n_query=4",
                      "--noper_step_bn", "--inner_lr=0.25", "--bn_stats=support",
                      "--compute_dtype=bfloat16", "--nan_policy=skip", "--seed=11",
                      "--nodownload", "--omniglot_split=background_evaluation")
    learner = LearnerConfig(n_way=7, per_step_bn=False, inner_lr=0.25, bn_stats="support",
                            compute_dtype="bfloat16")
    assert config == RunConfig(learner=learner, dataset="synthetic", k_shot=3, n_query=4,
                               nan_policy="skip", seed=11, download=False,
                               omniglot_split="background_evaluation", model_dir="/x")


@pytest.mark.parametrize("dataset,extra,shape", [
    ("omniglot", [], (28, 28, 1)),
    ("mini_imagenet", ["--data_dir=/d", "--n_way=5"], (84, 84, 3)),
    ("synthetic", [], (28, 28, 1)),
])
def test_the_network_takes_the_datasets_image_shape(dataset, extra, shape):
    assert _resolve(f"--dataset={dataset}", *extra).learner.image_shape == shape


@pytest.mark.parametrize("argv,lines", [
    (["--nolearn_inner_lr", "--inner_update=meta_sgd", "--bn_stats=running",
      "--noper_step_bn"],
     ["flags learn_inner_lr=False, inner_update=meta_sgd: learn_inner_lr is plain MAML's "
      "fixed rate (inner_update='fixed') and contradicts inner_update='meta_sgd', whose "
      "rates are learned",
      "flag --bn_stats=running: evaluates at chance: with the statistics fixed, the learned "
      "inner rates make the evaluation inner loop diverge; train with bn_stats='support' or "
      "'rn' to serve one image at a time"]),
    (["--tasknorm_alpha=layer", "--tasknorm_unbiased"],
     ["flags tasknorm_alpha=layer, bn_stats=batch: tasknorm_alpha is a TaskNorm option: it "
      "needs bn_stats='tasknorm'",
      "flags tasknorm_unbiased=True, bn_stats=batch: tasknorm_unbiased is a TaskNorm option: "
      "it needs bn_stats='tasknorm'"]),
    (["--dataset=omniglot", "--k_shot=15", "--n_query=6"],
     ["flags k_shot=15, n_query=6, dataset=omniglot: k_shot + n_query = 21 exceeds "
      "Omniglot's 20 images per class"]),
    (["--dataset=mini_imagenet", "--data_dir=/d", "--n_way=17"],
     ["flags n_way=17, dataset=mini_imagenet: n_way exceeds the 16 classes of "
      "mini-ImageNet's validation split"]),
    (["--dataset=mini_imagenet", "--n_way=5"],
     ["flags data_dir=None, dataset=mini_imagenet: data_dir must be set: mini-ImageNet is "
      "read from a folder"]),
    (["--meta_lr=0"], ["flag --meta_lr=0.0: must be > 0"]),
])
def test_bad_combinations_are_one_line_each_in_flag_terms(argv, lines):
    with pytest.raises(run_flags.FlagCombinationError) as error:
        _resolve(*argv)
    assert str(error.value).splitlines() == lines
    assert isinstance(error.value, ValueError) and isinstance(error.value, flags.Error)


def test_the_largest_episodes_a_dataset_holds_are_accepted():
    assert _resolve("--dataset=omniglot", "--k_shot=19", "--n_query=1").k_shot == 19
    assert _resolve("--dataset=mini_imagenet", "--data_dir=/d", "--n_way=16").learner.n_way == 16
    # Generated data has no fixed sizes: its loader checks the episodes.
    assert _resolve("--dataset=synthetic", "--n_way=25", "--k_shot=40").learner.n_way == 25


# (field, smallest valid value, a value below it): the documented ranges.
LEARNER_BOUNDS = [("n_way", 2, 1), ("num_filters", 1, 0), ("num_stages", 1, 0),
                  ("inner_steps", 1, 0), ("msl_epochs", 0, -1), ("first_order_epochs", -1, -2),
                  ("min_meta_lr", 0, -1e-9), ("epochs", 1, 0),
                  ("iterations_per_epoch", 1, 0), ("grad_clip", 0, -0.5)]
RUN_BOUNDS = [("k_shot", 1, 0), ("n_query", 1, 0), ("meta_batch_size", 1, 0),
              ("val_tasks", 1, 0), ("test_tasks", 1, 0), ("ensemble_top_k", 1, 0),
              ("seed", 0, -1), ("val_seed", 0, -1), ("cpu_replicas", 0, -1),
              ("checkpoint_every", 1, 0)]


@pytest.mark.parametrize("field,good,bad", LEARNER_BOUNDS)
def test_learner_bounds(field, good, bad):
    extra = dict(eval_inner_steps=1) if field == "inner_steps" else {}
    LearnerConfig(**{field: good}, **extra)
    with pytest.raises(ConfigError, match=rf"^{field}={bad!r} must be >= {good}\.$"):
        LearnerConfig(**{field: bad}, **extra)


@pytest.mark.parametrize("field,good,bad", RUN_BOUNDS)
def test_run_bounds(field, good, bad):
    RunConfig(learner=LearnerConfig(), **{field: good})
    with pytest.raises(ConfigError, match=rf"^{field}={bad!r} must be >= {good}\.$"):
        RunConfig(learner=LearnerConfig(), **{field: bad})


@pytest.mark.parametrize("field", ["meta_lr", "adam_epsilon"])
def test_rates_must_be_positive(field):
    with pytest.raises(ConfigError, match=rf"^{field}=0\.0 must be > 0\.$"):
        LearnerConfig(**{field: 0.0}, min_meta_lr=0.0)


@pytest.mark.parametrize("config_class,field,value", [
    (LearnerConfig, "bn_stats", "median"), (LearnerConfig, "task_impl", "fast"),
    (LearnerConfig, "dtype", "float16"), (LearnerConfig, "compute_dtype", "float16"),
    (RunConfig, "dataset", "cifar"), (RunConfig, "omniglot_split", "vinyals"),
    (RunConfig, "strategy", "tpu"), (RunConfig, "nan_policy", "ignore"),
])
def test_choices(config_class, field, value):
    learner = {"learner": LearnerConfig()} if config_class is RunConfig else {}
    with pytest.raises(ConfigError, match=rf"^{field}='{value}' must be one of \("):
        config_class(**learner, **{field: value})


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as error:
        LearnerConfig(learn_inner_lr=False, inner_update="meta_sgd", per_step_bn=False,
                      bn_stats="running", meta_lr=1e-3, min_meta_lr=1e-2)
    assert [list(p.values) for p in error.value.problems] == [
        ["learn_inner_lr", "inner_update"], ["bn_stats"],
        ["min_meta_lr", "meta_lr"]]
    assert str(error.value).splitlines()[0] == (
        "learn_inner_lr=False is plain MAML's fixed rate (inner_update='fixed') and "
        "contradicts inner_update='meta_sgd', whose rates are learned.")


def test_combinations_wait_for_valid_fields():
    # eval_inner_steps=0 is out of range on its own: no second complaint about inner_steps.
    with pytest.raises(ConfigError) as error:
        LearnerConfig(eval_inner_steps=0)
    assert [list(p.values) for p in error.value.problems] == [["eval_inner_steps"]]
    # An unknown dataset is reported as such, not as a failed look-up of its facts.
    with pytest.raises(ConfigError, match=r"^dataset='cifar' must be one of"):
        RunConfig(learner=LearnerConfig(), dataset="cifar")


def test_dataset_facts_bound_the_episodes():
    learner = LearnerConfig(n_way=17)
    with pytest.raises(ConfigError, match=r"^k_shot=19 \+ n_query = 21 exceeds Omniglot's 20"):
        RunConfig(learner=LearnerConfig(), dataset="omniglot", k_shot=19, n_query=2)
    with pytest.raises(ConfigError, match=r"^n_way=17 exceeds the 16 classes of mini-Im"):
        RunConfig(learner=learner, dataset="mini_imagenet", data_dir="/d")
    with pytest.raises(ConfigError, match=r"^n_way=51 exceeds the 50 classes of Omniglot"):
        RunConfig(learner=LearnerConfig(n_way=51), dataset="omniglot")
    with pytest.raises(ConfigError, match=r"^data_dir=None must be set: mini-ImageNet"):
        RunConfig(learner=LearnerConfig(), dataset="mini_imagenet")
    assert RunConfig(learner=learner, dataset="synthetic").learner.n_way == 17


def test_round_trip_through_a_dict():
    config = RunConfig(learner=LearnerConfig(n_way=3, image_shape=[8, 8, 3]),
                       dataset="synthetic", model_dir="/r")
    assert config.learner.image_shape == (8, 8, 3)
    assert RunConfig.from_dict(config.to_dict()) == config
    assert dataclasses.asdict(config)["learner"]["n_way"] == 3


def test_network_flags_reach_their_fields():
    config = _resolve("--dataset=synthetic", "--backbone=resnet12",
                      "--resnet12_widths=8,16,32,64", "--mlp_hidden=7,5")
    assert config.learner.backbone == "resnet12"
    assert config.learner.resnet12_widths == (8, 16, 32, 64)
    assert config.learner.mlp_hidden == (7, 5)
    with pytest.raises(flags.IllegalFlagValueError, match="comma-separated integers"):
        _resolve("--mlp_hidden=7,wide")


@pytest.mark.parametrize("values,line", [
    (dict(backbone="alexnet"), "backbone='alexnet' must be a registered backbone: one of ("),
    (dict(mlp_hidden=(8, 0)), "mlp_hidden=(8, 0) must be >= 1."),
    (dict(mlp_hidden=()), "mlp_hidden=() must have at least one entry."),
    (dict(backbone="resnet12", resnet12_widths=(8, 8)),
     "resnet12_widths=(8, 8) must give the widths of the 4 residual blocks."),
])
def test_network_fields_are_checked(values, line):
    with pytest.raises(ConfigError) as error:
        LearnerConfig(**values)
    assert str(error.value).startswith(line)


def test_a_config_json_written_before_the_network_fields_is_vgg():
    values = RunConfig(learner=LearnerConfig()).to_dict()
    for name in ("backbone", "resnet12_widths", "mlp_hidden"):
        del values["learner"][name]
    learner = RunConfig.from_dict(values).learner
    assert learner.backbone == "vgg" and learner == LearnerConfig()
