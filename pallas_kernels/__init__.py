"""Hot ops, one folder each, every one behind one public function with `backend=` and
`precision=`: reference.py (the readable definition), xla.py (the chunked / dense portable
form), and Pallas kernels where built (state_passing/ for the linear ops' state sweep,
attention/flash.py and attention/splash.py, nsa/triton.py and nsa/mosaic.py).

Ops: linear_attention, gla / simple_gla, delta_rule, gated_delta_rule, kda, titans, attention,
nsa.
Shared: backends.py (names, the per-platform auto table, interpret / lowering contexts),
precision.py, segments.py (packed documents), chunking.py, arguments.py, triangular.py,
masks.py.
"""
