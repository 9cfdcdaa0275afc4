"""baq: fairness-aware differentiable bit allocation in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="baq",
    version="0.1.0",
    description="Fairness-aware differentiable mixed-precision bit allocation (JAX/Flax).",
    packages=find_packages(include=["baq", "baq.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "tensorflow-datasets>=4.9.6,<4.10",
        "array_record>=0.7,<0.9",
        "chex>=0.1.88,<0.2",
        "ml-collections>=1.0,<1.2",
        "absl-py>=2.1,<3",
        "numpy>=1.26,<3",
        "matplotlib>=3.8,<4",
        "pillow>=10,<14",
        "scipy>=1.11,<2",
        "safetensors>=0.4,<1",
        "onnx>=1.17,<2",
        "onnxruntime>=1.20,<2",
        "qwix>=0.1.8,<0.2",
        "tensorboardX>=2.6,<3",
        "grain>=0.2.18,<0.3",
        "tokenizers>=0.20,<1",
        "gguf>=0.17,<0.20",
    ],
    extras_require={"test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4"]},
)
