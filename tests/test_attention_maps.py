"""Attention maps: the sown weights against the reference math, their masking, and the report end to end.

The report tests use untrained runs (a checkpoint of the initial parameters) of the copy task, the
synthetic LM and the synthetic MLM: attention maps need a checkpoint, not a trained one. The page
is opened in headless Chromium, which CI installs (.ci/run); elsewhere its test skips without it.
"""

import functools
import html
import json
import os
import re
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import transformer as tfm
from experiments.configs import copy as copy_config
from experiments.configs import lm_synthetic, mlm_synthetic
from transformer import attention, attention_maps, checkpointing, decoding, inference, sharding, training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**overrides):
    return tfm.ModelConfig.preset("tiny", vocab_size=32, dropout_rate=0.0, **overrides)


# ---------------------------------------------------------------------------------------------
# The weights.


def softmax_weights(q, k, mask, bias):
    """NumPy: softmax over unmasked keys of q [B, T, N, H] . k [B, S, K, H] + bias -> [B, N, T, S]; 0 where masked."""
    groups = q.shape[2] // k.shape[2]
    k = np.repeat(k, groups, axis=2)  # [B, S, N, H]
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1]) + bias
    mask = np.broadcast_to(mask, logits.shape)
    logits = np.where(mask, logits, -np.inf)
    top = np.max(logits, axis=-1, keepdims=True)
    e = np.where(mask, np.exp(logits - np.where(np.isfinite(top), top, 0.0)), 0.0)
    total = e.sum(axis=-1, keepdims=True)
    return e / np.where(total > 0, total, 1.0)


