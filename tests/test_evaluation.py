"""sacreBLEU scoring, checkpoint averaging, and the translate / evaluate commands end to end."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments.configs import copy as copy_config
from experiments.configs import multi30k as multi30k_config
from transformer import checkpointing, evaluation, inference, inputs, sharding, training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REFERENCES = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee.", "Eine Frau liest ein Buch am Strand."]
HYPOTHESES = ["Ein Mann fährt ein Fahrrad.", "Zwei Hunde spielen im Schnee.", "Eine Frau liest am Strand."]


def test_bleu_of_references_against_themselves_is_100():
    score, signature = evaluation.bleu(REFERENCES, REFERENCES)
    assert score == pytest.approx(100.0)
    assert "case:mixed" in signature and "tok:13a" in signature
    assert evaluation.bleu(REFERENCES, REFERENCES, lowercase=True)[1].count("case:lc") == 1


def test_bleu_matches_the_sacrebleu_command_line(tmp_path):
    (tmp_path / "ref.txt").write_text("\n".join(REFERENCES) + "\n")
    (tmp_path / "hyp.txt").write_text("\n".join(HYPOTHESES) + "\n")
    for lowercase in (False, True):
        command = [sys.executable, "-m", "sacrebleu", str(tmp_path / "ref.txt"), "-i", str(tmp_path / "hyp.txt"),
                   "-m", "bleu", "-b", "-w", "4"] + (["-lc"] if lowercase else [])
        cli = float(subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip())
        ours, _ = evaluation.bleu(HYPOTHESES, REFERENCES, lowercase=lowercase)
        assert ours == pytest.approx(cli, abs=1e-4)
        assert 0 < ours < 100


def test_length_ratio_is_hypothesis_over_reference_tokens():
    """The brevity penalty's lengths: HYPOTHESES have 6 + 6 + 6 tokens (13a splits off the full stop),
    REFERENCES 5 + 6 + 8."""
    scores = evaluation.score_translations(HYPOTHESES, REFERENCES, seconds=1.0)
    assert scores["length_ratio"] == pytest.approx(18 / 19)
    assert evaluation.score_translations(REFERENCES, REFERENCES, 1.0)["length_ratio"] == 1.0
    assert scores["bleu_lc"] == pytest.approx(evaluation.bleu(HYPOTHESES, REFERENCES, lowercase=True)[0])


def test_checkpoint_averaging_is_the_mean_of_parameters(tmp_path):
    config = copy_config.get_config()
    config.model.num_layers = 1
    trainer = training.Trainer(config, training.model_config(config, 16), sharding.make_mesh(data=-1))
    states = [trainer.init_state(seed) for seed in (0, 1, 2)]
    ckpt = checkpointing.Checkpointer(str(tmp_path), keep=5, async_save=False)
    for step, state in zip((10, 20, 30), states):
        ckpt.save(step, state)
    averaged, last = checkpointing.average_params(ckpt, trainer.abstract_state, [10, 20, 30])
    ckpt.close()
    assert last == 30
    expected = jax.tree.map(lambda *xs: sum(np.asarray(x) for x in xs) / 3, *[s.params for s in states])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), jax.device_get(averaged.params), expected)


def run_command(module, *flags, stdin=None):
    return subprocess.run([sys.executable, "-m", module, *flags], cwd=REPO, capture_output=True, text=True,
                          input=stdin, timeout=600)


@pytest.mark.slow
def test_translate_and_evaluate_end_to_end(tmp_path, monkeypatch, multi30k_dir):
    """Train a tiny Multi30k model briefly, then translate stdin and score the test split."""
    workdir = str(tmp_path / "run")
    config = multi30k_config.get_config("hour")
    config.model.update(num_layers=1, d_model=64, d_ff=128)
    config.data.update(manual_dir=multi30k_dir, data_dir=str(tmp_path / "tfds"), vocab_size=500, batch_size=32)
    config.update(num_train_steps=60, max_train_minutes=0.0, eval_every=60, log_every=20)
    config.optimizer.warmup_steps = 10  # the recipe's cosine warms up over 600 of its 4,500 steps
    config.checkpoint.update(every=20, keep=3)
    config.decode.update(beam_size=2, batch_size=64)
    training.train_and_evaluate(config, workdir)

    long_line = "a dog " * 200
    result = run_command("experiments.translate", f"--workdir={workdir}", "--beam_size=2",
                         stdin=f"A man rides a bike.\n\n{long_line}\nTwo dogs play in the snow.\n")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split("\n")[:-1]
    assert len(lines) == 4 and lines[1] == ""  # one line out per line in; the empty line stays empty
    assert "truncated" in result.stderr

    # Awkward input, streamed in chunks (batch_size=2: 16 lines a chunk): every line gives one line, in order.
    awkward = [b"A man rides a bike.", b"   ", b"Caf\xe9 \xff\xfe bad bytes", b"a dog " * 5000, b"\t"] * 8
    result = subprocess.run([sys.executable, "-m", "experiments.translate", f"--workdir={workdir}", "--beam_size=2",
                             "--batch_size=2"], cwd=REPO, capture_output=True, input=b"\n".join(awkward) + b"\n",
                            timeout=600)
    assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr[-3000:]
    out = result.stdout.decode("utf-8").split("\n")[:-1]
    assert len(out) == len(awkward) and all(out[i] == "" for i in range(len(out)) if i % 5 in (1, 4))
    assert len(set(out[0::5])) == 1 and out[0]  # the same sentence, translated the same way wherever it is
    assert b"Line 3 is not valid UTF-8" in result.stderr
    result = run_command("experiments.translate", f"--workdir={workdir}", stdin="")
    assert result.returncode == 0 and result.stdout == ""  # empty input, empty output

    assert inference.average_checkpoints(workdir, 2)[0] == [40, 60]
    steps, _ = inference.average_checkpoints(workdir, 3)  # averaging again replaces the averaged checkpoint
    assert steps == [20, 40, 60]
    result = run_command("experiments.evaluate", f"--workdir={workdir}", "--split=test", "--checkpoint=averaged",
                         "--beam_size=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lowercased BLEU" in result.stdout and "nrefs:1|case:mixed" in result.stdout
    with open(os.path.join(workdir, "eval", "test.averaged.json")) as f:
        scores = json.load(f)
    with open(os.path.join(workdir, "eval", "test.averaged.txt")) as f:
        assert len(f.read().splitlines()) == 1000
    assert scores["step"] == 60 and 0 <= scores["bleu"] <= 100 and scores["perplexity"] > 1

    # Scoring a split reads that split alone: the training pipeline is never built.
    monkeypatch.setattr(inputs, "make_inputs", lambda *a, **k: pytest.fail("evaluate_split built the training inputs"))
    again = inference.evaluate_split(workdir, "test", "averaged", beam_size=2, alpha=scores["alpha"], tag="again")
    assert again["bleu"] == pytest.approx(scores["bleu"]) and again["perplexity"] == pytest.approx(scores["perplexity"])
    with open(os.path.join(workdir, "eval", "test.averaged.again.json")) as f:  # a tag names its own files
        assert json.load(f)["alpha"] == scores["alpha"] == 0.6  # the config's, recorded

    # One SplitScorer restores the checkpoint once and reads a split once, whatever it decodes with.
    evaluate, passes = training.evaluate, []
    monkeypatch.setattr(training, "evaluate", lambda *a: passes.append("evaluate") or evaluate(*a))
    scorer = inference.SplitScorer(workdir, "averaged")
    first = scorer.score("test", beam_size=2, alpha=scores["alpha"], tag="first")
    second = scorer.score("test", beam_size=2, alpha=1.0, tag="second")
    assert passes == ["evaluate"]  # the teacher-forced pass ran once for both
    assert list(scorer._translators) == [2]  # and one Translator (its compiled searches) decoded both alphas
    assert first["bleu"] == pytest.approx(scores["bleu"]) and first["perplexity"] == pytest.approx(scores["perplexity"])
    assert second["alpha"] == 1.0 and second["perplexity"] == first["perplexity"]
    assert os.path.exists(os.path.join(workdir, "eval", "test.averaged.second.json"))
    # Several alphas from one search: the same scores as one `score` call each, files tagged by alpha.
    searched = scorer.score_alphas("test", [scores["alpha"], 1.0], beam_size=2)
    assert list(searched) == [scores["alpha"], 1.0] and passes == ["evaluate"]
    assert searched[1.0]["bleu"] == pytest.approx(second["bleu"]) and searched[1.0]["alpha"] == 1.0
    assert searched[scores["alpha"]]["bleu_lc"] == pytest.approx(first["bleu_lc"])
    assert searched[1.0]["perplexity"] == first["perplexity"]
    with open(os.path.join(workdir, "eval", "test.averaged.alpha1.txt")) as f, \
            open(os.path.join(workdir, "eval", "test.averaged.second.txt")) as g:
        assert f.read() == g.read()

    # The benchmark of the two ways runs on the same workdir and finds their translations identical.
    result = run_command("experiments.benchmarks.alpha_search", f"--workdir={workdir}", "--split=test",
                         "--alphas=0.6,1.0", "--beam_size=2", "--rounds=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "translations identical in every round" in result.stdout
    assert "| 0 |" in result.stdout and "alpha 1: BLEU lc" in result.stdout


class CharTokenizer:
    """A stand-in vocabulary: one id per character (mod 20), after pad 0, eos 1, unk 2."""

    eos_id = 1

    def encode(self, text):
        return [3 + ord(c) % 20 for c in text]

    def decode(self, ids):
        ids = ids[:ids.index(1)] if 1 in ids else ids
        return "".join(chr(ord("a") + i - 3) for i in ids if i >= 3)


def tiny_model():
    """An untrained 1+1-layer EncoderDecoder over CharTokenizer's 24 ids, and its parameters."""
    import transformer as tfm

    cfg = tfm.ModelConfig.preset("tiny", vocab_size=24, num_encoder_layers=1, num_decoder_layers=1, max_len=64)
    model = tfm.EncoderDecoder(cfg)
    return model, model.init(jax.random.key(0), np.ones((1, 8), np.int32), np.ones((1, 8), np.int32))["params"]


