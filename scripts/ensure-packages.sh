#!/usr/bin/env bash
# Installs the Debian packages named as arguments (commands of the same name) when missing.
# Never fails the build: the tests or benchmarks that need a missing tool say so and skip
# or fall back (browser tests skip, benchmarks use a Python load generator).
# Usage: scripts/ensure-packages.sh chromium redis-server
set -u
missing=()
for package in "$@"; do
  command -v "$package" >/dev/null 2>&1 || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else
  echo "!! cannot install ${missing[*]} (not root, no sudo): what needs them will skip or fall back" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "!! no apt-get: install ${missing[*]} yourself; what needs them will skip or fall back" >&2
  exit 0
fi
echo "Installing ${missing[*]} (Debian packages)..."
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >/dev/null 2>&1
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
  || echo "!! installing ${missing[*]} failed: what needs them will skip or fall back" >&2
exit 0
