"""Training metrics: the FLOP count behind MFU, a JSON-lines + TensorBoard writer, a progress line.

    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
    writer.write(step, {"train/loss": 2.31, "train/tokens_per_s": 1.2e5})  # metrics.jsonl + event file
    progress = ProgressLine(total_steps)
    progress.update(step, {"loss": 2.31, "tokens_per_s": 1.2e5})           # step 120/1000 | loss ... | ETA
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from typing import IO, Callable, Mapping

import tensorboardX


def flops_per_token(*, d_model: int, d_ff: int, num_heads: int, num_encoder_layers: int, num_decoder_layers: int,
                    vocab_size: int, source_length: int, target_length: int, swiglu: bool = False) -> float:
    """Training FLOPs per target token of an encoder-decoder Transformer (matmuls only).

    With D = d_model, F = d_ff, S = source_length, T = target_length, V = vocab_size, and
    multiply-adds (MACs) per token of each part of the forward pass:

      encoder layer, per source token:  4 D^2   Q, K, V, output projections (heads * head_dim = D)
                                        2 S D   scores Q K^T and the weighted sum of V
                                        f D F   feed-forward, f = 2 (two matrices) or 3 (SwiGLU)
      decoder layer, per target token:  4 D^2 + 2 T D + f D F   self-attention and feed-forward
                     (with an encoder)  2 D^2 + 2 S D           cross-attention: Q, output, attention
                                        2 D^2 * S / T           cross-attention K, V of the S memory tokens
      output projection:                D V     logits over the vocabulary

    forward MACs per target token = (S / T) * L_enc * encoder + L_dec * decoder + D V, and
    training FLOPs = 3 (forward + backward) * 2 (FLOPs per MAC) * that. Decoder-only models: set
    num_encoder_layers = 0 (no cross-attention); encoder-only (MLM): num_decoder_layers = 0 and
    S = T, the output projection applied at the encoder's output.

    NOTE: attention scores count the full T x S (causal masking does not halve them), as dense
    kernels compute them; embedding gathers, norms, softmax and biases are left out (the usual
    convention, e.g. PaLM's 6N + 12 L H Q T). The count does not depend on `num_heads` (taken to
    validate that heads split d_model) because head_dim = d_model / num_heads.
    """
    if d_model % num_heads:
        raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}.")
    d, f, s, t = d_model, d_ff, source_length, target_length
    ffn = (3 if swiglu else 2) * d * f
    encoder_layer = 4 * d * d + 2 * s * d + ffn  # per source token
    decoder_layer = 4 * d * d + 2 * t * d + ffn  # per target token
    if num_encoder_layers > 0:
        decoder_layer += 2 * d * d + 2 * s * d + 2 * d * d * s / t
    forward_macs = (s / t) * num_encoder_layers * encoder_layer + num_decoder_layers * decoder_layer + d * vocab_size
    return float(3 * 2 * forward_macs)


def model_flops_per_token(model_cfg, objective: str, length: int) -> float:
    """`flops_per_token` of a ModelConfig trained on `objective` with sources and targets of `length` tokens."""
    encoder_layers = model_cfg.num_encoder_layers if objective in ("translation", "mlm") else 0
    decoder_layers = model_cfg.num_decoder_layers if objective in ("translation", "lm") else 0
    return flops_per_token(
        d_model=model_cfg.d_model, d_ff=model_cfg.d_ff, num_heads=model_cfg.num_heads,
        num_encoder_layers=encoder_layers, num_decoder_layers=decoder_layers, vocab_size=model_cfg.vocab_size,
        source_length=length, target_length=length, swiglu=model_cfg.activation == "swiglu")


WALL_TIME = "wall_time"  # metrics.jsonl's timestamp of each record (time.time(), not a metric)


class MetricsWriter:
    """Writes scalars to `<workdir>/metrics.jsonl` (one JSON object per write) and TensorBoard.

    Each `write(step, scalars)` appends `{"step": step, **scalars, "wall_time": unix seconds}` as a
    line, flushed at once so the file is readable while training, and the scalars to a tensorboardX
    event file in `workdir` (which keeps its own wall time).
    A resumed run extends the same file from `resume_step` on: records past it (written after the
    checkpoint it resumes from) are dropped first, so steps stay increasing. `enabled=False`
    (processes other than 0) writes nothing and creates no files.
    """

    def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self._jsonl = self._tensorboard = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, "metrics.jsonl")
            _drop_records_after(path, resume_step)
            self._jsonl = open(path, "a")
            # NOTE: tensorboardX names event files by the second and the host and opens them with
            # 'wb': without a unique suffix a writer reopened within the same second (a quick
            # resume) would truncate the previous file.
            self._tensorboard = tensorboardX.SummaryWriter(workdir, filename_suffix=f".{uuid.uuid4().hex[:8]}")

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        scalars = {name: float(value) for name, value in scalars.items()}  # numpy / jax scalars too
        self._jsonl.write(json.dumps({"step": int(step), **scalars, WALL_TIME: time.time()}) + "\n")
        self._jsonl.flush()
        for name, value in scalars.items():
            self._tensorboard.add_scalar(name, value, int(step))
        self._tensorboard.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._tensorboard.close()
            self._jsonl = self._tensorboard = None


def _drop_records_after(path: str, step: int) -> None:
    """Rewrites the metrics file `path` without its records of steps after `step` (atomically)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if _record_step(line) is not None and _record_step(line) <= step]
    if len(kept) == len(lines):
        return
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def _record_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut short by a crash


