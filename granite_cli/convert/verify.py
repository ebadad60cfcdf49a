"""Check a written conversion against its source before it is renamed into place.

inventory (re-opening the output checks every tensor the config implies), metadata (the output's
config equals the source's), numbers (each tensor against the source: exact, or within the
quantization's bound), and logits (our core, layer by layer, on the source and on the output: max
difference reported).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from granite_cli.checkpoint import gguf as G
from granite_cli.checkpoint import quant
from granite_cli.checkpoint.sources import Source
from granite_cli.convert.layout import Plan
from granite_cli.errors import CheckFailed


def verify(p: Plan, path: Path, logits: bool = True) -> dict:
    """Check the written output at `path` against the source; raise CheckFailed on any mismatch.

    One pass: each tensor is read once from the source and once from the output, compared, and (for
    the logits check) placed in a float32 copy of its decoder layer; the layer runs and is dropped."""
    out = p.fmt.open_output(path)  # re-parses metadata/config and checks the full tensor inventory
    src = p.source
    res: dict = {"inventory": _inventory(out), "metadata": "ok"}
    for f in ("architecture", "vocab_size", "hidden_size", "num_hidden_layers", "layer_types", "num_attention_heads",
              "num_key_value_heads", "head_dim", "expert_width", "mlp_width", "num_local_experts",
              "num_experts_per_tok", "mamba_n_heads", "mamba_d_head", "mamba_n_groups", "mamba_d_state",
              "mamba_d_conv", "position_embedding_type", "tie_word_embeddings", "embedding_multiplier",
              "attention_multiplier", "residual_multiplier", "logits_scaling", "rms_norm_eps", "rope_theta"):
        a, b = getattr(out.cfg, f), getattr(src.cfg, f)
        if a != b and not (isinstance(a, float) and math.isclose(a, b, rel_tol=1e-6)):
            raise CheckFailed(f"verify: output config {f} = {a!r}, source has {b!r}")
    stats = {"exact": 0, "quantized": 0, "worst_error_over_bound": 0.0}
    seen: set[str] = set()

    def check(n: str) -> list[torch.Tensor]:
        want = src.get(n)
        m = p.method[n]
        if n in seen:  # fetched again (the tied output head): already checked
            if m == "exact" and p.hf_dtype[n] == want.dtype:
                return [want, want]
            return [want, out.get(n) if m == "exact" else out.get(n, cast=False)]
        seen.add(n)
        if m == "exact":
            got = out.get(n)
            exp = want.to(p.hf_dtype[n])
            if got.dtype != exp.dtype or got.shape != exp.shape or not _bits_equal(got, exp):
                diff = (got.float() - exp.float()).abs().max().item() if got.shape == exp.shape else float("nan")
                raise CheckFailed(f"verify: {n} differs from the source after conversion (max |diff| {diff:.3g})")
            stats["exact"] += 1
            # equal values: hand the same tensor to both sides, so while every weight so far is
            # identical the two forwards are one (and the output copy is freed at once)
            return [want, want] if exp is want else [want, got]
        got = out.get(n, cast=False)  # dequantised, float32: what a loader computes with
        r = 0.0
        for g, w in zip(G.row_chunks(got, 1 << 18), G.row_chunks(want, 1 << 18)):
            w = w.to(torch.float32)
            r = max(r, ((g.to(torch.float32) - w).abs() / quant.error_bound(w, m)).max().item())
        if not r <= 1.0:
            raise CheckFailed(f"verify: {n} is off by {r:.2f}x the {m} rounding bound")
        stats["worst_error_over_bound"] = max(stats["worst_error_over_bound"], round(r, 4))
        stats["quantized"] += 1
        return [want, got]

    if logits:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, src.cfg.vocab_size, (1, PROMPT_LEN), generator=g)
        la, lb = streamed_logits(src.cfg, check, ids, 2)
        res["logits"] = {"prompt_tokens": PROMPT_LEN, "max_abs_diff": float((la - lb).abs().max()),
                         "logit_scale": float(la.abs().max()),
                         "argmax_agreement": float((la.argmax(-1) == lb.argmax(-1)).float().mean())}
    else:
        for n in src.names:
            check(n)
    res["tensors"] = stats
    return res


def _inventory(out: Source) -> dict:
    cfg = out.cfg
    inv = {}
    for kind in ("mamba", "attention"):
        layers = [i for i, t in enumerate(cfg.layer_types) if t == kind]
        if layers:
            per = {len([n for n in out.names if n.startswith(f"model.layers.{i}.")]) for i in layers}
            inv[kind] = {"layers": len(layers), "tensors_per_layer": sorted(per)}
    if cfg.num_local_experts:
        inv["experts_per_layer"] = cfg.num_local_experts
    inv["total_tensors"] = len(out.names)
    return inv


PROMPT_LEN = 12


@torch.no_grad()
def streamed_logits(cfg, fetch: Callable[[str], list[torch.Tensor]], ids: torch.Tensor,
                    n: int = 1) -> list[torch.Tensor]:
    """Our core's float32 logits for `ids` under n weight sets, one decoder layer at a time.

    fetch(name) returns that checkpoint tensor from each of the n sources (and may check them);
    each name is fetched exactly once, so verification reads every tensor once per source."""
    from granite_cli.checkpoint.names import checkpoint_entries
    from granite_cli.model.loading import build_empty
    from granite_cli.ops import basic

    models = [build_empty(cfg, torch.float32, "meta") for _ in range(n)]
    entries = checkpoint_entries(cfg)
    emb = fetch("model.embed_tokens.weight")
    hs = [e[ids].to(torch.float32) * cfg.embedding_multiplier for e in _dedup(emb)]
    hs = hs * n if len(hs) == 1 else hs
    del emb
    rope = None
    if cfg.uses_rope:
        inv = basic.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict)
        rope = basic.rope_cos_sin(inv, 0, ids.shape[1], torch.float32, torch.device("cpu"))
    # One materialised layer per (layer kind, source), reloaded for every layer of that kind: no fresh
    # allocation (and page faults) per layer, and the working set is one layer per source. While the
    # sources hand out the very same tensors (a lossless conversion) and the hidden states are one,
    # the layer runs once for all.
    built: dict[str, list] = {}
    for i, kind in enumerate(cfg.layer_types):
        pre = f"layers.{i}."
        got = [(e, fetch(e.ckpt)) for e in entries if e.param.startswith(pre)]
        one = all(h is hs[0] for h in hs) and all(len(_dedup(ts)) == 1 for _, ts in got)
        slots = built.setdefault(kind, [None] * n)
        for j in range(1 if one else n):
            if slots[j] is None:
                slots[j] = models[j].layers[i].to_empty(device="cpu")
        layers = slots[: 1 if one else n]
        params = [dict(layer.named_parameters()) for layer in layers]
        for e, ts in got:
            key = e.param[len(pre):]
            for ps, x in zip(params, ts):
                (ps[key][e.index] if e.index else ps[key]).copy_(x)
        del got
        hs = [layer(h, None, 0, rope) for layer, h in zip(layers, hs)]
        hs = hs * n if one else hs
    del built
    norms = fetch("model.norm.weight")
    # fetched again rather than held through the walk: the peak stays at one layer per source
    heads = fetch("model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight")
    out = []
    if all(h is hs[0] for h in hs) and len(_dedup(heads)) == 1 and len(_dedup(norms)) == 1:
        models, hs, heads, norms = models[:1], hs[:1], heads[:1], norms[:1]
    for m, h, w, nw in zip(models, hs, heads, norms):
        m.norm.to_empty(device="cpu")
        m.norm.weight.copy_(nw)
        h = m.norm(h)
        lg = torch.cat([h @ w[j : j + 8192].to(torch.float32).T for j in range(0, w.shape[0], 8192)], dim=-1)
        out.append(lg / cfg.logits_scaling if cfg.logits_scaling != 1.0 else lg)
    return out * n if len(out) == 1 else out


_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaNs and signed zeros included, which torch.equal on floats is not)."""
    it = _INT[a.element_size()]
    return torch.equal(a.contiguous().view(it), b.contiguous().view(it))


def _dedup(ts: list) -> list:
    """The distinct tensor objects of ts, in order."""
    out: list = []
    for t in ts:
        if not any(t is u for u in out):
            out.append(t)
    return out
