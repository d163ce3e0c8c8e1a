"""Attention kernels over the paged factor cache. Each kernel ships as a private
@triton.jit function, a checked public launcher, and a torch reference in reference.py."""
