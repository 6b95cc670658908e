"""WMT 2014 English->German, Transformer base (Vaswani et al. 2017, Table 3, row "base").

Expected result (paper, Table 2): 27.3 BLEU on newstest2014 (tokenized BLEU; sacreBLEU scores
detokenised output and typically reads ~0.5-1 lower), 100k steps on 8 P100 GPUs (12 hours).

    python -m experiments.train --config=experiments/configs/wmt14_ende_base.py --workdir=runs/wmt14_base
    python -m experiments.average --workdir=runs/wmt14_base --num_checkpoints=5
    python -m experiments.evaluate --workdir=runs/wmt14_base --split=test --checkpoint=averaged

Data: TFDS `wmt14_translate/de-en` (validation = newstest2013, test = newstest2014), downloaded
and prepared by TFDS into `config.data.data_dir` (e.g. a bucket via TFDS_DATA_DIR on TPU VMs).
"""

from experiments.configs import defaults


def get_config():
    config = defaults.base_config()
    config.objective = "translation"
    config.model = defaults.model_fields("base")  # 6+6 layers, d_model 512, d_ff 2048, 8 heads, dropout 0.1
    config.model.max_len = 256
    config.model.dtype = "bfloat16"  # compute dtype on accelerators; parameters stay float32

    # One shared source/target BPE vocabulary of ~37k tokens (paper, Sec. 5.1).
    defaults.real_translation_data(config, "wmt14_translate/de-en", source_lang="en", target_lang="de",
                                   vocab_size=37_000, tokenizer="bpe")
    config.data.batching = "bucket"
    config.data.tokens_per_batch = 25_000  # ~25k source + ~25k target tokens per batch (paper, Sec. 5.1)
    config.data.max_length = 256
    config.data.eval_batch_size = 256

    config.optimizer.schedule = "paper"  # d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)
    config.optimizer.learning_rate = 1.0  # the schedule's scale
    config.optimizer.warmup_steps = 4000
    config.label_smoothing = 0.1
    config.num_train_steps = 100_000
    config.log_every = 100
    config.eval_every = 2000
    config.bleu_every = 10_000
    config.decode.bleu_sentences = 500
    config.checkpoint.every = 2000  # the paper: every 10 minutes, ~1,500 steps; the last 5 averaged
    config.checkpoint.keep = 5

    config.decode.beam_size = 4  # paper, Sec. 6.1: beam 4, length penalty alpha 0.6
    config.decode.alpha = 0.6
    config.prng_impl = "unsafe_rbg"  # cheap dropout masks on accelerators
    return config
