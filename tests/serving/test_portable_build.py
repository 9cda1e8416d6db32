"""The installed llama.cpp is built for a fixed x86-64 level, not for the building machine.

With `-march=native` a machine whose CPU advertises AMX got AMX kernels that crashed with a
general protection fault where the hypervisor did not really provide AMX; a wheel built that
way also travelled to other machines through uv's cache. pyproject.toml's
`[tool.uv] config-settings-package` turns GGML_NATIVE off and names the instruction sets; this
reads the machine code that was installed.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from pathlib import Path

import llama_cpp
import pytest

LIB = Path(llama_cpp.__file__).parent / "lib"
AMX = re.compile(
    r"\b(tdpb[su][su]d|tdpbf16ps|tdpfp16ps|tileloaddt?1?|tilestored|ldtilecfg|sttilecfg|"
    r"tilezero|tilerelease)\b"
)

pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64", reason="the instruction-set checks are x86-64's"
)


def _disassembly() -> str:
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils) is needed: the Makefile installs it"
    lib = LIB / "libggml-cpu.so"
    assert lib.exists(), f"no {lib}: llama-cpp-python's layout changed"
    return subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", str(lib)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_no_amx_and_no_avx512_kernels_in_the_cpu_backend() -> None:
    code = _disassembly()
    amx = sorted(set(AMX.findall(code)))
    assert not amx, f"AMX instructions in libggml-cpu.so: {amx} (built with -march=native?)"
    assert "%zmm" not in code, "AVX-512 instructions in libggml-cpu.so: not portable to AVX2 CPUs"
    # Not a bare SSE build either: the AVX2/FMA kernels are what makes the CPU pair usable.
    assert "%ymm" in code and re.search(r"\bvfmadd", code), "no AVX2/FMA kernels: too slow"


def test_no_amx_backend_symbols_exported() -> None:
    symbols = subprocess.run(
        ["nm", "-D", "--defined-only", str(LIB / "libggml-cpu.so")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    amx = [line for line in symbols.splitlines() if "amx" in line and "cpu_has_amx" not in line]
    assert not amx, f"AMX backend symbols exported: {amx}"
