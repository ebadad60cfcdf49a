"""The kernel implementation choice, made once per process and shown (`granite env`, bench rows).

`GRANITE_KERNELS` = auto | torch | triton.
- torch:  the pure-PyTorch reference ops everywhere.
- triton: the Triton kernels (granite_cli.ops.triton_ops) for CUDA tensors, and for CPU tensors
          when TRITON_INTERPRET=1 (the interpreter; how CI tests them). Refused, with the reason,
          when Triton is missing or there is neither a GPU nor the interpreter.
- auto:   triton when a CUDA GPU and Triton are both present and every kernel passes a quick
          self-test against its reference there, else torch. On a GPU the fallback is reported on
          stderr and in `kernel_impl_note` (with the reason), never silent.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

from granite_cli.errors import InputError
from granite_cli.ops import OPS

IMPLS = ("auto", "torch", "triton")
_resolved: str | None = None
_note = ""
_spaces: dict[str, SimpleNamespace] = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def resolved_impl() -> str:
    global _resolved, _note
    if _resolved is None:
        want = os.environ.get("GRANITE_KERNELS", "auto")
        if want not in IMPLS:
            raise InputError(f"GRANITE_KERNELS={want!r} is not one of {', '.join(IMPLS)}")
        if want == "torch":
            _resolved = "torch"
        elif want == "triton":
            if not (_cuda() or _interpreting()):
                raise InputError("GRANITE_KERNELS=triton needs a CUDA GPU (or TRITON_INTERPRET=1 to run the kernels "
                                 "on CPU in Triton's interpreter); use auto or torch")
            try:
                import granite_cli.ops.triton_ops  # noqa: F401
            except ImportError as e:
                raise InputError(f"GRANITE_KERNELS=triton: Triton is not importable ({e}); "
                                 "pip install 'granite-cli[triton]'") from None
            _resolved = "triton"
        elif _cuda():
            try:
                from granite_cli.ops import triton_ops
            except ImportError as e:
                _resolved = "torch"
                _note = f"Triton unavailable on this GPU machine ({e}); using the PyTorch reference ops"
            else:
                failed = triton_ops.self_test("cuda")
                _resolved = "torch" if failed else "triton"
                if failed:
                    _note = (f"Triton kernel self-test failed on this GPU ({'; '.join(failed)}); using the "
                             "PyTorch reference ops")
            if _note:
                sys.stderr.write(f"warning: {_note}\n")
        else:
            _resolved = "torch"
    return _resolved


def impl_note() -> str:
    resolved_impl()
    return _note


def kernels(device) -> SimpleNamespace:
    """The six hot-path ops for tensors on `device`: the Triton kernels when the resolved impl is
    triton and they can run there (CUDA, or CPU under the interpreter), else the references."""
    impl = resolved_impl()
    kind = getattr(device, "type", device)
    use = impl == "triton" and (kind == "cuda" or (kind == "cpu" and _interpreting()))
    key = "triton" if use else "torch"
    if key not in _spaces:
        if use:
            from granite_cli.ops import triton_ops as m

            _spaces[key] = SimpleNamespace(**{op: getattr(m, op) for op in OPS}, name="triton")
        else:
            from granite_cli.ops import basic, ssd

            _spaces[key] = SimpleNamespace(ssd_chunked=ssd.ssd_chunked, ssd_step=ssd.ssd_step,
                                           causal_conv1d=basic.causal_conv1d,
                                           causal_conv1d_step=basic.causal_conv1d_step,
                                           gated_rms_norm=basic.gated_rms_norm, moe_experts=basic.moe_experts,
                                           name="torch")
    return _spaces[key]


def reset() -> None:
    """Forget the resolved choice (tests switch GRANITE_KERNELS within one process)."""
    global _resolved, _note
    _resolved, _note = None, ""
