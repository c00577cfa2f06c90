#!/usr/bin/env bash
# Installs the Debian packages the benchmarks use (wrk, redis-server) when missing.
# Never fails the build: without wrk the benchmarks fall back to a Python load
# generator, and without Redis the Redis rows are marked skipped.
set -u
missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else
  echo "!! cannot install ${missing[*]} (not root, no sudo): the benchmarks will use their fallbacks" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "!! no apt-get: install ${missing[*]} yourself; the benchmarks will use their fallbacks" >&2
  exit 0
fi
echo "Installing ${missing[*]} (Debian packages) for the benchmarks..."
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >/dev/null 2>&1
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
  || echo "!! installing ${missing[*]} failed: the benchmarks will use their fallbacks" >&2
exit 0
