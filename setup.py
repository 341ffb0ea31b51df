"""Install-time hook: `KDARCH_BUILD_EXT=1 pip install --no-build-isolation .` compiles the csrc/ ops while
installing, into the cache the first import reads (kdarch.ops.cpp.build), so no user ever waits for a
compiler. Without the variable nothing happens here and the ops are built on first use. The package itself
is described in pyproject.toml."""
import os
import subprocess
import sys
from pathlib import Path

# Not the checkout on the import path: its top-level kernels/ (installed as kdarch.kernels) would shadow the
# `kernels` package transformers requires, whose egg_info writer setuptools imports while it builds.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from setuptools import setup  # noqa: E402
from setuptools.command.build_py import build_py  # noqa: E402


class BuildPyWithExtension(build_py):
    def run(self):
        super().run()
        if os.environ.get("KDARCH_BUILD_EXT", "").strip() != "1":
            return
        # a child process on the package as laid out for installation (kdarch.kernels and kdarch.csrc in place),
        # with torch from the environment being installed into
        env = {**os.environ, "PYTHONPATH": str(Path(self.build_lib).resolve())}
        done = subprocess.run([sys.executable, "-m", "kdarch.ops.cpp"], env=env, capture_output=True, text=True)
        sys.stderr.write(done.stdout + done.stderr)
        if done.returncode != 0:
            raise SystemExit("KDARCH_BUILD_EXT=1: the csrc/ ops did not build (see above); torch must be installed in "
                             "the build environment: pip install --no-build-isolation .")


setup(cmdclass={"build_py": BuildPyWithExtension})
