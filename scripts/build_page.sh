#!/usr/bin/env bash
# Rebuilds the self-service page's copy of MSAL for the browser from web/package-lock.json.
# The copy is committed (deployment never runs npm); tests/test_page.py checks it matches the lock.
set -euo pipefail
cd "$(dirname "$0")/../web"
npm ci --no-audit --no-fund --loglevel=error
cp node_modules/@azure/msal-browser/lib/msal-browser.min.js ../function_selfservice/static/msal-browser.min.js
echo "build_page: function_selfservice/static/msal-browser.min.js is @azure/msal-browser $(node -p 'require("./node_modules/@azure/msal-browser/package.json").version')"
