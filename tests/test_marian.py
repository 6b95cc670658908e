"""Hugging Face MarianMT export and import: same logits, same greedy and beam outputs, round trips.

Everything runs offline: the Marian models are ours (exported) or built here with random weights
and a SentencePiece vocabulary trained here; nothing comes from the Hugging Face hub.
"""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
import torch  # noqa: E402  (the test extra installs torch, transformers and safetensors)
import transformers  # noqa: E402

from experiments.configs import multi30k as multi30k_config  # noqa: E402
from transformer import decoding, evaluation, inference, marian, models, training  # noqa: E402
from transformer.config import ModelConfig  # noqa: E402
from transformer.data import tokenizer as tokenizer_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_command(module, *flags, stdin=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", module, *flags], cwd=REPO, capture_output=True, text=True,
                            input=stdin, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def random_params(cfg: ModelConfig, seed=0):
    """Our params with every leaf random (biases and norms included), as numpy."""
    model = models.EncoderDecoder(cfg)
    x = jnp.ones((1, 4), jnp.int32)
    params = jax.tree.map(np.asarray, nn.meta.unbox(model.init(jax.random.PRNGKey(seed), x, x)["params"]))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: (p + 0.1 * rng.standard_normal(p.shape)).astype(np.float32), params)


def test_weights_round_trip_through_marian_names_exactly():
    cfg = ModelConfig.preset("tiny", vocab_size=40, attention_bias=True, activation="silu")
    params = random_params(cfg)
    weights = marian.to_marian_weights(params, cfg)
    assert weights["model.shared.weight"].shape == (40, 64)
    assert weights["model.decoder.layers.1.encoder_attn.q_proj.weight"].shape == (64, 64)
    assert weights["model.encoder.layers.0.fc1.weight"].shape == (128, 64)
    back = marian.from_marian_weights(weights, cfg)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    # The sinusoid channel order: Marian's sines first, ours at even channels.
    np.testing.assert_array_equal(weights["model.shared.weight"][:, :32], params["embedding"]["embedding"][:, 0::2])


def test_export_lists_every_mismatch_at_once():
    cfg = ModelConfig.preset("tiny", vocab_size=40, position="rope", norm_position="pre", activation="swiglu",
                             num_kv_heads=2, tie_output=False)
    with pytest.raises(marian.MarianError) as error:
        marian.check_exportable(cfg)
    message = str(error.value)
    for word in ("position='rope'", "norm_position='pre'", "activation='swiglu'", "num_kv_heads=2", "tie_output=False"):
        assert word in message
    with pytest.raises(marian.MarianError, match="objective 'lm'"):
        marian.check_exportable(ModelConfig.preset("tiny"), "lm")


def test_import_lists_every_mismatch_at_once():
    config = dict(model_type="marian", activation_function="gelu", scale_embedding=False, vocab_size=10,
                  decoder_vocab_size=12, d_model=8, encoder_attention_heads=2, decoder_attention_heads=4,
                  encoder_ffn_dim=16, decoder_ffn_dim=16, pad_token_id=58100, decoder_start_token_id=58100,
                  eos_token_id=0, share_encoder_decoder_embeddings=True)
    problems = marian.import_mismatches(config, {"final_logits_bias": np.ones((1, 10), np.float32)})
    text = "\n".join(problems)
    for word in ("activation_function='gelu'", "scale_embedding=False", "encoder_attention_heads=2",
                 "decoder_vocab_size=12", "pad_token_id=58100", "eos_token_id=0", "final_logits_bias"):
        assert word in text
    with pytest.raises(marian.MarianError):
        marian.model_config_from_marian(config)


# --- A Multi30k model trained here, exported -------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory, multi30k_dir):
    """(workdir, Marian directory) of a tiny float32 Multi30k model trained here (200 steps: it ends
    most sentences with EOS, so that greedy and beam outputs are real translations)."""
    root = tmp_path_factory.mktemp("marian_export")
    workdir, out = str(root / "run"), str(root / "marian")
    config = multi30k_config.get_config("hour")
    config.model.update(num_layers=2, d_model=32, d_ff=64, dtype="float32")
    config.data.update(manual_dir=multi30k_dir, data_dir=str(root / "tfds"), vocab_size=300, batch_size=32)
    config.update(num_train_steps=200, max_train_minutes=0.0, eval_every=200, log_every=50)
    config.optimizer.warmup_steps = 10
    config.checkpoint.update(every=200, keep=1)
    training.train_and_evaluate(config, workdir)
    result = run_command("experiments.export", f"--workdir={workdir}", "--format=marian", f"--out={out}")
    assert "Wrote a MarianMT model" in result.stdout
    return workdir, out


