"""Packaging for mamlpp_tf: MAML++ in Keras 3 / TensorFlow 2."""

import pathlib

import setuptools

HERE = pathlib.Path(__file__).parent

# The full `tensorflow` wheel runs on CPUs as well as GPUs, and it is what
# tensorflow-serving-api (the protos of the exports' warm-up records and of
# mamlpp_tf_export.client's gRPC path) requires: with the smaller `tensorflow-cpu` wheel
# that package could only be installed without its dependencies, and
# `pip check` would fail. GPU machines add the `gpu` extra (TensorFlow's CUDA
# libraries).
EXTRAS = {
    "gpu": ["tensorflow[and-cuda]>=2.16"],
    # pytest-xdist: README's test command runs one pytest worker per core.
    "test": ["pytest>=7", "pytest-xdist>=3", "hypothesis>=6", "pillow>=9", "psutil>=5",
             "ruff==0.17.6"],
}

setuptools.setup(
    name="mamlpp_tf",
    version="0.1.0",
    description='MAML++ ("How to train your MAML", ICLR 2019) in Keras 3 / TensorFlow 2',
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The export/ folder installs as `mamlpp_tf_export`: no generic top-level `export`
    # package on a user's path.
    packages=[*setuptools.find_packages(include=["mamlpp_tf", "mamlpp_tf.*"]),
              "mamlpp_tf_export"],
    package_dir={"mamlpp_tf_export": "export"},
    install_requires=[
        "tensorflow>=2.16",
        # Same minor version as tensorflow (its own requirement).
        "tensorflow-serving-api>=2.16",
        "keras>=3",
        "tensorflow-datasets>=4.9",
        # tensorflow-datasets 4.9.x imports it without declaring it.
        "importlib_resources",
        "absl-py>=1.0",
        # tf.summary needs it; recent TensorFlow wheels no longer depend on it.
        "tensorboard>=2.16",
        "numpy>=1.23",
        "pillow>=9",
        # python -m mamlpp_tf.report draws its figures with it.
        "matplotlib>=3.7",
    ],
    package_data={"mamlpp_tf_export": ["serving/*"]},
    extras_require=EXTRAS,
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
