"""The backbone registry: `--backbone` names a builder that makes the run's network from its config.

Everything that needs "the run's network" (the learner, the report, the
exporters through the learner) builds it here from the `LearnerConfig`, so no
module keeps a hand-written copy of a network's constructor call. A builder
takes the config and the common arguments (`n_way`, `image_shape`, the
per-step batch-norm settings, `dtype`, `name`) and adds its network's own
fields. Register your own network the way the built-ins are:

    @nets.register_backbone("my_net")
    def _build_my_net(config, **common):
        return MyNet(width=64, **common)

and set `LearnerConfig(backbone="my_net", ...)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mamlpp_tf.nets.base import Backbone

if TYPE_CHECKING:
    from mamlpp_tf.config import LearnerConfig

Builder = Callable[..., Backbone]
_BUILDERS: dict[str, Builder] = {}


def register_backbone(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering `builder(config, **common) -> Backbone` under `name`.

    Raises:
      ValueError: `name` is already registered.
    """

    def register(builder: Builder) -> Builder:
        if name in _BUILDERS:
            raise ValueError(f"backbone {name!r} is already registered")
        _BUILDERS[name] = builder
        return builder

    return register


def backbone_names() -> tuple[str, ...]:
    """The registered backbone names, built-ins first."""
    return tuple(_BUILDERS)


def build_backbone(config: LearnerConfig, **overrides: Any) -> Backbone:
    """The network `config.backbone` names, as `config` describes it.

    Args:
      config: The learner's config.
      **overrides: Replace common arguments, e.g. `name`, or `num_steps=1,
        bn_stats="running"` for a task model's network.

    Raises:
      ValueError: `config.backbone` is not registered.
    """
    if config.backbone not in _BUILDERS:
        raise ValueError(f"backbone={config.backbone!r} is not registered; known: "
                         f"{backbone_names()}")
    common = dict(n_way=config.n_way, image_shape=config.image_shape,
                  num_steps=config.inner_steps, per_step_bn=config.per_step_bn,
                  bn_stats=config.bn_stats, tasknorm_alpha=config.tasknorm_alpha,
                  tasknorm_unbiased=config.tasknorm_unbiased, dtype=config.dtype_policy,
                  name="backbone")
    common.update(overrides)
    return _BUILDERS[config.backbone](config, **common)
