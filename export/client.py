r"""A small client for the exported models served by TF Serving (REST or gRPC).

    # task model: classify image files
    python -m mamlpp_tf_export.client --model_name=omniglot_5way_task --images=a.png,b.png
    # meta-model: adapt to a support folder (one sub-folder per class), classify queries
    python -m mamlpp_tf_export.client --model_name=omniglot_5way_meta --support=SUPPORT \
        --query=q1.png,q2.png
    # gRPC instead of REST
    python -m mamlpp_tf_export.client --protocol=grpc --server=localhost:8500 --model_name=... ...
    # print the REST request body instead of sending it
    python -m mamlpp_tf_export.client --model_name=... --images=a.png --print_request

Image files are sent as they are to the `predict_encoded` signature, which
decodes and preprocesses them in the graph, so the client needs no
preprocessing and, over REST, nothing beyond the standard library and numpy
(no TensorFlow: argparse, not absl). A meta-model request carries one task
(a task axis of 1, see `mamlpp_tf_export.serving_requests`). Prints one
`file<TAB>class<TAB>probability` line per image; bad flags or files and
server errors are reported in one `error:` line with exit status 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import json
import sys

from mamlpp_tf_export import serving_requests


def _file_list(value: str) -> list[str]:
    return [item for item in value.split(",") if item]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mamlpp_tf_export.client",
        description="Predict requests to the exported models served by TF Serving.")
    parser.add_argument("--server",
                        default="localhost:8501",
                        help="host:port of TF Serving's REST API (--protocol=rest) or "
                        "gRPC API (--protocol=grpc, usually port 8500).")
    parser.add_argument("--protocol",
                        default="rest",
                        choices=serving_requests.PROTOCOLS,
                        help="API to use.")
    parser.add_argument("--model_name",
                        required=True,
                        help="Model name in TF Serving's model config.")
    parser.add_argument("--model_version",
                        type=int,
                        help="Version to query (default: the latest).")
    parser.add_argument("--images",
                        type=_file_list,
                        default=[],
                        help="Task model: comma-separated image files to classify.")
    parser.add_argument("--support",
                        help="Meta-model: support folder, one sub-folder of images per "
                        "class.")
    parser.add_argument("--query",
                        type=_file_list,
                        default=[],
                        help="Meta-model: comma-separated image files to classify.")
    parser.add_argument("--timeout_s",
                        type=float,
                        default=30.0,
                        help="Request timeout in seconds.")
    parser.add_argument("--print_request",
                        action="store_true",
                        help="Print the REST request body as JSON and exit without "
                        "sending it.")
    return parser


def _predict(args: argparse.Namespace) -> str:
    """The lines to print for parsed `args`.

    Raises:
      ValueError: a bad flag combination or support folder.
      OSError: an unreadable image file.
      ImportError, serving_requests.ServingError: see `serving_requests.predict`.
    """
    if args.model_version is not None and args.model_version < 1:
        raise ValueError(f"--model_version={args.model_version} must be >= 1")
    if args.timeout_s <= 0:
        raise ValueError(f"--timeout_s={args.timeout_s} must be > 0")
    if args.support is not None:
        if not args.query or args.images:
            raise ValueError("--support needs --query (the images to classify) and "
                             "excludes --images")
        inputs, class_names = serving_requests.meta_inputs(args.support, args.query)
        files = args.query
    elif args.images and not args.query:
        inputs, class_names = serving_requests.task_inputs(args.images), None
        files = args.images
    else:
        raise ValueError(
            "give --images (task model) or --support and --query (meta-model)")
    if args.print_request:
        body = serving_requests.rest_body(serving_requests.ENCODED_SIGNATURE, inputs)
        return json.dumps(body, indent=1)
    outputs = serving_requests.predict(args.protocol, args.server, args.model_name,
                                       inputs, args.model_version, args.timeout_s)
    if class_names is not None:
        outputs = serving_requests.one_task(outputs)
    return serving_requests.format_predictions(files, outputs, class_names)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the client on `argv` (default: the command line); returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        print(_predict(args))
    except (ValueError, OSError, ImportError, serving_requests.ServingError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        print(f"error: {'; '.join(lines)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
