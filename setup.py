"""transformer: the Transformer of Vaswani et al. (2017) in JAX/Flax, for TPU and GPU."""

import setuptools

setuptools.setup(
    name="transformer",
    version="0.1.0",
    description="JAX/Flax research codebase for 'Attention Is All You Need'.",
    packages=setuptools.find_packages(include=["transformer", "transformer.*", "experiments", "experiments.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "chex>=0.1.89",
        "absl-py>=2.1",
        "ml-collections>=1.0",
        "numpy>=1.26",
        # Input pipeline (transformer/data): TFDS builders stored as array_record, read by grain.
        "tensorflow-datasets>=4.9.10",
        "importlib_resources>=6",  # TFDS 4.9.10 needs it at run time but declares it only for Python < 3.9
        "grain>=0.2.18",
        "array-record>=0.8",
        "sentencepiece>=0.2.0",
        # Evaluation and metrics.
        "sacrebleu>=2.4",
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
        "matplotlib>=3.8",  # training plots and attention maps (experiments.plot, experiments.attention)
        "scikit-learn>=1.5",  # its bundled 8x8 digits: the offline ViT example (transformer.data.images)
    ],
    extras_require={
        # The TPU runtime and compiler: jax[tpu] pins the libtpu that matches jax. On any Linux x86-64
        # machine it also compiles for TPU topologies ahead of time (experiments.plan), no TPU needed.
        "tpu": ["jax[tpu]"],
        # experiments.benchmarks.compare runs torch.nn.Transformer beside our model (the CPU build suffices).
        "bench": ["torch>=2.4"],
        # The plan tests compile for TPU on the CPU, so the tests need libtpu too (Linux x86-64 only).
        # Hugging Face MarianMT export and import (experiments.export, experiments.import_checkpoint).
        "marian": ["torch>=2.4", "transformers>=5.0", "safetensors>=0.4"],
        "test": ["pytest>=8", "pytest-xdist>=3.6", "torch>=2.4", "transformers>=5.0", "safetensors>=0.4",
                 "jax[tpu]; sys_platform == 'linux' and platform_machine == 'x86_64'"],
    },
)
