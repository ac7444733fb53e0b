"""Whetstone: a hackable PyTorch + Triton engine to train and fine-tune Llama-family models.

Install with `pip install -e .` (after `pip install torch==2.13.0`), tests extras with `.[dev]`.
"""
from setuptools import find_packages, setup

setup(
    name="whetstone",
    version="0.1.0",
    description="From-scratch PyTorch + Triton engine for training and fine-tuning open LMs",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*",
                                    "tokenizer", "tokenizer.*"]),
    py_modules=["train", "generate", "eval", "serve"],
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",  # README and .ci/run install torch==2.13.0 first (CPU wheel on disk)
        # tested: 3.6 (the GPU image's, with torch 2.11) to 3.9; kernels.compile_check uses
        # Triton's driver and JIT internals, which move between minor releases
        "triton>=3.6,<3.10; platform_system == 'Linux'",
        "numpy",
        "sentencepiece",
        "tqdm",
        "safetensors",
        "gguf",
        "jinja2",
        "regex",
        "matplotlib",
    ],
    extras_require={
        # Reference implementations: tests compare against them; the engine never imports them.
        # protobuf: transformers reads tokenizer.model with it; trl: tests call DPOTrainer's
        # private _compute_loss, so the minor release is pinned. transformers 5.25 requires
        # PyPI's `kernels` (Hugging Face's hub kernels), whose import name is this repo's
        # kernels/: transformers then imports ours and fails ("cannot import name
        # 'CUDAProperties' from 'kernels'"), so it stays below 5.25 (tests/conftest.py warns
        # when that package is installed).
        "dev": ["pytest", "hypothesis", "transformers<5.25", "tokenizers", "peft", "bitsandbytes",
                "openai", "protobuf", "trl>=1.16,<1.17"],
    },
)
