"""Every command-line flag of the training job, and the `RunConfig` they resolve to.

The flags of the run's hyper-parameters are generated from the fields of
`LearnerConfig` and `RunConfig` (`config.option`: name, type, default, help,
bounds, choices), so that a field is declared once; only the job's own flags
(`--override_config`, `--log_every`) are defined by hand. absl checks each
flag's bounds and choices while it parses the command line; the checks across
flags are the configs' own, run by `run_config_from_flags`, which reports them
in flag terms. Flags given on the command line override those of a
`--flagfile`; flags given in neither may take other defaults than their own
(a resumed run's recorded data location, see `run_config_from_flags`).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import typing
from typing import Any

from absl import flags

from mamlpp_tf.config import ConfigError, LearnerConfig, Problem, RunConfig
from mamlpp_tf.data.registry import dataset_info

FLAGS = flags.FLAGS

# The command line's defaults where they differ from the configs': --n_way=20, and no
# --model_dir (it is required).
_FLAG_DEFAULTS = {"n_way": 20, "model_dir": None}
_REQUIRED = ("model_dir",)


class FlagCombinationError(flags.IllegalFlagValueError, ValueError):
    """Flags that do not fit together; one line per problem, naming the flags.

    A `ValueError` too, so that the entry points report it as a user error.
    """


def _define(field: dataclasses.Field, kind: Any) -> None:
    """Defines the flag of one config field (`kind`: the field's resolved type)."""
    meta = field.metadata
    default = _FLAG_DEFAULTS.get(field.name, field.default)
    args = (field.name, default, meta["help"])
    if meta["choices"] is not None:
        flags.DEFINE_enum(field.name, default, [c for c in meta["choices"] if c is not None],
                          meta["help"])
    elif kind is bool:
        flags.DEFINE_boolean(*args)
    elif kind in (int, float):
        # absl bounds are inclusive: for `above`, the config refuses the bound itself.
        lower = meta["lower"] if meta["lower"] is not None else meta["above"]
        define = flags.DEFINE_integer if kind is int else flags.DEFINE_float
        define(*args, lower_bound=lower)
    elif kind is str or kind == str | None:
        flags.DEFINE_string(*args)
    elif kind == tuple[int, ...]:
        # Comma-separated (--mlp_hidden=256,128); LearnerConfig makes the entries ints and
        # checks their bounds.
        flags.DEFINE_list(field.name, [str(d) for d in default], meta["help"])
        flags.register_validator(
            field.name, lambda values: all(_is_int(v) for v in values),
            message="must be comma-separated integers")
    else:
        raise TypeError(f"no flag type for field {field.name}: {kind}")


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _flag_fields(config_class: type) -> list[dataclasses.Field]:
    """The fields of `config_class` that have a flag."""
    return [field for field in dataclasses.fields(config_class)
            if field.metadata.get("flag")]


def _define_config_flags() -> None:
    """Defines one flag per flag field of `LearnerConfig` and `RunConfig`."""
    for config_class in (LearnerConfig, RunConfig):
        hints = typing.get_type_hints(config_class)
        for field in _flag_fields(config_class):
            _define(field, hints[field.name])


_define_config_flags()
flags.DEFINE_boolean("override_config", False,
                     "Resume a --model_dir created with other flags anyway, recording the "
                     "new ones (by default such a resume is refused with the differences).")
flags.DEFINE_integer("log_every", 10,
                     "Iterations per training window: TensorBoard's train loss and accuracy "
                     "are each window's means and, when stdout is not a terminal (a log "
                     "file), a line shows them with the iterations done, iterations/s and "
                     "the ETA.", lower_bound=1)
flags.mark_flags_as_required(_REQUIRED)


def run_config_from_flags(defaults: Mapping[str, Any] | None = None) -> RunConfig:
    """Resolves the parsed flags into a validated `RunConfig`.

    The network's input shape is the dataset's (`data.registry`).

    Args:
      defaults: Values for flags that neither the command line nor a flagfile
        set, in place of the flags' own defaults (e.g. the data location a
        resumed run recorded); checked with the rest.

    Raises:
      FlagCombinationError: The configs refuse the flags; one line per problem,
        each naming the flags involved and their values.
    """
    defaults = defaults or {}

    def value(name: str) -> Any:
        flag = FLAGS[name]
        return defaults[name] if name in defaults and not flag.present else flag.value

    values = {config_class: {field.name: value(field.name)
                             for field in _flag_fields(config_class)}
              for config_class in (LearnerConfig, RunConfig)}
    try:
        learner = LearnerConfig(image_shape=dataset_info(FLAGS.dataset).image_shape,
                                **values[LearnerConfig])
        return RunConfig(learner=learner, **values[RunConfig])
    except ConfigError as error:
        raise FlagCombinationError("\n".join(
            _in_flag_terms(problem) for problem in error.problems)) from None


def _in_flag_terms(problem: Problem) -> str:
    """A problem as absl words a failed validator: `flags a=1, b=2: a must ...`."""
    names = list(problem.values)
    if len(names) == 1:
        return f"flag --{names[0]}={problem.values[names[0]]}: {problem.reason}"
    pairs = ", ".join(f"{name}={value}" for name, value in problem.values.items())
    return f"flags {pairs}: {names[0]} {problem.reason}"