@pytest.fixture(scope="module")
def loaded(exported):
    workdir, out = exported
    run, trainer, params, tokenizer, _ = inference.load_for_inference(workdir)
    hf = transformers.MarianMTModel.from_pretrained(out).eval()
    hf_tokenizer = transformers.MarianTokenizer.from_pretrained(out)
    return run, trainer, params, tokenizer, hf, hf_tokenizer


@pytest.mark.slow
def test_exported_logits_and_tokenizer_equal_ours(loaded, read_lines):
    run, trainer, params, tokenizer, hf, hf_tokenizer = loaded
    sources, targets = read_lines("val.en.gz", 12), read_lines("val.de.gz", 12)
    batch = hf_tokenizer(sources, text_target=targets, return_tensors="pt", padding=True)
    theirs_ids = [[int(i) for i in row if i != 0] for row in batch["input_ids"]]
    assert theirs_ids == [tokenizer.encode(s) + [1] for s in sources]
    labels = batch["labels"].numpy()
    labels[labels < 0] = 0
    with torch.no_grad():
        theirs = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    decoder_input_ids=torch.tensor(np.asarray(models.shift_right(jnp.asarray(labels))))).logits.numpy()
    ours = np.asarray(trainer.model.apply({"params": params}, jnp.asarray(batch["input_ids"].numpy()),
                                          jnp.asarray(labels)))
    real = labels != 0
    assert np.abs(ours - theirs)[real].max() < 1e-4


