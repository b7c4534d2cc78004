#!/usr/bin/env bash
# `make helm-check`: installs helm/requirements.txt into the project's .venv
# (once per change of that file; `make models` creates the venv), then runs
# helm/check.py: strict lint, render with the default and example values,
# offline validation of every manifest. Rendered output: target/helm/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
req="$root/helm/requirements.txt"
if [[ ! -x "$venv/bin/python" ]]; then
  echo "helm-check: no $venv: run \`make models\` (onnx/setup.sh) first" >&2
  exit 1
fi
hash="$(sha256sum "$req" | cut -d' ' -f1)"
if [[ "$(cat "$venv/.thaw-helm-requirements.sha256" 2>/dev/null)" != "$hash" ]] \
   || ! "$venv/bin/python" -c 'import helm_python, kubernetes_validate' 2>/dev/null; then
  echo "helm-check: installing helm/requirements.txt into .venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$req"
  echo "$hash" > "$venv/.thaw-helm-requirements.sha256"
fi
exec "$venv/bin/python" "$root/helm/check.py" "${HELM_OUT:-$root/target/helm}"
