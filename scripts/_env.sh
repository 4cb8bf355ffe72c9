# Shared by scripts/demo and scripts/test: a project virtualenv with Edgeway installed.
# Usage: source scripts/_env.sh EXTRAS   (EXTRAS like "" or "[test]")
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "Edgeway needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
VENV="$ROOT/.venv"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
stamp="$VENV/.edgeway-installed$1"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "==> installing edgeway$1 into .venv"
  # pip's output (setuptools' notice about editable installs, index warnings) is shown only on failure
  if ! log="$("$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 &&
              "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".$1" 2>&1)"; then
    echo "$log" >&2
    echo "edgeway: installing into .venv failed (pip's output above)" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