def test_translator_compiles_once_per_length_bucket(monkeypatch):
    """Recompile guard: a whole test set traces the decoder once per padded length, never per batch."""
    traces, alphas = [], []
    real = evaluation.decoding.translate

    def counting(model, params, inputs, **kwargs):
        traces.append(inputs.shape)  # runs only while JAX traces
        jax.debug.callback(lambda a: alphas.append(float(a)), kwargs["alpha"])  # runs at every call
        return real(model, params, inputs, **kwargs)

    monkeypatch.setattr(evaluation.decoding, "translate", counting)
    model, params = tiny_model()
    translator = evaluation.Translator(model, CharTokenizer(), beam_size=2, batch_size=4, max_input_length=32,
                                       max_extra_length=4)
    rng = np.random.default_rng(0)
    sentences = ["".join(rng.choice(list("abcdefgh"), size=n)) for n in rng.integers(1, 30, size=60)]
    outputs = translator(params, sentences)
    assert len(outputs) == 60
    lengths = sorted(len(s) + 1 for s in sentences)  # + EOS
    pad = lambda n: -(-n // evaluation.LENGTH_MULTIPLE) * evaluation.LENGTH_MULTIPLE  # noqa: E731
    batch_lengths = {pad(max(lengths[i:i + 4])) for i in range(0, 60, 4)}  # 15 batches, a few padded lengths
    assert len(traces) == len(batch_lengths) <= len({pad(n) for n in lengths}) and 0 < len(traces) < 15
    assert {shape[1] for shape in traces} == batch_lengths  # one trace per bucket, none twice
    translator(params, sentences[::-1])  # another pass over the same lengths compiles nothing
    assert len(traces) == len(batch_lengths)
    # Nor does another length penalty (a search on val): alpha is an argument of the compiled search.
    strong = translator(params, sentences, alpha=3.0)
    assert len(traces) == len(batch_lengths)
    assert strong == evaluation.Translator(model, CharTokenizer(), beam_size=2, batch_size=4, max_input_length=32,
                                           max_extra_length=4, alpha=3.0)(params, sentences)
    # Each batch was searched with the alpha asked for: 2 passes at the default, then 2 at 3.0.
    assert np.allclose(alphas, [0.6] * 30 + [3.0] * 30)


def test_translator_with_alphas_gives_each_alphas_translations_from_one_search(monkeypatch):
    calls = []
    real = evaluation.decoding.translate

    def counting(model, params, inputs, **kwargs):
        jax.debug.callback(lambda: calls.append(1))  # runs at every call
        return real(model, params, inputs, **kwargs)

    monkeypatch.setattr(evaluation.decoding, "translate", counting)
    step_fn = evaluation.decoding.encoder_decoder_step_fn

    def ending_step_fn(*args):  # an untrained model never ends; favour EOS so that outputs end at many lengths
        step = step_fn(*args)

        def logits_fn(tokens, cache):
            logits, cache = step(tokens, cache)
            return logits.at[:, CharTokenizer.eos_id].add(3.0), cache

        return logits_fn

    monkeypatch.setattr(evaluation.decoding, "encoder_decoder_step_fn", ending_step_fn)
    model, params = tiny_model()
    translator = evaluation.Translator(model, CharTokenizer(), beam_size=3, batch_size=4, max_input_length=32,
                                       max_extra_length=6)
    rng = np.random.default_rng(1)
    sentences = ["".join(rng.choice(list("abcdefgh"), size=n)) for n in rng.integers(1, 20, size=10)] + ["  "]
    alphas = [0.0, 1.0, 5.0]
    by_alpha = translator.with_alphas(params, sentences, alphas)
    assert list(by_alpha) == alphas and len(calls) == 3  # 11 sentences, 3 batches, one search each
    for alpha in alphas:
        assert by_alpha[alpha] == translator(params, sentences, alpha)
    assert by_alpha[0.0][-1] == ""  # a blank sentence still translates to ''
    assert by_alpha[0.0] != by_alpha[5.0]  # the length penalty changed some translations
    with pytest.raises(ValueError, match="at least one"):
        translator.with_alphas(params, sentences, [])


def test_a_short_batch_is_padded_to_a_power_of_two_rows_not_to_batch_size(monkeypatch):
    """Every row costs as much as a sentence in the search: 3 sentences at batch_size 16 run as 4 rows,
    with the same translations as when padded to all 16."""
    shapes = []
    real = evaluation.decoding.translate

    def recording(model, params, inputs, **kwargs):
        shapes.append(inputs.shape)  # runs only while JAX traces
        return real(model, params, inputs, **kwargs)

    monkeypatch.setattr(evaluation.decoding, "translate", recording)
    model, params = tiny_model()
    translator = evaluation.Translator(model, CharTokenizer(), beam_size=2, batch_size=16, max_input_length=32,
                                       max_extra_length=4)
    assert [translator.padded_rows(n) for n in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    assert evaluation.Translator(model, CharTokenizer(), batch_size=12).padded_rows(9) == 12  # capped
    sentences = ["abc", "hgfe", "da"]
    short = translator(params, sentences)
    assert [shape[0] for shape in shapes] == [4]
    monkeypatch.setattr(translator, "padded_rows", lambda rows: translator.batch_size)
    assert translator(params, sentences) == short
    assert [shape[0] for shape in shapes] == [4, 16]


def test_padded_rows_stay_a_multiple_of_the_batch_shards():
    model, _ = tiny_model()
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    translator = evaluation.Translator(model, CharTokenizer(), batch_size=24, sharding=rows)
    assert [translator.padded_rows(n) for n in (1, 3, 5, 9, 17, 24)] == [4, 4, 8, 16, 24, 24]
