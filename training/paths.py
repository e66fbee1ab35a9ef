"""Run directories on local disks and in buckets, through one path type (etils.epath).

`run_path("runs/a")` is the absolute local directory; `run_path("gs://bucket/runs/a")` is the
bucket prefix (epath reaches GCS / S3 through the filesystem backend it finds installed:
`tensorflow` gfile or `fsspec` with `gcsfs` / `s3fs`, which mnemax does not install). Orbax
writes checkpoints to either. Everything mnemax writes to a run dir goes through these paths:
config.yaml, metrics.jsonl, wandb_id, the tokenizer copy and the checkpoints, so the local code
path that the tests run is the bucket's too. What a bucket cannot do (append to an object) is
done by rewriting the object (`append_line`).
"""

from __future__ import annotations

from etils import epath


def is_remote(path) -> bool:
    """Whether a path names a bucket object (a URL scheme such as gs:// or s3://)."""
    return "://" in str(path)


def run_path(run_dir) -> epath.Path:
    """RUN_DIR as an epath.Path: local ones made absolute, bucket URLs as given."""
    path = epath.Path(run_dir)
    return path if is_remote(run_dir) else path.resolve()


def append_line(path: epath.Path, line: str, *, rewrite: bool | None = None) -> None:
    """Appends `line` + newline to a text file. Bucket objects cannot be appended to, so there
    the whole object is read and written back (metrics files are small: a line per logged
    step). rewrite: force that path (None: only for remote paths); tests use it locally."""
    if rewrite is None:
        rewrite = is_remote(path)
    if not rewrite:
        with path.open("a") as f:
            f.write(line + "\n")
        return
    old = path.read_text() if path.exists() else ""
    path.write_text(old + line + "\n")