@pytest.mark.parametrize("implementation", ["reference", "fused", "chunked"])
def test_sown_weights_are_the_reference_math_on_the_module_parameters(implementation):
    batch, q_len, kv_len, d_model, num_heads, num_kv_heads, head_dim = 2, 5, 6, 16, 4, 2, 8
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, q_len, d_model)).astype(np.float32)
    kv = rng.normal(size=(batch, kv_len, d_model)).astype(np.float32)
    mask = rng.random((batch, 1, q_len, kv_len)) > 0.3
    mask[:, :, :, -2:] = False  # two padded keys
    mask[1, 0, 3, :] = False  # a query with no key at all
    bias = rng.normal(size=(batch, num_heads, q_len, kv_len)).astype(np.float32)
    module = attention.MultiHeadAttention(num_heads=num_heads, head_dim=head_dim, num_kv_heads=num_kv_heads,
                                          use_bias=True, implementation=implementation, chunk_size=4)
    params = nn.meta.unbox(module.init(jax.random.key(0), x, kv, mask=mask, bias=bias)["params"])
    params = jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape).astype(np.float32), params)  # biases != 0

    out, variables = module.apply({"params": params}, x, kv, mask=mask, bias=bias, mutable=["intermediates"])
    (weights,) = variables["intermediates"]["attention_weights"]
    assert weights.shape == (batch, num_heads, q_len, kv_len) and weights.dtype == jnp.float32

    p = jax.tree.map(np.asarray, params)
    q = np.einsum("btd,dnh->btnh", x, p["query"]) + p["query_bias"]
    k = np.einsum("bsd,dkh->bskh", kv, p["key"]) + p["key_bias"]
    v = np.einsum("bsd,dkh->bskh", kv, p["value"]) + p["value_bias"]
    expected = softmax_weights(q, k, mask, bias)
    np.testing.assert_allclose(weights, expected, atol=1e-5, rtol=1e-5)
    assert not np.any(np.asarray(weights)[:, :, :, -2:]) and not np.any(np.asarray(weights)[1, :, 3])
    # They are the weights the kernel used: weights . V, projected, is the module's output.
    v = np.repeat(v, num_heads // num_kv_heads, axis=2)
    recombined = np.einsum("bnts,bsnh,nhd->btd", np.asarray(weights), v, p["out"]) + p["out_bias"]
    np.testing.assert_allclose(out, recombined, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(out, module.apply({"params": params}, x, kv, mask=mask, bias=bias))


@pytest.mark.parametrize("overrides", [dict(), dict(scan_layers=True, num_kv_heads=2, position="relative")],
                         ids=["layers", "scanned-gqa-relative"])
def test_weights_sum_to_one_over_unmasked_keys_and_are_zero_on_padding(overrides):
    model = tfm.EncoderDecoder(tiny(**overrides))
    inputs = jnp.array([[5, 6, 7, 8, 1, 0, 0], [9, 10, 1, 0, 0, 0, 0]])  # padded sources
    targets = jnp.array([[3, 4, 5, 1, 0], [6, 1, 0, 0, 0]])  # padded targets
    params = jax.jit(model.init)(jax.random.key(0), inputs, targets)["params"]
    weights = jax.jit(lambda p: attention_maps.collect(model, p, inputs, targets))(params)
    weights = {k: np.asarray(w) for k, w in weights.items()}
    assert set(weights) == {"encoder", "decoder", "cross"}
    layers, heads = 2, 4
    assert weights["encoder"].shape == (layers, 2, heads, 7, 7)
    assert weights["decoder"].shape == (layers, 2, heads, 5, 5)
    assert weights["cross"].shape == (layers, 2, heads, 5, 7)
    source_real = np.asarray(inputs != 0)  # [B, S]

    encoder = weights["encoder"]  # real queries attend to real keys only; padding queries to nothing
    for b in range(2):
        real = source_real[b]
        np.testing.assert_allclose(encoder[:, b][:, :, real].sum(-1), 1.0, atol=1e-5)
        assert not np.any(encoder[:, b][..., ~real]) and not np.any(encoder[:, b][:, :, ~real])
    cross = weights["cross"]  # every target position attends to the real source tokens only
    np.testing.assert_allclose(cross.sum(-1), 1.0, atol=1e-5)
    assert not np.any(cross * ~source_real[None, :, None, None, :])
    decoder = weights["decoder"]  # causal: nothing on later positions, so nothing on the padding after the text
    np.testing.assert_allclose(decoder.sum(-1), 1.0, atol=1e-5)
    assert not np.any(np.triu(np.ones((5, 5), bool), k=1) * decoder)


def test_cached_decoding_sows_the_rows_of_the_full_forward_pass():
    model = tfm.DecoderOnly(tiny(num_decoder_layers=1))
    targets = jnp.array([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    params = jax.jit(model.init)(jax.random.key(0), targets)["params"]
    full = np.asarray(jax.jit(functools.partial(attention_maps.collect, model))(params, targets)["decoder"])

    @jax.jit
    def step(cache, token):  # one cached step -> (cache, its decoder weights [L, B, N, 1, S])
        _, variables = model.apply({"params": params, "cache": cache}, token, decode=True, method=model.decode,
                                   mutable=["cache", "intermediates"])
        return variables["cache"], attention_maps.by_kind(variables["intermediates"])["decoder"]

    decoder_inputs = tfm.shift_right(targets)
    cache = decoding.init_cache(model, params, 5, 2)
    for t in range(5):
        cache, row = step(cache, decoder_inputs[:, t:t + 1])
        np.testing.assert_allclose(row[:, :, :, 0], full[:, :, :, t], atol=1e-5)  # [L, B, N, T, T] row t


# ---------------------------------------------------------------------------------------------
# The report of a run.


def untrained_run(path, config):
    """A workdir holding `config` and its initial parameters as the step-1 checkpoint."""
    config.model.num_layers = 1
    trainer = training.Trainer(config, training.model_config(config, config.data.vocab_size),
                               sharding.make_mesh(data=-1))
    checkpoints = checkpointing.Checkpointer(os.path.join(path, "checkpoints"), async_save=False)
    checkpoints.save(1, trainer.init_state(0))
    checkpoints.close()
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    return str(path)


@pytest.fixture(scope="module")
def copy_run(tmp_path_factory):
    return untrained_run(tmp_path_factory.mktemp("copy"), copy_config.get_config())


@pytest.fixture(scope="module")
def copy_report(copy_run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("maps"))
    run, trainer, params, tokenizer, _ = inference.load_for_inference(copy_run)
    page = attention_maps.write_report(run, trainer, params, tokenizer, [5, 6, 7, 8], out, max_extra_length=4)
    return page


def page_images(page):
    with open(page, encoding="utf-8") as f:
        sources = re.findall(r'<img src="([^"]+)"', f.read())
    return [os.path.join(os.path.dirname(page), html.unescape(s)) for s in sources]


def assert_pictures(paths):
    import matplotlib.image  # noqa: PLC0415

    for path in paths:
        pixels = matplotlib.image.imread(path)  # decodes the PNG
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100, (path, pixels.shape)
        assert pixels[..., :3].std() > 0.05, f"{path} is blank"


def test_a_translation_report_shows_every_layer_kind_and_the_alignment(copy_report):
    names = [os.path.basename(p) for p in page_images(copy_report)]
    assert names == ["alignment.png", "encoder_layer0.png", "decoder_layer0.png", "cross_layer0.png"]
    assert_pictures(page_images(copy_report))
    text = open(copy_report, encoding="utf-8").read()
    assert "<p>Source: 5 6 7 8 &lt;/s&gt;</p>" in text and "Translation (greedy)" in text


@pytest.mark.parametrize("module, kind", [(lm_synthetic, "decoder"), (mlm_synthetic, "encoder")], ids=["lm", "mlm"])
def test_language_model_reports_show_their_self_attention(tmp_path, module, kind):
    workdir = untrained_run(tmp_path / "run", module.get_config())
    run, trainer, params, tokenizer, _ = inference.load_for_inference(workdir)
    mask = trainer.mask_id
    page = attention_maps.write_report(run, trainer, params, tokenizer, [3, 4, mask, 5], str(tmp_path / "maps"))
    images = page_images(page)
    assert [os.path.basename(p) for p in images] == [f"{kind}_layer0.png"]
    assert_pictures(images)
    text = open(page, encoding="utf-8").read()
    # An LM has no [MASK]: its last id is text.
    expected = f"&lt;s&gt; 3 4 {mask} 5" if kind == "decoder" else "3 4 [MASK] 5 &lt;/s&gt;"
    assert f"<p>Tokens: {expected}</p>" in text, text


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it (apt-get install chromium).", pytrace=False)
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    return path


LOAD_CHECK = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  document.body.dataset.loaded = images.filter(i => i.complete && i.naturalWidth > 0).length + "/" + images.length;
  document.body.dataset.rects = JSON.stringify(images.map(i => {
    const r = i.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; }));
});
</script>
"""


def test_the_page_shows_every_image_in_headless_chromium(copy_report, tmp_path):
    browser = chromium()
    width, height = 1280, 2400
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--force-device-scale-factor=1", f"--window-size={width},{height}", f"--user-data-dir={tmp_path / 'p'}"]
    # The page, plus a script that reports which images loaded and where they are.
    checked = os.path.join(os.path.dirname(copy_report), "checked.html")
    with open(copy_report, encoding="utf-8") as f:
        page = f.read()
    with open(checked, "w", encoding="utf-8") as f:
        f.write(page.replace("</body>", LOAD_CHECK + "</body>"))
    dom = subprocess.run(flags + ["--virtual-time-budget=10000", "--dump-dom", f"file://{checked}"],
                         capture_output=True, text=True, timeout=120)
    loaded = re.search(r'data-loaded="([^"]*)"', dom.stdout)
    rects = re.search(r'data-rects="([^"]*)"', dom.stdout)
    assert loaded and rects, dom.stdout[-2000:] + dom.stderr[-2000:]
    assert loaded.group(1) == "4/4", loaded.group(1)

    screenshot = tmp_path / "page.png"
    shot = subprocess.run(flags + [f"--screenshot={screenshot}", f"file://{copy_report}"], capture_output=True,
                          text=True, timeout=120)
    assert screenshot.exists(), shot.stderr[-2000:]
    import matplotlib.image  # noqa: PLC0415

    pixels = matplotlib.image.imread(str(screenshot))[..., :3]  # [H, W, 3] in [0, 1]
    assert pixels.shape[:2] == (height, width)
    for left, top, w, h in json.loads(html.unescape(rects.group(1))):
        assert w > 100 and h > 100 and top + h <= height, (left, top, w, h)
        region = pixels[int(top) + 2:int(top + h) - 2, int(left) + 2:int(left + w) - 2]
        # A heatmap, not the white page: a good share of coloured (viridis) pixels.
        coloured = (region.max(-1) - region.min(-1)) > 0.2
        assert coloured.mean() > 0.05, (left, top, w, h, coloured.mean())
    assert (pixels.min(-1) > 0.95).mean() < 0.95, "the screenshot is blank"


def run_attention(*flags):
    return subprocess.run([sys.executable, "-m", "experiments.attention", *flags], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_attention_command_writes_the_page_and_refuses_text_without_a_tokenizer(copy_run, tmp_path):
    result = run_attention(f"--workdir={copy_run}", "--tokens=5,6,7", f"--out={tmp_path / 'maps'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith(os.path.join(str(tmp_path / "maps"), "index.html"))
    assert_pictures(page_images(str(tmp_path / "maps" / "index.html")))
    result = run_attention(f"--workdir={copy_run}", "--text=A man rides a bike.")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "this run has no tokenizer (synthetic data)" in result.stderr and "--tokens=5,9,12" in result.stderr
