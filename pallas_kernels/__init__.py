"""Hot ops, one folder each: reference.py (the spec), xla.py (chunked), Pallas kernels.

The linear-attention ops arrive with the linear-family issue; softmax attention currently runs
as plain XLA in layers/attention.py.
"""
