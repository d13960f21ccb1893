"""Is torch needed on the device for the adapter step? The FedCLIP adapter's forward, backward
and Adam update in numpy against torch, measured in one run, ratio printed.

Why: a device that extracts features with ONNX Runtime or TensorRT needs torch only to train the
0.5M-parameter adapter; torch for Jetson is a 1+ GB NVIDIA wheel tied to one JetPack. If numpy
were as fast, the agent could drop it. The numpy step is checked against torch first (same
weights, same batch: the updated parameters must agree), so the timing compares equal work.

    python -m fedclip_edge.benchmarks.adapter_step [--dim 512] [--batch 32] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.losses import clip_loss

NAMES = ("fea_attn.0.weight", "fea_attn.0.bias", "fea_attn.2.weight", "fea_attn.2.bias")


class NumpyAdapterStep:
    """The adapter (softmax(W2 tanh(W1 f)) * f, normalized), the clip loss and Adam with coupled
    L2, written out by hand in float32: what `train_local` does per batch."""

    def __init__(self, params: dict[str, np.ndarray], lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float) -> None:
        self.p = {k: np.array(v, dtype=np.float32) for k, v in params.items()}
        self.m = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.v = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.lr, self.b1, self.b2, self.eps, self.wd = lr, betas[0], betas[1], eps, weight_decay
        self.t = 0

    def loss_and_grads(self, f: np.ndarray, text: np.ndarray, scale: float
                       ) -> tuple[float, dict[str, np.ndarray]]:
        w1, b1, w2, b2 = (self.p[k] for k in NAMES)
        a = np.tanh(f @ w1.T + b1)
        z = a @ w2.T + b2
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        att = e / e.sum(axis=1, keepdims=True)
        u = att * f
        n = np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
        g = u / n
        logits = scale * g @ text.T
        bsz = f.shape[0]

        def softmax_rows(x: np.ndarray) -> np.ndarray:
            x = x - x.max(axis=1, keepdims=True)
            ex = np.exp(x)
            return ex / ex.sum(axis=1, keepdims=True)

        p_rows, p_cols = softmax_rows(logits), softmax_rows(logits.T)
        diag = np.arange(bsz)
        loss = -(np.log(p_rows[diag, diag]).mean() + np.log(p_cols[diag, diag]).mean()) / 2
        eye = np.eye(bsz, dtype=np.float32)
        dlogits = ((p_rows - eye) + (p_cols - eye).T) / (2 * bsz)
        dg = scale * dlogits @ text
        du = (dg - g * (dg * g).sum(axis=1, keepdims=True)) / n
        datt = du * f
        dz = att * (datt - (datt * att).sum(axis=1, keepdims=True))
        da = dz @ w2
        dh = da * (1 - a * a)
        grads = {NAMES[0]: dh.T @ f, NAMES[1]: dh.sum(0), NAMES[2]: dz.T @ a,
                 NAMES[3]: dz.sum(0)}
        return float(loss), grads

    def step(self, f: np.ndarray, text: np.ndarray, scale: float) -> float:
        loss, grads = self.loss_and_grads(f, text, scale)
        self.t += 1
        c1, c2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        for k, gr in grads.items():
            gr = gr + self.wd * self.p[k]  # torch.optim.Adam's weight_decay: coupled L2
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * gr
            self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * gr * gr
            self.p[k] -= self.lr * (self.m[k] / c1) / (np.sqrt(self.v[k] / c2) + self.eps)
        return loss


def torch_step_fn(adapter: AttentionAdapter, lr: float, betas: tuple[float, float], eps: float,
                  weight_decay: float) -> Callable[[torch.Tensor, torch.Tensor, float], float]:
    """One `train_local` batch: forward, clip loss, backward, Adam (coupled L2)."""
    opt = torch.optim.Adam(adapter.parameters(), lr=lr, betas=betas, eps=eps,
                           weight_decay=weight_decay)
    labels = None

    def step(f: torch.Tensor, text: torch.Tensor, scale: float) -> float:
        nonlocal labels
        if labels is None or labels.shape[0] != f.shape[0]:
            labels = torch.arange(f.shape[0])
        opt.zero_grad(set_to_none=True)
        loss = clip_loss(adapter(f), text, labels, scale)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def run(dim: int = 512, batch: int = 32, steps: int = 200, warmup: int = 20, seed: int = 0,
        lr: float = 5e-5, weight_decay: float = 0.2) -> dict[str, Any]:
    """Parity first (one step from the same state), then timed steps of each, interleaved in
    blocks so a load spike on a shared machine hits both sides."""
    betas, eps, scale = (0.9, 0.98), 1e-6, 100.0
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, dim, generator=g)
    text = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    torch.manual_seed(seed)
    adapter = AttentionAdapter(dim)
    init = {k: v.detach().numpy().copy() for k, v in adapter.state_dict().items()}
    tstep = torch_step_fn(adapter, lr, betas, eps, weight_decay)
    nstep = NumpyAdapterStep(init, lr, betas, eps, weight_decay)
    f_np, text_np = feats.numpy(), text.numpy()
    # Parity: the loss and every gradient from the same weights and batch (Adam's first step
    # is about lr * sign(grad), which would hide a wrong gradient's size).
    loss_t = clip_loss(adapter(feats), text, torch.arange(batch), scale)
    loss_t.backward()
    ln, grads = nstep.loss_and_grads(f_np, text_np, scale)
    lt = float(loss_t.detach())
    rel = {k: float(np.linalg.norm(grads[k] - p.grad.numpy()) / np.linalg.norm(p.grad.numpy()))
           for k, p in adapter.named_parameters()}
    adapter.zero_grad(set_to_none=True)
    if abs(lt - ln) > 1e-4 * max(1.0, abs(lt)) or max(rel.values()) > 1e-3:
        raise AssertionError(f"numpy step differs from torch: loss {ln} vs {lt}, relative "
                             f"gradient errors {rel}")
    for _ in range(warmup):
        tstep(feats, text, scale)
        nstep.step(f_np, text_np, scale)
    times = {"torch": 0.0, "numpy": 0.0}
    block = max(1, steps // 10)
    done = 0
    while done < steps:
        n = min(block, steps - done)
        t0 = time.perf_counter()
        for _ in range(n):
            tstep(feats, text, scale)
        t1 = time.perf_counter()
        for _ in range(n):
            nstep.step(f_np, text_np, scale)
        t2 = time.perf_counter()
        times["torch"] += t1 - t0
        times["numpy"] += t2 - t1
        done += n
    torch_ms, numpy_ms = 1e3 * times["torch"] / steps, 1e3 * times["numpy"] / steps
    return {
        "dim": dim, "batch": batch, "steps": steps, "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__, "numpy_version": np.__version__,
        "parity": {"loss_torch": lt, "loss_numpy": ln,
                   "max_relative_grad_error": max(rel.values())},
        "torch_ms_per_step": torch_ms, "numpy_ms_per_step": numpy_ms,
        "numpy_over_torch": numpy_ms / torch_ms,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    a = ap.parse_args(argv)
    r = run(a.dim, a.batch, a.steps)
    if a.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"adapter step, d={r['dim']}, batch {r['batch']}, {r['steps']} steps "
              f"(torch {r['torch_version']}, {r['torch_threads']} threads; numpy "
              f"{r['numpy_version']})")
        print(f"  parity: loss {r['parity']['loss_torch']:.6f} (torch) vs "
              f"{r['parity']['loss_numpy']:.6f} (numpy), largest relative gradient error "
              f"{r['parity']['max_relative_grad_error']:.2e}")
        print(f"  torch {r['torch_ms_per_step']:.3f} ms/step | numpy "
              f"{r['numpy_ms_per_step']:.3f} ms/step | numpy/torch {r['numpy_over_torch']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
