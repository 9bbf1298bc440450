"""Two gaps of Triton 3.6's interpreter that meshserve's kernels hit; neither exists on the GPU.

- It makes an int of a scalar with int() of a 1-element array, which numpy >= 2.4 refuses, so a
  loop bounded by a loaded seq_len fails (triton-lang/triton#9171; this is upstream's fix).
- It stores bfloat16 as uint16 and tl.dot multiplies the bit patterns (triton-lang/triton#11584):
  here bfloat16 operands become float32, exact for products of bfloat16 values.

tests/conftest.py applies both for the whole session when kernels run in the interpreter.
"""

from __future__ import annotations

import pytest
import torch


def patched():
    """A MonkeyPatch context holding both fixes."""
    import triton.language as tl
    from triton.runtime import interpreter

    patch_tensor, create_dot = interpreter._patch_lang_tensor, interpreter.InterpreterBuilder.create_dot

    def patch_tensor_with_index(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    def bf16_as_float32(handle):
        if handle.dtype != tl.bfloat16:
            return handle
        data = torch.from_numpy(handle.data).view(torch.bfloat16).float().numpy()
        return interpreter.TensorHandle(data, tl.float32)

    def create_float32_dot(self, a, b, *args):
        return create_dot(self, bf16_as_float32(a), bf16_as_float32(b), *args)

    mp = pytest.MonkeyPatch()
    mp.setattr(interpreter, "_patch_lang_tensor", patch_tensor_with_index)
    mp.setattr(interpreter.InterpreterBuilder, "create_dot", create_float32_dot)
    return mp
