#!/usr/bin/env bash
# Creates or reuses .venv and installs gradleak into it (with the test extra when asked:
# `bash scripts/env.sh test`). Re-installs only when pyproject.toml or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3
[ -x .venv/bin/python ] || "$python" -m venv .venv
target="."
[ -n "$extra" ] && target=".[$extra]"
stamp=".venv/.gradleak-installed-${extra:-base}"
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt -e "$target"
  echo "$want" > "$stamp"
fi
