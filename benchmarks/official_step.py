r"""One meta-iteration of the official PyTorch MAML++ code, timed like ours.

Runs `MAMLFewShotClassifier.run_train_iter` and `run_validation_iter` of the
official code (AntreasAntoniou/HowToTrainYourMAMLPytorch) on the synthetic
tensors of `meta_step.py`'s case, in this process, and prints one JSON line
with `meta_step.py`'s keys (`code: "official"`). `meta_step.py
--official_repo=PATH` runs it side by side with ours; alone:

    pip install torch==2.13.0        # CPU build
    python benchmarks/official_step.py --cases=omniglot_5way_1shot \
        --official_repo=/path/to/HowToTrainYourMAMLPytorch --steps=3

It reads meta_step.py's flags --cases (exactly one), --steps,
--max_foreign_cpu, --first_order and --official_repo (required).

Only the official model code is imported, from the checkout put on sys.path
(`few_shot_learning_system`, which imports `meta_neural_network_architectures`
and `inner_loop_optimizers`); nothing of it is copied here. Its `args` are
built the way its `utils/parser_utils.py` builds them, without importing that
file (it parses sys.argv): the defaults of its `add_argument` calls (read from
the file's syntax tree), overridden by every key of the case's experiment
config except `continue_from*` and `gpu_to_use`, then "true"/"false" strings
(any case) turned into booleans. Unlike that file, `use_cuda` is False (CPU
is what is compared) and `dataset_path` is not joined to $DATASET_DIR (no data
is loaded). As in that file, the config's `init_inner_loop_learning_rate` is
not read by the model: the inner rate is `task_learning_rate`'s default.

Epoch 0 is passed, so the multi-step loss and second-order meta-gradients
are on, as in our benchmark. PyTorch uses `os.cpu_count()` intra-op threads,
as TensorFlow does by default. The official code prints its parameter lists
while building; that goes to stderr, so stdout holds the JSON line alone.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import json
import os
import sys
import types

from absl import app
import numpy as np

import meta_step  # same directory; defines the flags read here
import timing

# Our case: the official experiment config with the same shapes.
CONFIGS = {
    "omniglot_5way_1shot": "omniglot_maml++-omniglot_1_8_0.1_64_5_0.json",
    "omniglot_20way_1shot": "omniglot_maml++-omniglot_1_8_0.1_64_20_0.json",
    "mini_imagenet_5way_1shot": "mini-imagenet_maml++-mini-imagenet_1_2_0.01_48_5_0.json",
}
# meta_step.py flags that configure our code only; setting one here is a mistake.
_OURS_ONLY_FLAGS = ("impl", "jit_compile", "in_process", "rounds", "wait_idle", "timeout")
FLAGS = meta_step.FLAGS


def parser_defaults(parser_utils_path: str) -> dict:
    """The `default=` of every `parser.add_argument('--name', ...)` in the file.

    Args:
      parser_utils_path: The official `utils/parser_utils.py`.

    Returns:
      `{name: default}`, None where no default is given (as argparse does).

    Raises:
      ValueError: If a default is not a literal (the file changed shape).
    """
    with open(parser_utils_path, encoding="utf-8") as source:
        tree = ast.parse(source.read())
    defaults = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument" and node.args
                and isinstance(node.args[0], ast.Constant)):
            default = [k.value for k in node.keywords if k.arg == "default"]
            name = node.args[0].value.lstrip("-")
            defaults[name] = ast.literal_eval(default[0]) if default else None
    return defaults


def official_args(repo: str, config_name: str) -> types.SimpleNamespace:
    """The official `args` for one experiment config, as its parser_utils makes them.

    Args:
      repo: The official checkout.
      config_name: A file of its `experiment_config/`.

    Returns:
      The arguments (a namespace, like its `Bunch`).
    """
    args = parser_defaults(os.path.join(repo, "utils", "parser_utils.py"))
    with open(os.path.join(repo, "experiment_config", config_name), encoding="utf-8") as f:
        config = json.load(f)
    args.update({key: value for key, value in config.items()
                 if "continue_from" not in key and "gpu_to_use" not in key})
    for key, value in args.items():
        if str(value).lower() in ("true", "false"):
            args[key] = str(value).lower() == "true"
    args["use_cuda"] = False
    return types.SimpleNamespace(**args)


def check_config(name: str, args: types.SimpleNamespace) -> None:
    """Fails unless the official config has case `name`'s shapes and protocol.

    Raises:
      ValueError: Naming every setting where the two differ.
    """
    n_way, k_shot, n_query, tasks, (height, width, channels), filters = meta_step.CASES[name]
    expected = dict(num_classes_per_set=n_way, num_samples_per_class=k_shot,
                    num_target_samples=n_query, batch_size=tasks, image_height=height,
                    image_width=width, image_channels=channels, cnn_num_filters=filters,
                    number_of_training_steps_per_iter=meta_step.INNER_STEPS,
                    number_of_evaluation_steps_per_iter=meta_step.INNER_STEPS,
                    second_order=True, use_multi_step_loss_optimization=True)
    wrong = {key: (getattr(args, key, None), value) for key, value in expected.items()
             if getattr(args, key, None) != value}
    if args.multi_step_loss_num_epochs <= 0:
        wrong["multi_step_loss_num_epochs"] = (args.multi_step_loss_num_epochs, "> 0")
    if wrong:
        raise ValueError(f"Official config for {name} differs from ours "
                         f"(key: (official, ours)): {wrong}")


def official_batch(name: str) -> tuple[np.ndarray, ...]:
    """`meta_step.synthetic_batch(name)` in the official layout.

    Returns:
      `(x_support, x_target, y_support, y_target)`: images
      `[tasks, n_way, per_class, C, H, W]`, labels `[tasks, n_way, per_class]`;
      the very numbers our benchmark uses.
    """
    n_way = meta_step.CASES[name][0]
    support_x, support_y, query_x, query_y = meta_step.synthetic_batch(name)

    def images(x: np.ndarray) -> np.ndarray:
        tasks, count, height, width, channels = x.shape
        x = x.reshape(tasks, n_way, count // n_way, height, width, channels)
        return np.ascontiguousarray(x.transpose(0, 1, 2, 5, 3, 4))

    def labels(y: np.ndarray) -> np.ndarray:
        return y.reshape(y.shape[0], n_way, -1)

    return images(support_x), images(query_x), labels(support_y), labels(query_y)


def run_official(name: str, repo: str, steps: int, first_order: bool,
                 max_foreign_cpu: float) -> dict:
    """Times the official code on case `name` in this process; returns its record."""
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(os.cpu_count())
    args = official_args(repo, CONFIGS[name])
    check_config(name, args)
    args.second_order = not first_order
    sys.path.insert(0, os.path.abspath(repo))
    system = importlib.import_module("few_shot_learning_system")
    batch = official_batch(name)
    _, _, _, tasks, (height, width, channels), _ = meta_step.CASES[name]
    with contextlib.redirect_stdout(sys.stderr):
        model = system.MAMLFewShotClassifier(im_shape=(tasks, channels, height, width),
                                             device=torch.device("cpu"), args=args)
        timings = timing.time_case(
            lambda: model.run_train_iter(batch, epoch=0)[0]["loss"].item(),
            lambda: model.run_validation_iter(batch)[0]["loss"].item(), steps,
            max_foreign_cpu)
    return meta_step.make_record("official", name, timings, not first_order,
                                 official_config=CONFIGS[name], torch=torch.__version__,
                                 torch_threads=torch.get_num_threads())


def main(argv: list[str]) -> None:
    """Times the official PyTorch code on one `--cases` shape and prints its JSON record."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.official_repo:
        raise app.UsageError("--official_repo is required.")
    if len(FLAGS.cases) != 1:
        raise app.UsageError(f"--cases: exactly one case, got {FLAGS.cases}.")
    ignored = [name for name in _OURS_ONLY_FLAGS if FLAGS[name].present]
    if ignored:
        raise app.UsageError(f"Flags for our code only: {ignored}.")
    print(json.dumps(run_official(FLAGS.cases[0], FLAGS.official_repo, FLAGS.steps,
                                  FLAGS.first_order, FLAGS.max_foreign_cpu)), flush=True)


if __name__ == "__main__":
    app.run(main)
