"""Exports the meta-model: adaptation to each request's support set, for TF Serving.

    python -m export.meta_model --model_dir=RUN --export_dir=BASE/NAME [--epoch=E]

Writes `BASE/NAME/<version>/` (the next free version) with signatures
`serving_default(support_images, support_labels, query_images)` and
`predict_encoded(support_image_bytes, support_labels, query_image_bytes)`, both
answering `{logits, probabilities, class_ids}` with the run's inner loop run in
the graph (any K-shot, any number of queries, N-way fixed); prints the
version folder. See `export.saved_models`.
"""

from __future__ import annotations

from absl import flags

from export import saved_models
from mamlpp_tf import cli

flags.DEFINE_string("model_dir", None, "Run directory written by mamlpp_tf.train.")
flags.DEFINE_string(
    "export_dir", None, "BASE/NAME: the model is written to "
    "BASE/NAME/<version>/, version one above the largest there.")
flags.DEFINE_integer("epoch",
                     None, "Checkpoint epoch to export (default: the best "
                     "validation epoch the run kept).",
                     lower_bound=0)
flags.mark_flags_as_required(["model_dir", "export_dir"])
FLAGS = flags.FLAGS


def _export() -> str:
    return str(saved_models.export_meta_model(FLAGS.model_dir, FLAGS.export_dir, FLAGS.epoch))


if __name__ == "__main__":
    cli.run(_export)
