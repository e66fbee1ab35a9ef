"""Hot ops, one folder each: reference.py (the spec), xla.py (chunked), Pallas kernels later.

Built: linear_attention, gla / simple_gla, delta_rule, gated_delta_rule (reference and chunked
XLA forms, backend="auto"|"reference"|"xla"), and attention/reference.py, the plain definition
that layers/attention.py is tested against. The Pallas kernels come with the kernels issue.
"""
