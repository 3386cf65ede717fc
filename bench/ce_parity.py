"""Parity of the cross-entropy kernels (train.ce_kernel) on one device: tune.losses' fused chunks ("chunked") and,
when liger_kernel is installed and the device is CUDA, Liger-Kernel's fused linear cross-entropy ("liger"), each
through the loss function the engine uses, against full-logits F.cross_entropy: the summed loss and the gradients
w.r.t. the hidden states, the head weight and its bias, in fp32 and under bf16 autocast; with each one's peak
memory (CUDA) and time. GPU shapes: 8 x 1024 tokens (a quarter of them -100), GPT-2's 768 x 50257 head; on CPU a
small shape, so the same code runs in a smoke test.

    python -m bench.ce_parity [--device cuda]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from tune.losses import IGNORE_INDEX, causal_lm_loss, liger_loss_fn

# stated tolerances: |loss - ref| / |ref|, and max |grad - ref| / max |ref| per gradient
TOLERANCE = {"fp32": {"loss": 1e-5, "grad": 1e-4}, "bf16": {"loss": 1e-3, "grad": 3e-2}}


class _HiddenAndHead(nn.Module):
    """Fixed hidden states + a head, shaped like a model for tune.losses.hidden_and_head."""

    def __init__(self, hidden: torch.Tensor, head: nn.Linear):
        super().__init__()
        self.hidden, self.head = hidden, head

    def hidden_states(self, input_ids, **_masks):
        return self.hidden

    def output_embeddings(self):
        return self.head


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(fn, device, precision):
    """(loss, grads, peak bytes over the start or None on CPU, seconds) of fn() -> (loss, inputs) with backward."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
        loss, inputs = fn()
    grads = torch.autograd.grad(loss, inputs)
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) - start_bytes if device.type == "cuda" else None
    return loss.detach().float(), [g.detach().float() for g in grads], peak, seconds


def liger_parity(device="cuda") -> dict:
    """Loss and gradients of train.ce_kernel=chunked and =liger against full logits on `device` (see the module
    doc). Liger is reported as skipped (with the reason) when liger_kernel is missing or the device is not CUDA;
    the chunked rows run anyway. Returns {"device", "shape", "tolerance", "liger" ("ran" or "skipped: why"),
    "rows": [{"kernel", "precision", "loss", "loss_rel_err", "grad_rel_err": {hidden, weight, bias},
    "peak_gib" (None on CPU), "ms", "ok"}], "ok", "detail" (the rows in one line)}."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    B, L, D, V = (8, 1024, 768, 50257) if gpu else (2, 64, 32, 1000)
    liger = "ran"
    if importlib.util.find_spec("liger_kernel") is None:
        liger = "skipped: liger_kernel is not installed (pip install liger-kernel)"
    elif not gpu:
        liger = f"skipped: Liger-Kernel runs on CUDA only, the device is {device.type}"
    kernels = {"chunked": causal_lm_loss}
    if liger == "ran":
        kernels["liger"] = liger_loss_fn(device)

    torch.manual_seed(0)
    hidden = torch.randn(B, L, D, device=device)
    head = nn.Linear(D, V, device=device)
    nn.init.normal_(head.weight, std=0.02)
    targets = torch.randint(0, V, (B, L), device=device)
    targets[:, : L // 4] = IGNORE_INDEX  # a prompt
    rows = []
    for precision in ("fp32", "bf16"):
        def full_logits():
            h = hidden.clone().requires_grad_(True)
            logits = head(h).float()
            return (F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum",
                                    ignore_index=IGNORE_INDEX), [h, head.weight, head.bias])

        ref_loss, ref_grads, ref_peak, ref_s = _measure(full_logits, device, precision)
        rows.append({"kernel": "full logits", "precision": precision, "loss": ref_loss.item(), "loss_rel_err": 0.0,
                     "grad_rel_err": {}, "peak_gib": ref_peak and ref_peak / 2 ** 30, "ms": ref_s * 1e3, "ok": True})
        for name, loss_fn in kernels.items():
            def run():
                h = hidden.clone().requires_grad_(True)
                loss, _ = loss_fn(_HiddenAndHead(h, head), {"input_ids": targets, "targets": targets})
                return loss, [h, head.weight, head.bias]

            _measure(run, device, precision)  # warm-up (Triton compiles on the first call)
            loss, grads, peak, seconds = _measure(run, device, precision)
            tol = TOLERANCE[precision]
            loss_err = abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())
            grad_err = {key: ((g - r).abs().max() / r.abs().max()).item()
                        for key, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads)}
            rows.append({"kernel": name, "precision": precision, "loss": loss.item(), "loss_rel_err": loss_err,
                         "grad_rel_err": grad_err, "peak_gib": peak and peak / 2 ** 30, "ms": seconds * 1e3,
                         "ok": loss_err <= tol["loss"] and max(grad_err.values()) <= tol["grad"]})
    parts = []
    for r in rows:
        memory = f", peak {r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else ""
        errors = (f": loss {r['loss_rel_err']:.1e}, grads {max(r['grad_rel_err'].values()):.1e}"
                  f"{'' if r['ok'] else ' FAIL'}" if r["grad_rel_err"] else "")
        parts.append(f"{r['kernel']} {r['precision']}{errors}{memory}, {r['ms']:.0f} ms")
    if liger != "ran":
        parts.append(f"liger {liger}")
    return {"device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if gpu else ""),
            "shape": {"batch": B, "seq": L, "dim": D, "vocab": V, "target_tokens": int((targets != IGNORE_INDEX).sum())},
            "tolerance": TOLERANCE, "liger": liger, "rows": rows, "ok": all(r["ok"] for r in rows),
            "detail": "; ".join(parts) + " (errors relative to full logits)"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    result = liger_parity(parser.parse_args(argv).device)
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
