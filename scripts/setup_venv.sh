#!/usr/bin/env bash
# Create the virtual environment and install the package into it with constraints.txt.
#   scripts/setup_venv.sh PYTHON VENV
# uv installs the same pinned set as pip (same versions, checked with pip freeze) in about 20 s
# where pip takes about 5 minutes on 2 cores: it links wheels from its cache and installs in
# parallel. pip stays the fallback where uv cannot be installed or fails. uv compiles no
# bytecode here: compiling every installed module took 130 CPU-s (60 s of an 80 s setup), and
# the Makefile lets Python write the bytecode of what is imported, on first import (see there).
set -euo pipefail
python=${1:-python3}
venv=${2:-.venv}
spec=(-c constraints.txt -e '.[dev]')
pip=("$venv/bin/pip" --quiet --disable-pip-version-check)

"$python" -m venv "$venv"
if "${pip[@]}" install -c constraints.txt uv >/dev/null 2>&1; then
  # uv does not read pip's configuration. Hand on the wheel directories and indexes pip is
  # configured with: on this kind of machine the CPU build of torch lies there, and without
  # them a resolver takes PyPI's CUDA build. A file:// index that does not exist is left out
  # (pip warns and goes on; uv would stop), and every index is searched for the best version,
  # as pip does (uv would otherwise take only what the first index holding a package has).
  args=()
  for link in ${PIP_FIND_LINKS:-$("$venv/bin/pip" config get global.find-links 2>/dev/null || true)}; do
    [ -e "$link" ] && args+=(--find-links "$link")
  done
  for index in ${PIP_EXTRA_INDEX_URL:-$("$venv/bin/pip" config get global.extra-index-url 2>/dev/null || true)}; do
    case $index in file://*) [ -d "${index#file://}" ] || continue ;; esac
    args+=(--extra-index-url "$index")
  done
  if "$venv/bin/uv" pip install --quiet --python "$venv/bin/python" --index-strategy unsafe-best-match \
       "${args[@]}" "${spec[@]}"; then
    exit 0
  fi
  echo "setup: uv could not install the package; installing with pip instead" >&2
fi
"${pip[@]}" install "${spec[@]}"
