"""Programmatic dependent launch: off where it cannot run, and the rule that makes it safe, that
every Triton kernel the model launches waits for the kernel before it before touching memory."""

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


_MEMORY = ("tl.load", "tl.store", "tl.atomic")
# Step inputs: the host copies them in before the step's first kernel, and no kernel writes them,
# so a kernel may read them before its wait (triton_attention reads seq_lens there).
STEP_INPUTS = ("seq_lens_ptr", "block_tables_ptr")


def _touches_memory_or_calls_a_helper(statement) -> str | None:
    """The first call in statement that may read or write memory: tl.load / store / atomics
    (but a load of a step input), or any function that is not part of tl (a helper could do
    either); None when there is none."""
    for node in ast.walk(statement):
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if isinstance(node.func, ast.Attribute) and not name.startswith("tl."):
                continue  # a method of a value: x.to(...)
            if name == "tl.load" and {n.id for n in ast.walk(node.args[0])
                                      if isinstance(n, ast.Name)} & set(STEP_INPUTS):
                continue
            if not name.startswith("tl.") or name.startswith(_MEMORY):
                return name
    return None


@pytest.mark.parametrize("name", KERNEL_MODULES)
def test_every_kernel_waits_for_the_one_before_first(name):
    """A kernel launched with PDL may start before the kernel before it ends: it must call
    pdl_begin(PDL) (or triton_attention's pdl_begin_prefetching_kv(PDL, ...), whose prefetches
    read no data) before any statement that may touch memory but step inputs, or it could read
    that kernel's output early."""
    module = importlib.import_module(f"services.model.{name}")
    kernels = list(_kernels(module))
    assert kernels, name
    for kernel in kernels:
        assert "PDL" in [a.arg for a in kernel.args.args], kernel.name
        body = kernel.body[1:] if isinstance(kernel.body[0], ast.Expr) and isinstance(
            kernel.body[0].value, ast.Constant) else kernel.body
        begins = [i for i, st in enumerate(body) if ast.unparse(st) == "pdl_begin(PDL)"
                  or ast.unparse(st).startswith("pdl_begin_prefetching")
                  and ast.unparse(st).split("(", 1)[1].startswith("PDL,")]
        assert begins, f"{kernel.name} never calls pdl_begin"
        for statement in body[:begins[0]]:
            assert _touches_memory_or_calls_a_helper(statement) is None, (
                kernel.name, ast.unparse(statement))


def test_the_rule_sees_a_load_before_the_wait():
    early = ast.parse("x = tl.load(p + tl.arange(0, 4))").body[0]
    assert _touches_memory_or_calls_a_helper(early) == "tl.load"
    assert _touches_memory_or_calls_a_helper(ast.parse("y = _helper(p)").body[0]) == "_helper"
    fine = ast.parse("rn = tl.program_id(0) * 4 + tl.arange(0, 4).to(tl.int64)").body[0]
    assert _touches_memory_or_calls_a_helper(fine) is None
    step_input = ast.parse("seq_len = tl.load(seq_lens_ptr + seq)").body[0]
    assert _touches_memory_or_calls_a_helper(step_input) is None


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
