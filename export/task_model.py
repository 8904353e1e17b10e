r"""Exports a task model: the run's network adapted to one support set, for TF Serving.

    python -m mamlpp_tf_export.task_model --model_dir=RUN --support=FOLDER_OR_NPZ \
        --export_dir=BASE/NAME [--epoch=E] [--bn_stats=support|rn|tasknorm]

Writes `BASE/NAME/<version>/` (the next free version) with signatures
`serving_default(images float32 [None, H, W, C])` and
`predict_encoded(image_bytes string [None])`, both answering
`{probabilities, class_ids, class_names}`; prints the version folder. See
`mamlpp_tf_export.saved_models` for what is baked in and `mamlpp_tf_export.support` for the
support-set layouts.
"""

from __future__ import annotations

from absl import flags

# First, before TensorFlow loads: importing mamlpp_tf quiets its start-up lines.
from mamlpp_tf import cli, task_model
from mamlpp_tf_export import saved_models

flags.DEFINE_string("model_dir", None, "Run directory written by mamlpp_tf.train.")
flags.DEFINE_string(
    "support", None, "Support set: a folder with one sub-folder of "
    "PNG/JPEG images per class (the folder name is the label), or an "
    ".npz with preprocessed x, labels y and optional names.")
flags.DEFINE_string(
    "export_dir", None, "BASE/NAME: the model is written to "
    "BASE/NAME/<version>/, version one above the largest there.")
flags.DEFINE_integer("epoch",
                     None, "Checkpoint epoch to adapt (default: the best "
                     "validation epoch the run kept).",
                     lower_bound=0)
flags.DEFINE_enum(
    "bn_stats", None, task_model.BN_STATS,
    "Batch-norm statistics fixed at export: 'support' (the support set's, "
    "through the adapted weights), 'rn' (the support set's pooled with each "
    "image's own) or 'tasknorm' (the support set's blended with each image's "
    "by the learned α; --bn_stats=tasknorm runs only). Default: the run's own "
    "--bn_stats, with 'support' for 'batch' runs.")
flags.mark_flags_as_required(["model_dir", "support", "export_dir"])
FLAGS = flags.FLAGS


def _export() -> str:
    return str(saved_models.export_task_model(FLAGS.model_dir, FLAGS.support,
                                              FLAGS.export_dir, FLAGS.epoch, FLAGS.bn_stats))


if __name__ == "__main__":
    # ImportError: tensorflow-serving-api (the warm-up records) missing; it names the install.
    cli.run(_export, user_errors=(ValueError, FileNotFoundError, ImportError),
            job="the export of a task model", output_dirs=("export_dir",))
