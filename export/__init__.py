"""Serving: exports trained MAML++ runs as SavedModels for TF Serving.

Entry points (absl mains; the logic lives in importable modules without flags):

* `python -m mamlpp_tf_export.task_model`: the network adapted to one support set, with
  the adapted weights and fixed batch-norm statistics baked in.
* `python -m mamlpp_tf_export.meta_model`: the inner loop in the graph, adapting to the
  support set of every request.
* `python -m mamlpp_tf_export.client`: REST/gRPC predict requests with image files.
* `python -m mamlpp_tf_export.npy_inputs`: a model's inputs as `.npy` files from
  image files, for `saved_model_cli run`.

Modules: `saved_models` (building and writing versions), `support` (support
sets), `preprocessing` (training preprocessing as graph ops),
`serving_requests` (request building and sending). `serving/` holds a TF
Serving `models.config` and sample REST requests.
"""