def format_eta(seconds: float | None) -> str:
    """A duration as '1h02m03s', '4m05s' or '9s'; '?' when unknown (None, negative, inf or nan)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class ProgressLine:
    """A one-line console progress display: step/total, loss, tokens/s, elapsed time and ETA.

    On a terminal the line is redrawn in place (carriage return); otherwise (logs, pipes) each
    `update` prints one line. The ETA extrapolates the step rate measured since the first update,
    so it leaves out compilation and, after a resume, the steps done before it. Disabled on
    processes other than 0.
    """

    def __init__(self, total_steps: int, *, enabled: bool = True, stream: IO[str] | None = None,
                 clock: Callable[[], float] = time.perf_counter, max_seconds: float = 0.0):
        self.total_steps, self.enabled = total_steps, enabled
        self.max_seconds = max_seconds  # > 0: a time budget that may end the run before total_steps
        self._stream = sys.stdout if stream is None else stream
        self._tty = enabled and hasattr(self._stream, "isatty") and self._stream.isatty()
        self._clock = clock
        self._start_time = clock()
        self._first: tuple[int, float] | None = None  # (step, time) of the first update
        self._width = 0

    def format(self, step: int, metrics: Mapping[str, float]) -> str:
        """The line for `step`, also recording the first update's step and time for the ETA."""
        now = self._clock()
        if self._first is None:
            self._first = (step, now)
        first_step, first_time = self._first
        eta = None
        if step > first_step and now > first_time:
            eta = (self.total_steps - step) * (now - first_time) / (step - first_step)
        if self.max_seconds:
            time_left = max(self.max_seconds - (now - self._start_time), 0.0)
            eta = time_left if eta is None else min(eta, time_left)
        parts = [f"step {step}/{self.total_steps} ({100 * step / max(self.total_steps, 1):.0f}%)"]
        if "loss" in metrics:
            parts.append(f"loss {float(metrics['loss']):.4f}")
        if "tokens_per_s" in metrics:
            parts.append(f"{float(metrics['tokens_per_s']):,.0f} tok/s")
        parts.append(f"elapsed {format_eta(now - self._start_time)}")
        parts.append(f"ETA {format_eta(eta)}")
        return " | ".join(parts)

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        line = self.format(step, metrics)
        if self._tty:
            # Pad over the previous, possibly longer, line.
            self._stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._tty and self._width:
            self._stream.write("\n")
            self._stream.flush()
            self._width = 0
