"""Batches from real Multi30k text: packing, budgets, determinism, resume, host shards, device prefetch."""

import collections
import itertools
import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from transformer import data

MAX_LENGTH = 32


@pytest.fixture(scope="module")
def examples(train_examples):
    return train_examples(1500)


@pytest.fixture(scope="module")
def tok(examples, tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("vocab") / "spm")
    return data.load_or_train_tokenizer(prefix, texts=lambda: data.translation_texts(examples), vocab_size=500)


@pytest.fixture(scope="module")
def encoded(examples, tok):
    """Counter of (inputs, targets) id tuples, eos included, of the examples that fit MAX_LENGTH."""
    pairs = [(tuple(tok.encode(e["source"]) + [1]), tuple(tok.encode(e["target"]) + [1])) for e in examples]
    return collections.Counter(p for p in pairs if max(map(len, p)) <= MAX_LENGTH)


KWARGS = {"pad": dict(batch_size=16), "bucket": dict(tokens_per_batch=512), "pack": dict(batch_size=8)}


def batches(examples, tok, batching, **kwargs):
    kwargs = {"max_length": MAX_LENGTH, "seed": 0, **KWARGS[batching], **kwargs}
    return data.translation_batches(examples, tok, batching=batching, **kwargs)


def segments(tokens, segment_ids) -> list[tuple]:
    """The token sequences of a packed [B, L] batch, one per (row, segment)."""
    return [tuple(row[ids == s]) for row, ids in zip(tokens, segment_ids) for s in range(1, ids.max() + 1)]


def unpadded_pairs(batch) -> list[tuple]:
    if "inputs_segment_ids" in batch:
        return list(zip(segments(batch["inputs"], batch["inputs_segment_ids"]),
                        segments(batch["targets"], batch["targets_segment_ids"])))
    return [(tuple(i[i > 0]), tuple(t[t > 0])) for i, t in zip(batch["inputs"], batch["targets"]) if t.any()]


def epoch_pairs(iterator) -> collections.Counter:
    return collections.Counter(p for batch in iterator for p in unpadded_pairs(batch))


@pytest.mark.parametrize("batching", ["bucket", "pack"])
def test_one_epoch_loses_and_duplicates_no_example(examples, tok, encoded, batching):
    assert epoch_pairs(batches(examples, tok, batching, num_epochs=1, drop_remainder=False)) == encoded


def test_pad_batches_have_one_shape_and_eos_terminated_rows(examples, tok, encoded):
    it = batches(examples, tok, "pad", num_epochs=1, drop_remainder=False)
    all_batches = list(it)
    assert {b["inputs"].shape for b in all_batches[:-1]} == {(16, MAX_LENGTH)}
    for b in all_batches:
        for key in ("inputs", "targets"):
            assert b[key].dtype == np.int32
            lengths = (b[key] > 0).sum(axis=1)
            np.testing.assert_array_equal(b[key][np.arange(len(lengths)), lengths - 1], 1)  # eos last
    assert collections.Counter(p for b in all_batches for p in unpadded_pairs(b)) == encoded


def test_packed_segment_ids_and_positions(examples, tok):
    for batch in itertools.islice(batches(examples, tok, "pack"), 5):
        assert set(batch) == {"inputs", "targets", "inputs_segment_ids", "inputs_positions",
                              "targets_segment_ids", "targets_positions"}
        for key in ("inputs", "targets"):
            tokens, ids, positions = batch[key], batch[f"{key}_segment_ids"], batch[f"{key}_positions"]
            assert tokens.shape == ids.shape == positions.shape == (8, MAX_LENGTH)
            np.testing.assert_array_equal(ids > 0, tokens > 0)  # segments cover exactly the real tokens
            np.testing.assert_array_equal(positions[ids == 0], 0)
            for row_ids, row_pos in zip(ids, positions):
                real = row_ids[row_ids > 0]
                assert real[0] == 1 and set(np.diff(real)) <= {0, 1}  # numbered 1, 2, ... in order
                for s in range(1, real.max() + 1):
                    np.testing.assert_array_equal(row_pos[row_ids == s], np.arange((row_ids == s).sum()))
        # Each input segment's translation sits in the target segment with the same id.
        assert (batch["inputs_segment_ids"].max(axis=1) == batch["targets_segment_ids"].max(axis=1)).all()


def test_bucket_batches_respect_token_budget_with_few_shapes(examples, tok):
    shapes = set()
    for batch in batches(examples, tok, "bucket", num_epochs=2):
        rows, length = batch["inputs"].shape
        shapes.add((rows, length))
        assert batch["targets"].shape == (rows, length) and rows % 8 == 0
        assert rows * length <= 512
        assert (batch["inputs"] > 0).sum() <= 512 and (batch["targets"] > 0).sum() <= 512
    assert len(shapes) <= len(data.bucket_boundaries(MAX_LENGTH))


@pytest.mark.parametrize("batching", ["pad", "bucket", "pack"])
def test_same_seed_same_batches_other_seed_other_batches(examples, tok, batching):
    def first(seed):
        return list(itertools.islice(batches(examples, tok, batching, seed=seed), 6))

    a, b, c = first(0), first(0), first(1)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    assert any(x["inputs"].shape != z["inputs"].shape or not np.array_equal(x["inputs"], z["inputs"])
               for x, z in zip(a, c))


def assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("batching", ["bucket", "pack"])
def test_in_memory_and_streamed_sources_give_the_same_batches_and_states(examples, tok, batching):
    # 1500 examples: the default tokenises them once into memory; in_memory_examples=0 streams them.
    # 250 batches of 8 packed rows go past the first epoch; a state from either resumes the other.
    streamed, in_memory = (batches(examples, tok, batching, in_memory_examples=n) for n in (0, 10_000))
    assert_same_batches(list(itertools.islice(streamed, 250)), list(itertools.islice(in_memory, 250)))
    assert streamed.get_state() == in_memory.get_state()
    resumed = batches(examples, tok, batching)
    resumed.set_state(json.loads(json.dumps(streamed.get_state())))
    assert_same_batches(list(itertools.islice(resumed, 5)), list(itertools.islice(streamed, 5)))


# k batches in before saving: mid-window and, with 1500 examples, across an epoch boundary.
@pytest.mark.parametrize("batching, k", [("pad", 7), ("pad", 100), ("bucket", 5), ("bucket", 60), ("pack", 3),
                                         ("pack", 40)])
def test_resume_continues_with_next_unseen_batch(examples, tok, batching, k):
    uninterrupted = list(itertools.islice(batches(examples, tok, batching), k + 8))
    it = batches(examples, tok, batching)
    list(itertools.islice(it, k))
    state = json.loads(json.dumps(it.get_state()))  # as the trainer's checkpoint stores it
    resumed = batches(examples, tok, batching)
    resumed.set_state(state)
    assert_same_batches(list(itertools.islice(resumed, 8)), uninterrupted[k:])


@pytest.mark.parametrize("batching", ["pad", "bucket"])
def test_two_hosts_read_disjoint_shards_that_cover_the_data(examples, tok, encoded, batching):
    kwargs = {"drop_remainder": False} if batching == "pad" else {}
    shards = [epoch_pairs(batches(examples, tok, batching, num_epochs=1, process_index=i, process_count=2, **kwargs))
              for i in range(2)]
    assert shards[0] + shards[1] == encoded
    # Disjoint as positions of the data set: shard i holds exactly examples i, i + 2, i + 4, ...
    for i in range(2):
        mine = collections.Counter(
            (tuple(tok.encode(e["source"]) + [1]), tuple(tok.encode(e["target"]) + [1])) for e in examples[i::2])
        assert shards[i] == collections.Counter({p: n for p, n in mine.items() if p in encoded})


def test_truncate_keeps_every_example_within_max_length(examples, tok):
    kept = sum(epoch_pairs(batches(examples, tok, "pad", num_epochs=1, drop_remainder=False, max_length=12,
                                   truncate=True)).values())
    assert kept == len(examples)
    filtered = epoch_pairs(batches(examples, tok, "pad", num_epochs=1, drop_remainder=False, max_length=12))
    assert sum(filtered.values()) < len(examples)


def test_lm_batches_pack_targets_only(examples, tok):
    texts = [e["target"] for e in examples]
    it = data.lm_batches(texts, tok, batching="pack", batch_size=4, max_length=MAX_LENGTH, num_epochs=1,
                         drop_remainder=False)
    all_batches = list(it)
    assert set(all_batches[0]) == {"targets", "targets_segment_ids", "targets_positions"}
    got = collections.Counter(s for b in all_batches for s in segments(b["targets"], b["targets_segment_ids"]))
    want = collections.Counter(tuple(tok.encode(t) + [1]) for t in texts)
    assert got == collections.Counter({s: n for s, n in want.items() if len(s) <= MAX_LENGTH})


def test_device_prefetch_checkpoints_the_last_returned_batch(examples, tok):
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
    reference = list(itertools.islice(batches(examples, tok, "pack"), 6))
    it = data.prefetch_to_device(batches(examples, tok, "pack"), size=3, sharding=sharding)
    first = list(itertools.islice(it, 2))
    assert isinstance(first[0]["inputs"], jax.Array) and first[0]["inputs"].sharding == sharding
    state = it.get_state()  # batches 3-5 already sit on the devices: they must not count as seen
    resumed = data.prefetch_to_device(batches(examples, tok, "pack"), size=3, sharding=sharding)
    resumed.set_state(state)
    assert_same_batches([jax.tree.map(np.asarray, b) for b in itertools.islice(resumed, 4)], reference[2:])


def test_bad_arguments_are_clear_errors(examples, tok):
    with pytest.raises(ValueError, match="batching='bucket' needs tokens_per_batch"):
        data.translation_batches(examples, tok, batching="bucket")
    with pytest.raises(ValueError, match="use one of"):
        data.translation_batches(examples, tok, batching="sorted", batch_size=4)
    with pytest.raises(ValueError, match="process_index=2 is not in"):
        data.translation_batches(examples, tok, batching="pad", batch_size=4, process_index=2, process_count=2)
