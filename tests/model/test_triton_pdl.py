"""Programmatic dependent launch: off where it cannot run, and the rule that makes it safe, that
every Triton kernel the model launches begins by waiting for the kernel before it."""

from __future__ import annotations

import ast
import importlib
import inspect

import pytest
import torch

triton_pdl = pytest.importorskip("services.model.triton_pdl")

KERNEL_MODULES = ("triton_attention", "triton_gemv", "triton_linear", "triton_ops")


def test_off_on_cpus_and_under_the_interpreter(monkeypatch):
    assert triton_pdl.kwargs(torch.device("cpu")) == {"PDL": False}
    assert not triton_pdl.enabled(torch.device("cpu"))
    monkeypatch.setattr(triton_pdl, "ENABLED", False)
    assert triton_pdl.kwargs(torch.device("cuda", 0)) == {"PDL": False}  # no device query


def _kernels(module):
    tree = ast.parse(inspect.getsource(module))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and any(
                ast.unparse(d) == "triton.jit" for d in node.decorator_list):
            if node.name.endswith("_kernel"):
                yield node


@pytest.mark.parametrize("name", KERNEL_MODULES)
def test_every_kernel_waits_for_the_one_before_first(name):
    """A kernel launched with PDL may start before the kernel before it ends: its first statement
    (after the docstring) must be pdl_begin(PDL), or it could read that kernel's output early."""
    module = importlib.import_module(f"services.model.{name}")
    kernels = list(_kernels(module))
    assert kernels, name
    for kernel in kernels:
        assert "PDL" in [a.arg for a in kernel.args.args], kernel.name
        body = kernel.body[1:] if isinstance(kernel.body[0], ast.Expr) and isinstance(
            kernel.body[0].value, ast.Constant) else kernel.body
        assert ast.unparse(body[0]) == "pdl_begin(PDL)", kernel.name


@pytest.mark.parametrize("name", KERNEL_MODULES)
def test_every_launch_passes_the_pdl_arguments(name):
    """Each `kernel[grid](...)` call takes **triton_pdl.kwargs(device): PDL and launch_pdl agree."""
    module = importlib.import_module(f"services.model.{name}")
    tree = ast.parse(inspect.getsource(module))
    launches = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and isinstance(n.func, ast.Subscript) and ast.unparse(n.func.value).endswith("_kernel")]
    assert launches, name
    for call in launches:
        spread = [ast.unparse(k.value) for k in call.keywords if k.arg is None]
        assert any(s.startswith("triton_pdl.kwargs(") for s in spread), ast.unparse(call)[:80]
