r"""Writes an exported model's inputs as `.npy` files from image files, for `saved_model_cli run`.

    # meta-model: one task, from a support folder and query images
    python -m mamlpp_tf_export.npy_inputs --saved_model=BASE/NAME/VERSION \
        --support=SUPPORT --query=q1.png,q2.png --out=DIR
    # task model: the images to classify
    python -m mamlpp_tf_export.npy_inputs --saved_model=BASE/NAME/VERSION \
        --images=a.png,b.png --out=DIR

Reads the version's export information (its model, preprocessing and
N-way), preprocesses the images as training did and writes one `.npy` per
input of `serving_default` to `--out` (`mamlpp_tf_export.inputs`): for a task
model `images.npy`; for the meta-model `support_images.npy`,
`support_labels.npy` and `query_images.npy`. Prints the `--inputs` argument of
`saved_model_cli run` that names them.
"""

from __future__ import annotations

from absl import flags

# First, before TensorFlow loads: importing mamlpp_tf quiets its start-up lines.
from mamlpp_tf import cli
from mamlpp_tf_export import inputs

flags.DEFINE_string("saved_model", None, "A version folder written by "
                    "mamlpp_tf_export.task_model or meta_model (BASE/NAME/VERSION).")
flags.DEFINE_list("images", [], "Task model: the images to classify, files or folders.")
flags.DEFINE_string("support", None, "Meta-model: the support set, a folder with one "
                    "sub-folder of PNG/JPEG images per class, or an .npz.")
flags.DEFINE_list("query", [], "Meta-model: the images to classify, files or folders.")
flags.DEFINE_string("out", None, "Folder the .npy files are written to (created).")
flags.mark_flags_as_required(["saved_model", "out"])
FLAGS = flags.FLAGS


def _write() -> str:
    arrays = inputs.model_inputs(FLAGS.saved_model, FLAGS.images, FLAGS.support, FLAGS.query)
    return inputs.write_npy(arrays, FLAGS.out)


if __name__ == "__main__":
    cli.run(_write, job="writing the inputs", output_dirs=("out",))
