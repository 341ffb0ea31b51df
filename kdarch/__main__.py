import sys
from pathlib import Path

# `python -m kdarch` puts the working directory first on the import path; run from a kdarch checkout, its
# top-level kernels/ (installed as kdarch.kernels) would shadow the `kernels` package transformers imports.
sys.path[:] = [p for p in sys.path if not (Path(p or ".") / "kernels" / "fp8_ref.py").is_file()]

from kdarch.cli import main  # noqa: E402

sys.exit(main())