def hf_generate(hf, hf_tokenizer, sentences, **kwargs):
    """One batch, cut at the length ours cuts it (the padded input length + 50), EOS not forced there."""
    batch = hf_tokenizer(sentences, return_tensors="pt", padding=True)
    max_new_tokens = -(-batch["input_ids"].shape[1] // evaluation.LENGTH_MULTIPLE) * evaluation.LENGTH_MULTIPLE + 50
    with torch.no_grad():
        out = hf.generate(**batch, max_new_tokens=max_new_tokens, forced_eos_token_id=None, **kwargs)
    return [hf_tokenizer.decode(row, skip_special_tokens=True) for row in out]


@pytest.mark.slow
def test_greedy_and_beam_search_match_hugging_face_generate(loaded, read_lines):
    run, trainer, params, tokenizer, hf, hf_tokenizer = loaded
    sources, references = read_lines("test_2016_flickr.en.gz", 24), read_lines("test_2016_flickr.de.gz", 24)
    ours_greedy = evaluation.Translator(trainer.model, tokenizer, beam_size=1, batch_size=24)(params, sources)
    theirs_greedy = hf_generate(hf, hf_tokenizer, sources, num_beams=1, do_sample=False)
    assert ours_greedy == theirs_greedy
    ours_beam = evaluation.Translator(trainer.model, tokenizer, beam_size=4, alpha=1.0, length_penalty="power",
                                      batch_size=24)(params, sources)
    theirs_beam = hf_generate(hf, hf_tokenizer, sources, num_beams=4, length_penalty=1.0, early_stopping="never",
                              do_sample=False)
    assert sum(a == b for a, b in zip(ours_beam, theirs_beam)) >= 22
    assert abs(evaluation.bleu(ours_beam, references)[0] - evaluation.bleu(theirs_beam, references)[0]) <= 0.1 + 1e-9


def test_power_length_penalty_is_length_to_the_alpha():
    np.testing.assert_allclose(decoding.length_penalty(jnp.array([1.0, 4.0, 9.0]), 0.5, "power"), [1, 2, 3])
    np.testing.assert_allclose(decoding.length_penalty(7.0, 1.0, "gnmt"), 2.0)
    with pytest.raises(ValueError, match="length penalty form"):
        decoding.length_penalty(3, 1.0, "linear")


# --- A random Marian model built here, imported, exported back -------------------------------------------------


def make_random_marian(directory, texts):
    """A tiny MarianMTModel with random weights (biases, norms, positions as Marian's) and its tokenizer."""
    tokenizer = tokenizer_lib.train_tokenizer(texts, 200)
    config = transformers.MarianConfig(
        vocab_size=tokenizer.vocab_size, decoder_vocab_size=tokenizer.vocab_size, d_model=32, encoder_layers=2,
        decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
        decoder_ffn_dim=48, activation_function="swish", max_position_embeddings=128, scale_embedding=True,
        pad_token_id=0, decoder_start_token_id=0, eos_token_id=1, forced_eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.MarianMTModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" not in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    marian.write_tokenizer_files(tokenizer.serialized_model(), tokenizer.pieces(range(tokenizer.vocab_size)),
                                 directory)
    return model, tokenizer


def marian_logits(model, inputs, decoder_inputs):
    with torch.no_grad():
        return model(input_ids=torch.tensor(inputs), attention_mask=torch.tensor(inputs != 0),
                     decoder_input_ids=torch.tensor(decoder_inputs)).logits.numpy()


def test_import_then_export_round_trip_keeps_the_logits(tmp_path, read_lines):
    source_dir, workdir, back_dir = str(tmp_path / "hf"), str(tmp_path / "imported"), str(tmp_path / "back")
    texts = read_lines("train.en.gz", 2000) + read_lines("train.de.gz", 2000)
    original, tokenizer = make_random_marian(source_dir, texts)
    hf_ids = transformers.MarianTokenizer.from_pretrained(source_dir)("A dog.")["input_ids"]
    assert hf_ids == tokenizer.encode("A dog.") + [1]

    result = run_command("experiments.import_checkpoint", "--format=marian", f"--from={source_dir}",
                         f"--workdir={workdir}", "--config.model.dtype=float32")
    assert "as step 0" in result.stdout
    run, trainer, params, _, step = inference.load_for_inference(workdir)
    assert step == 0 and run.model.attention_bias and run.model.norm_epsilon == 1e-5 and run.model.activation == "silu"

    sentences = read_lines("val.en.gz", 6)
    rows = [tokenizer.encode(s) + [1] for s in sentences]
    inputs = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for r, ids in enumerate(rows):
        inputs[r, :len(ids)] = ids
    targets = np.roll(inputs, 1, axis=1)  # any decoder inputs will do
    decoder_inputs = np.asarray(models.shift_right(jnp.asarray(targets)))
    theirs = marian_logits(original, inputs, decoder_inputs)
    ours = np.asarray(trainer.model.apply({"params": params}, jnp.asarray(inputs), jnp.asarray(targets)))
    assert np.abs(ours - theirs).max() < 1e-4

    run_command("experiments.export", f"--workdir={workdir}", "--format=marian", f"--out={back_dir}")
    again = transformers.MarianMTModel.from_pretrained(back_dir).eval()
    assert np.abs(marian_logits(again, inputs, decoder_inputs) - theirs).max() < 1e-4
    with open(os.path.join(back_dir, "config.json")) as f:
        assert json.load(f)["activation_function"] == "swish"


def test_import_refuses_a_workdir_with_checkpoints(tmp_path, read_lines):
    source_dir = str(tmp_path / "hf")
    make_random_marian(source_dir, read_lines("train.en.gz", 500))
    os.makedirs(tmp_path / "wd" / "checkpoints" / "5")
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        marian.import_workdir(source_dir, str(tmp_path / "wd"), multi30k_config.get_config("hour"))


@pytest.mark.slow
def test_an_imported_workdir_fine_tunes_and_translates(tmp_path, multi30k_dir, read_lines):
    source_dir, workdir = str(tmp_path / "hf"), str(tmp_path / "imported")
    make_random_marian(source_dir, read_lines("train.en.gz", 2000) + read_lines("train.de.gz", 2000))
    run_command("experiments.import_checkpoint", "--format=marian", f"--from={source_dir}", f"--workdir={workdir}",
                f"--config.data.manual_dir={multi30k_dir}", f"--config.data.data_dir={tmp_path / 'tfds'}")
    run_command("experiments.train", f"--config=experiments/configs/workdir.py:{workdir}", f"--workdir={workdir}",
                "--config.num_train_steps=4", "--config.checkpoint.every=4", "--config.optimizer.warmup_steps=2",
                "--config.max_train_minutes=0", "--config.data.batch_size=8", "--config.eval_every=4")
    _, _, _, _, step = inference.load_for_inference(workdir)
    assert step == 4
    result = run_command("experiments.translate", f"--workdir={workdir}", "--beam_size=2", stdin="A dog runs.\n")
    assert len(result.stdout.splitlines()) == 1
