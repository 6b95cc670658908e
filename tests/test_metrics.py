"""FLOP counts against hand counts; the metrics writer's files; progress line and ETA formatting."""

import glob
import io
import json
import os
import struct
import time

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from transformer import metrics

TINY = dict(d_model=8, d_ff=16, num_heads=2, vocab_size=10, source_length=6, target_length=4)


def test_flops_per_token_encoder_decoder_hand_count():
    # D=8, F=16, S=6, T=4, V=10; multiply-adds per token:
    encoder_layer = (4 * 8 * 8      # Q, K, V, O projections: 256
                     + 6 * 8        # scores: each query against 6 keys, head_dim summed over heads: 48
                     + 6 * 8        # weighted sum of values: 48
                     + 2 * 8 * 16)  # FFN up and down: 256           -> 608 per source token
    decoder_layer = (4 * 8 * 8 + 4 * 8 + 4 * 8 + 2 * 8 * 16  # self-attention over 4 targets + FFN: 576
                     + 2 * 8 * 8 + 6 * 8 + 6 * 8              # cross-attention Q, O, scores, sum: 224
                     + 2 * 8 * 8 * 6 / 4)                     # cross K, V of 6 sources, per target: 192
    output = 8 * 10
    forward = 1 * encoder_layer * 6 / 4 + 2 * decoder_layer + output
    assert forward == 2976
    got = metrics.flops_per_token(**TINY, num_encoder_layers=1, num_decoder_layers=2)
    assert got == 6 * 2976 == 17856


def test_flops_per_token_decoder_only_and_swiglu():
    decoder_only = metrics.flops_per_token(**TINY, num_encoder_layers=0, num_decoder_layers=2)
    assert decoder_only == 6 * (2 * (4 * 64 + 2 * 4 * 8 + 2 * 8 * 16) + 80) == 7392
    swiglu = metrics.flops_per_token(**TINY, num_encoder_layers=0, num_decoder_layers=2, swiglu=True)
    assert swiglu - decoder_only == 6 * 2 * (8 * 16)  # one more D x F matrix per layer
    encoder_only = metrics.flops_per_token(**dict(TINY, source_length=4), num_encoder_layers=2,
                                           num_decoder_layers=0)
    assert encoder_only == decoder_only  # same layers without cross-attention, S = T


def test_flops_per_token_matches_palm_formula():
    # PaLM (Chowdhery et al. 2022, App. B): 6 N + 12 L D T per token, N the non-embedding
    # parameters (12 L D^2 with F = 4D) plus the output projection.
    layers, d, t, v = 24, 1024, 2048, 32000
    got = metrics.flops_per_token(d_model=d, d_ff=4 * d, num_heads=16, num_encoder_layers=0, num_decoder_layers=layers,
                                  vocab_size=v, source_length=t, target_length=t)
    assert got == pytest.approx(6 * (12 * layers * d * d + d * v) + 12 * layers * d * t, rel=1e-12)


def test_flops_per_token_rejects_bad_heads():
    with pytest.raises(ValueError):
        metrics.flops_per_token(**dict(TINY, num_heads=3), num_encoder_layers=1, num_decoder_layers=1)


def read_event_scalars(path):
    """{(tag, step): value} from a TensorBoard event file (TFRecord framing: u64 length, crc, data, crc)."""
    scalars = {}
    with open(path, "rb") as f:
        data = f.read()
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
        offset += 12 + length + 4
        for value in event.summary.value:
            scalars[(value.tag, event.step)] = value.simple_value
    return scalars


def test_metrics_writer_writes_json_lines_and_events(tmp_path):
    writer = metrics.MetricsWriter(str(tmp_path))
    writer.write(10, {"train/loss": np.float32(2.5), "train/accuracy": 0.25})
    # Readable before close: each write is flushed.
    with open(tmp_path / "metrics.jsonl") as f:
        first = json.loads(f.readline())
    assert abs(first.pop("wall_time") - time.time()) < 60  # a timestamp, not a metric (no event scalar)
    assert first == {"step": 10, "train/loss": 2.5, "train/accuracy": 0.25}
    writer.write(20, {"eval/loss": 1.75})
    writer.close()
    writer = metrics.MetricsWriter(str(tmp_path), resume_step=20)  # a run resumed at step 20 appends
    writer.write(30, {"train/loss": 1.5})
    writer.close()
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    stamps = [r.pop("wall_time") for r in records]
    assert stamps == sorted(stamps)
    assert records == [{"step": 10, "train/loss": 2.5, "train/accuracy": 0.25}, {"step": 20, "eval/loss": 1.75},
                       {"step": 30, "train/loss": 1.5}]
    event_files = sorted(glob.glob(str(tmp_path / "events.out.tfevents.*")))
    assert len(event_files) == 2
    scalars = {}
    for path in event_files:
        scalars.update(read_event_scalars(path))
    assert scalars == {("train/loss", 10): 2.5, ("train/accuracy", 10): 0.25, ("eval/loss", 20): 1.75,
                       ("train/loss", 30): 1.5}


def test_a_resumed_writer_drops_records_past_its_step(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a": 3}\n{"st')
    metrics.MetricsWriter(str(tmp_path), resume_step=2).close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n'


def test_metrics_writer_disabled_writes_nothing(tmp_path):
    writer = metrics.MetricsWriter(str(tmp_path / "run"), enabled=False)
    writer.write(1, {"train/loss": 1.0})
    writer.close()
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (9.4, "9s"), (59.6, "1m00s"), (245, "4m05s"),
                                          (3723, "1h02m03s"), (90000, "25h00m00s"), (None, "?"),
                                          (float("inf"), "?"), (float("nan"), "?"), (-1, "?")])
def test_format_eta(seconds, text):
    assert metrics.format_eta(seconds) == text


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_line_plain_output_prints_a_line_per_update():
    clock, stream = FakeClock(), io.StringIO()
    progress = metrics.ProgressLine(1000, stream=stream, clock=clock)
    clock.now += 30  # compilation: before the first update, not in the rate
    progress.update(100, {"loss": 3.25, "tokens_per_s": 12345.6})
    clock.now += 60  # 100 steps a minute from here on
    progress.update(200, {"loss": 2.5})
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines == [
        "step 100/1000 (10%) | loss 3.2500 | 12,346 tok/s | elapsed 30s | ETA ?",
        "step 200/1000 (20%) | loss 2.5000 | elapsed 1m30s | ETA 8m00s",
    ]


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_line_redraws_in_place_on_a_terminal():
    clock, stream = FakeClock(), FakeTerminal()
    progress = metrics.ProgressLine(10, stream=stream, clock=clock)
    progress.update(1, {"loss": 10.0})
    clock.now += 1
    progress.update(2, {"loss": 1.0})
    assert "\n" not in stream.getvalue() and stream.getvalue().count("\r") == 2
    progress.close()
    assert stream.getvalue().endswith("ETA 8s\n")


def test_progress_line_disabled_prints_nothing():
    stream = io.StringIO()
    progress = metrics.ProgressLine(10, enabled=False, stream=stream)
    progress.update(1, {"loss": 1.0})
    progress.close()
    assert stream.getvalue() == ""


def test_eta_respects_a_time_budget():
    times = iter([0.0, 10.0, 20.0])
    progress = metrics.ProgressLine(1000, stream=io.StringIO(), clock=lambda: next(times), max_seconds=60.0)
    progress.format(10, {})
    line = progress.format(20, {})  # 980 steps at 1 step/s would take 16 min; the budget ends in 40 s
    assert line.endswith("ETA 40s"), line
