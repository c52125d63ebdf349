"""What importing slmlab sets up for DeepSpeed's JIT-built ops, whichever way Python was started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(sys.prefix == sys.base_prefix or not (Path(sys.prefix) / "bin" / "ninja").exists(),
                    reason="needs a virtual environment holding its own ninja (bin/ sets one up)")
def test_a_bare_interpreter_finds_the_environments_own_ninja_and_extension_folder():
    """`.venv/bin/python script.py` without activation: the op builds must use the environment's
    ninja (the one set-up built with) and its own extension folder, or they rebuild (~60 s)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_EXTENSIONS_DIR",)}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if Path(p).resolve() != (Path(sys.prefix) / "bin").resolve())
    code = "import shutil, os, slmlab; print(shutil.which('ninja')); print(os.environ['TORCH_EXTENSIONS_DIR'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    ninja, extensions = out.stdout.split()
    assert Path(ninja).resolve() == (Path(sys.prefix) / "bin" / "ninja").resolve()
    assert Path(extensions) == Path(sys.prefix) / "torch_extensions"
