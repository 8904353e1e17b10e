"""Property: any flag values give a runnable job or one error that names a flag at fault."""

import re

from absl import flags
from absl.testing import flagsaver
from hypothesis import given, settings
from hypothesis import strategies as st
import pytest

from mamlpp_tf import flags as run_flags
from mamlpp_tf.training.run import Run

FLAGS = flags.FLAGS

def mostly(valid, invalid):
    """Valid values 19 times in 20, so that many examples reach a runnable job."""
    return st.integers(0, 19).flatmap(
        lambda r: st.sampled_from(invalid) if r == 0 else st.sampled_from(valid))


VALUES = st.fixed_dictionaries({
    "n_way": mostly([2, 3, 5, 20], [-1, 1, 25]),
    "k_shot": mostly([1, 2, 5, 19], [0, -3]),
    "n_query": mostly([1, 2, 15], [0]),
    "meta_batch_size": mostly([1, 2, 3, 4], [0]),
    "inner_steps": mostly([1, 2, 3], [0]),
    "eval_inner_steps": mostly([1, 2, 3], [0, 7]),
    "bn_stats": mostly(["batch", "support", "rn", "tasknorm"], ["median", "running"]),
    "tasknorm_alpha": mostly(["step", "step", "layer", "channel"], ["pixel"]),
    "tasknorm_unbiased": mostly(["false", "false", "true"], ["sometimes"]),
    "per_step_bn": mostly(["true", "false"], ["maybe"]),
    "msl_epochs": mostly([0, 1, 5], [-1]),
    "first_order_epochs": mostly([-1, 0, 3], [-2]),
    "meta_lr": mostly(["0.001", "1e-5"], ["-0.1", "abc"]),
    "min_meta_lr": mostly(["0", "0.00001", "0.01"], ["-1"]),
    "grad_clip": mostly(["0", "10"], ["-1"]),
    "num_filters": mostly([1, 4, 8], [0]),
    "num_stages": mostly([1, 2, 4, 5], [0, 7]),
    "max_pooling": mostly(["true", "false"], ["yes please"]),
    "epochs": mostly([1, 3], [0]),
    "iterations_per_epoch": mostly([1, 3], [0]),
    "val_tasks": mostly([1, 6, 10], [0]),
    "test_tasks": mostly([1, 7], [0]),
    "ensemble_top_k": mostly([1, 4], [0]),
    "task_impl": mostly(["loop", "auto", "batched"], ["fast"]),
})


@settings(max_examples=120, deadline=None, derandomize=True)
@given(values=VALUES)
def test_flags_give_a_runnable_job_or_a_named_error(values):
    argv = ["train", "--dataset=synthetic", "--model_dir=/nonexistent/never_written"]
    argv += [f"--{name}={value}" for name, value in values.items()]
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        try:
            FLAGS(argv)
            config = run_flags.run_config_from_flags()
            run = Run(config)
            learner = run.learner
            batch = next(iter(run.train_tasks(0)))
            for split in ("val", "test"):
                next(iter(run.eval_tasks(split)))
        except (flags.Error, ValueError) as error:
            # One line per problem (the configs report every one), each naming a flag.
            for line in str(error).splitlines():
                named = set(re.findall(r"\b([a-z_]+)=", line))
                assert named & (set(values) | {"image_shape"}), str(error)
            return
    # A valid job: the learner and a first meta-batch of the right shapes exist.
    assert batch[0].shape == (values["meta_batch_size"],
                              values["n_way"] * values["k_shot"], 28, 28, 1)
    assert learner.backbone.n_way == values["n_way"]


def test_a_too_deep_network_for_the_image_is_a_named_error():
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        FLAGS(["train", "--dataset=synthetic", "--model_dir=/x", "--num_stages=6",
               "--n_way=5"])
        config = run_flags.run_config_from_flags()
        with pytest.raises(ValueError, match="num_stages=6"):
            _ = Run(config).learner
