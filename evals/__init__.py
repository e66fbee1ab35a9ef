"""Evaluations of trained runs.

* `evals.lm_eval_adapter.MnemaxLM`: an lm-evaluation-harness model over a mnemax LM and its
  tokenizer (registered with lm-eval as "mnemax").
* `python -m evals.lm_eval --run_dir R --tasks T`: the lm-eval command line over a run dir.

Importing this package is cheap: lm-eval (seconds to import) loads only with those modules.
"""
