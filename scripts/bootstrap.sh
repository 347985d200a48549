#!/usr/bin/env bash
# Installs what the demo and the tests need into this checkout: a Python venv (.venv) with
# requirements-dev.txt, and Azurite from package-lock.json (node_modules). Re-running is cheap:
# each step is skipped while its input file is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "bootstrap: Python 3.11 or newer is required (found: $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi
command -v npm >/dev/null || { echo "bootstrap: npm (Node.js 20+) is required for Azurite" >&2; exit 1; }

stamp() { sha256sum "$@" | sha256sum | cut -c1-16; }
# pip on some machines warns about configured local indexes that do not exist; keep the output readable.
pip_quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  "$PYTHON" -m venv .venv
fi
want=$(stamp requirements.txt requirements-dev.txt)
if [ "$(cat .venv/.requirements-stamp 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: installing Python packages"
  pip_quiet .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
  pip_quiet .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
  echo "$want" > .venv/.requirements-stamp
fi

# checkov (the Bicep policy scan) pins packaging<24, which pytest 9 cannot live with: own venv.
CHECKOV_PIN="checkov==3.3.30"
if [ "$(cat .venv-infra/.stamp 2>/dev/null)" != "$CHECKOV_PIN" ]; then
  echo "bootstrap: installing $CHECKOV_PIN into .venv-infra"
  "$PYTHON" -m venv .venv-infra
  pip_quiet .venv-infra/bin/python -m pip install --quiet --disable-pip-version-check "$CHECKOV_PIN"
  echo "$CHECKOV_PIN" > .venv-infra/.stamp
fi

# The browser test (tests/test_page_browser.py) drives the OS's Chromium, never a downloaded build.
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing Chromium (apt-get) for the browser test"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "bootstrap: /usr/bin/chromium is missing and cannot be installed here (needs root and apt-get);" \
      "the browser test will be skipped. Install it with: sudo apt-get install chromium" >&2
  fi
fi

want=$(stamp package.json package-lock.json)
if [ ! -x node_modules/.bin/azurite ] || [ "$(cat node_modules/.stamp 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: installing Azurite (npm ci)"
  for attempt in 1 2 3; do
    npm ci --no-audit --no-fund --loglevel=error && break
    [ "$attempt" = 3 ] && { echo "bootstrap: npm ci failed" >&2; exit 1; }
    sleep 2
  done
  echo "$want" > node_modules/.stamp
fi

# The page's MSAL bundle is committed (deployment runs no npm); web/ locks the package it comes from,
# and tests/test_page.py checks the committed bundle against it byte for byte.
want=$(stamp web/package.json web/package-lock.json)
if [ ! -d web/node_modules/@azure/msal-browser ] || [ "$(cat web/node_modules/.stamp 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: installing the page's locked MSAL package (npm ci in web/)"
  (cd web && npm ci --no-audit --no-fund --loglevel=error)
  echo "$want" > web/node_modules/.stamp
fi
