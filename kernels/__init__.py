"""Triton kernels, one file per op (kernel, launcher, autograd.Function, public function and its
PyTorch `*_ref`): attention, nf4, rmsnorm, rope, swiglu, cross_entropy. The engine reaches them
only through engine/ops.py, which falls back to the references off CUDA; `python -m
kernels.bench` times each against its reference."""

# engine/ops.py checks it: PyPI's `kernels` (Hugging Face's hub kernels, which transformers >= 5.25
# requires) has this package's import name, and whichever comes first on sys.path is imported
WHETSTONE = True
