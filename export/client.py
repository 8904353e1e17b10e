"""A small client for the exported models served by TF Serving (REST or gRPC).

    # task model: classify image files
    python -m export.client --model_name=omniglot_task --images=a.png,b.png
    # meta-model: adapt to a support folder (one sub-folder per class), classify queries
    python -m export.client --model_name=omniglot_meta --support=SUPPORT \
        --query=q1.png,q2.png
    # gRPC instead of REST
    python -m export.client --protocol=grpc --server=localhost:8500 --model_name=... ...
    # print the REST request body instead of sending it
    python -m export.client --model_name=... --images=a.png --print_request

Image files are sent as they are to the `predict_encoded` signature, which
decodes and preprocesses them in the graph. Prints one
`file<TAB>class<TAB>probability` line per image.
"""

from __future__ import annotations

import json

from absl import flags

from export import serving_requests
from mamlpp_tf import cli

flags.DEFINE_string(
    "server", "localhost:8501", "host:port of TF Serving's REST API "
    "(--protocol=rest) or gRPC API (--protocol=grpc, usually port 8500).")
flags.DEFINE_enum("protocol", "rest", serving_requests.PROTOCOLS, "API to use.")
flags.DEFINE_string("model_name", None, "Model name in TF Serving's model config.")
flags.DEFINE_integer("model_version",
                     None,
                     "Version to query (default: the latest).",
                     lower_bound=1)
flags.DEFINE_list("images", [], "Task model: image files to classify.")
flags.DEFINE_string("support", None,
                    "Meta-model: support folder, one sub-folder of images per class.")
flags.DEFINE_list("query", [], "Meta-model: image files to classify.")
flags.DEFINE_float("timeout_s", 30.0, "Request timeout in seconds.", lower_bound=0)
flags.DEFINE_bool("print_request", False, "Print the REST request body as JSON and "
                  "exit without sending it.")
flags.mark_flag_as_required("model_name")
FLAGS = flags.FLAGS


def _predict() -> str | None:
    if FLAGS.support is not None:
        if not FLAGS.query or FLAGS.images:
            raise ValueError("--support needs --query (the images to classify) and "
                             "excludes --images")
        inputs, class_names = serving_requests.meta_inputs(FLAGS.support, FLAGS.query)
        files = FLAGS.query
    elif FLAGS.images and not FLAGS.query:
        inputs, class_names = serving_requests.task_inputs(FLAGS.images), None
        files = FLAGS.images
    else:
        raise ValueError("give --images (task model) or --support and --query (meta-model)")
    if FLAGS.print_request:
        body = serving_requests.rest_body(serving_requests.ENCODED_SIGNATURE, inputs)
        return json.dumps(body, indent=1)
    outputs = serving_requests.predict(FLAGS.protocol, FLAGS.server, FLAGS.model_name, inputs,
                                       FLAGS.model_version, FLAGS.timeout_s)
    return serving_requests.format_predictions(files, outputs, class_names)


if __name__ == "__main__":
    cli.run(_predict, user_errors=(ValueError, OSError, ImportError,
                                   serving_requests.ServingError))
