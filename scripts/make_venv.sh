#!/usr/bin/env bash
# Makes ./.venv from a Python >= 3.12 (jax >= 0.11.2 needs it), found in this order:
# python3.12, python3.13, python3 on PATH, then pyenv's installed 3.12.x / 3.13.x (a machine
# whose default python3 is older, with pyenv holding newer ones). An existing .venv on a new
# enough Python is kept as it is; one on an older Python is left alone with an error.
#
#   bash scripts/make_venv.sh && . .venv/bin/activate
set -euo pipefail
cd "$(dirname "$0")/.."

new_enough() {   # $1: a python executable
  "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

if [ -x .venv/bin/python ]; then
  if new_enough .venv/bin/python; then
    echo "using the existing .venv ($(.venv/bin/python --version))"
    exit 0
  fi
  echo "error: .venv exists with $(.venv/bin/python --version 2>&1); mnemax needs Python >=" \
       "3.12. Move it aside (mv .venv .venv-old) and run this again." >&2
  exit 2
fi

candidates=(python3.12 python3.13 python3)
if command -v pyenv >/dev/null 2>&1; then
  root=$(pyenv root)
  for v in "$root"/versions/3.12.* "$root"/versions/3.13.*; do
    [ -x "$v/bin/python3" ] && candidates+=("$v/bin/python3")
  done
fi
for py in "${candidates[@]}"; do
  if command -v "$py" >/dev/null 2>&1 && new_enough "$py"; then
    "$py" -m venv .venv
    echo "made .venv with $(.venv/bin/python --version) ($py)"
    exit 0
  fi
done
echo "error: no Python >= 3.12 found (tried ${candidates[*]}). Install one, e.g." \
     "'pyenv install 3.12' or your system's python3.12 package, then run this again." >&2
exit 2
