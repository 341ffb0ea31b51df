"""kdarch.kernels: Triton kernels, each beside the plain-PyTorch reference it is tested against.

Kernels never import the model; the model reaches them through `kdarch.ops`.
"""
