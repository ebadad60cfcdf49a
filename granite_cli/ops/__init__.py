"""The model's hot-path ops: PyTorch references (basic, ssd), Triton kernels (triton_ops), and the
once-per-process choice between them (dispatch)."""

# The ops dispatch swaps between implementations; each implementation module defines all of them.
OPS = ("ssd_chunked", "ssd_step", "causal_conv1d", "causal_conv1d_step", "gated_rms_norm", "moe_experts")
