"""Character-level language modelling on Multi30k's English text: a plain decoder vs Transformer-XL.

All 29,000 training descriptions, in file order and eos-separated, form one stream of ~1.8M
characters (a SentencePiece "char" vocabulary: one id per character, ~80 ids); the validation
descriptions form the held-out stream. Both are read as 16 parallel streams of consecutive
64-character segments (`transformer.data.stream`, Transformer-XL's batchify), and evaluated segment
by segment; the metric is bits per character (`eval/bits_per_token`).

Two variants (`--config=experiments/configs/multi30k_char_lm.py:VARIANT`) with the same model,
segment length, batch and number of updates:
  * `plain`: each segment is read on its own (context: the characters of the segment so far);
  * `xl` (Dai et al. 2019): each layer also attends to its own inputs over the previous 64
    characters (a memory carried from step to step, stop-gradient), in training and evaluation.
    Through the layers the effective context reaches back further than the memory (each layer's
    memory holds states that themselves saw the segment before). Its attention reads 128 keys
    instead of 64: ~8% more FLOPs per step at this size.
NOTE: the evaluation memory stays at the training one. With RoPE, distances never seen in training
do not extrapolate: on the `xl` model after 2,000 steps, eval memory 0 / 64 / 128 / 192 gave
1.73 / 1.60 / 1.86 / 3.02 bits per character (`experiments.evaluate_lm --eval_memory_length=...`).
A longer evaluation memory needs a position scheme that saturates, e.g. position="relative".
Sized for ~10 minutes of training per variant on 2 CPU cores (a 12-minute budget stops it early on
a slower machine).

    python -m experiments.train --config=experiments/configs/multi30k_char_lm.py:xl \
        --workdir=runs/char_lm_xl --config.data.manual_dir=../shared/data/multi30k
"""

from experiments.configs import defaults

VARIANTS = ("plain", "xl")
SEGMENT = 64  # characters per segment (T), both variants


def get_config(variant: str = "xl"):
    if variant not in VARIANTS:
        raise ValueError(f"Unknown multi30k_char_lm variant {variant!r}: use one of {', '.join(VARIANTS)}.")
    config = defaults.base_config()
    config.objective = "lm"

    config.model = defaults.model_fields("tiny")
    # Relative positions (RoPE) in both variants: the memory needs them, and the plain baseline
    # should differ in the memory only.
    config.model.update(d_model=128, d_ff=512, num_heads=4, num_decoder_layers=4, dropout_rate=0.1,
                        position="rope", norm_position="pre", max_len=SEGMENT)
    if variant == "xl":
        config.model.memory_length = SEGMENT  # training memory = segment length, as in the paper
        config.eval_memory_length = SEGMENT  # RoPE does not extrapolate to unseen distances (see above)

    # `manual_dir` is where train/val.{en,de}.gz are (unset = download).
    config.data.update(name="multi30k", text_feature="en", train_split="train", eval_split="validation",
                       tokenizer="char", vocab_size=256, batching="stream", batch_size=16, eval_batch_size=16,
                       max_length=SEGMENT)

    config.label_smoothing = 0.0  # the training loss is then the cross entropy that bits per character report
    config.optimizer.schedule = "cosine"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.warmup_steps = 200
    config.optimizer.clip_grad_norm = 1.0
    config.num_train_steps = 2000  # ~2M characters, ~1.2 epochs
    config.max_train_minutes = 12.0
    config.log_every = 50
    config.eval_every = 500
    config.checkpoint.every = 500
    config.checkpoint.keep = 2
    return config
