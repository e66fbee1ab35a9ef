"""Runs in a subprocess with 8 simulated CPU devices (tests/test_sharding.py sets XLA_FLAGS
before jax is imported): trains one float32 config on one device and on several meshes, and
resumes a checkpoint written on one mesh on another. Prints one JSON line of results.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_worker.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from models.config_check import load_config  # noqa: E402
from training.loop import train  # noqa: E402

STEPS = 3
# A hybrid of the two kinds of mixer (softmax attention, a chunked recurrent op) in float32,
# widths divisible by every mesh axis used below.
OVERRIDES = ["model.d_model=64", "model.n_heads=4", "model.n_layers=2",
             "model.mixers=[attn,gated_deltanet]", "model.dtype=float32", "model.vocab_size=64",
             "model.max_len=32", "data.seq_len=32", "data.batch_size=16", "data.num_kv_pairs=4",
             f"train.steps={STEPS}", "train.log_every=1", f"train.eval_every={STEPS}",
             "train.eval_batches=1", "train.progress_bar=false", "optim.warmup_steps=1"]
# Full runs on one device and on a pure data-parallel mesh; the fsdp and tensor axes are
# covered by the resumed run below (steps 1-2 on 2x4x1, step 3 on 2x2x2), which saves two
# more compiles of the sharded train step.
MESHES = {"1": None, "8x1x1": (8, 1, 1)}


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def run(out: Path, name: str, mesh, steps: int = STEPS, stop_at: int | None = None,
        run_dir: Path | None = None) -> list[float]:
    run_dir = run_dir or out / name
    sizes = mesh or (1, 1, 1)
    cfg = load_config(None, OVERRIDES + [f"run_dir={run_dir}", f"train.steps={steps}",
                                         f"mesh.data={sizes[0]}", f"mesh.fsdp={sizes[1]}",
                                         f"mesh.tensor={sizes[2]}"])
    devices = jax.devices()[:1] if mesh is None else None
    train(cfg, stop_at_step=stop_at, devices=devices)
    return losses(run_dir)


def param_spec_example(out: Path) -> dict:
    """The shardings the loop gives a few parameters on the 2x2x2 mesh."""
    from flax import nnx

    from models.lm import build_model
    from models.sharding import make_mesh, param_shardings

    cfg = load_config(None, OVERRIDES + ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    params = nnx.state(build_model(cfg.model, seed=0)).to_pure_dict()
    sh = param_shardings(params, make_mesh(cfg.mesh), cfg.model.d_model)
    block = sh["blocks"][0]
    return {"attn_qkv": str(block["mixer"]["qkv"]["kernel"].spec),
            "mlp_down": str(block["mlp"]["down"]["kernel"].spec),
            "embedding": str(sh["embed"]["embedding"].spec)}


def decode_on_mesh() -> dict:
    """Greedy continuations of 4 prompts (different lengths) on one device and on a (2,2,2)
    mesh (params, cache and batch sharded)."""
    from models.generation import generate
    from models.lm import build_model
    from models.sharding import make_mesh

    cfg = load_config(None, OVERRIDES + ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    model = build_model(cfg.model, seed=1)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11, 12, 13]]
    kw = dict(max_new_tokens=6, cache_dtype="float32")
    one = generate(model, prompts, **kw).tokens
    sharded = generate(model, prompts, mesh=make_mesh(cfg.mesh), **kw).tokens
    return {"one": one, "mesh": sharded}


def main(out: Path) -> None:
    result = {"devices": len(jax.devices()),
              "losses": {name: run(out, name, mesh) for name, mesh in MESHES.items()}}
    # Checkpoint written on 2x4x1 at step 2, resumed on 2x2x2 to the end.
    resume_dir = out / "resume"
    first = run(out, "resume", (2, 4, 1), stop_at=2, run_dir=resume_dir)
    full = run(out, "resume", (2, 2, 2), run_dir=resume_dir)
    result["resumed"] = {"before": first, "all": full}
    result["specs"] = param_spec_example(out)
    result["decode"] = decode_on_mesh()
    print(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
