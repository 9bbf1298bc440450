"""The gateway never loads torch: its start-up and memory stay those of a small async server."""

from __future__ import annotations

import subprocess
import sys


def test_the_gateway_modules_import_no_torch():
    code = ("import sys; import gateway.server, gateway.http_api, gateway.core; "
            "import services.model.config, services.model.cache; "
            "print(sorted(m for m in ('torch', 'triton', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_model_package_still_exports_its_names_lazily():
    import services.model as model

    assert model.ParallelContext.__name__ == "ParallelContext"
    assert "load_model" in model.__all__
