"""Exports the meta-model: adaptation to each request's support set, for TF Serving.

    python -m mamlpp_tf_export.meta_model --model_dir=RUN --export_dir=BASE/NAME [--epoch=E]

Writes `BASE/NAME/<version>/` (the next free version) with signatures
`serving_default(support_images [T, N·K, H, W, C], support_labels [T, N·K],
query_images [T, Q, H, W, C])` and `predict_encoded(support_image_bytes
[T, N·K], support_labels [T, N·K], query_image_bytes [T, Q])`, both answering
`{logits, probabilities, class_ids}` per task with the run's inner loop run in
the graph (any K-shot, any number of queries, N-way fixed), and TF Serving's
warm-up records; prints the version folder. See `mamlpp_tf_export.saved_models`.
"""

from __future__ import annotations

from absl import flags

# First, before TensorFlow loads: importing mamlpp_tf quiets its start-up lines.
from mamlpp_tf import cli
from mamlpp_tf_export import saved_models

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
    # ImportError: tensorflow-serving-api (the warm-up records) missing; it names the install.
    cli.run(_export, user_errors=(ValueError, FileNotFoundError, ImportError),
            job="the export of a meta model", output_dirs=("export_dir",))
