"""Masks: exact expected arrays on small cases, for each kind and their combination."""

import numpy as np
import pytest

from transformer import masking

T, F = True, False


def test_padding_mask():
    mask = masking.padding_mask(np.array([[T, T, F]]), np.array([[T, F, F]]))
    assert mask.shape == (1, 1, 3, 3)
    np.testing.assert_array_equal(mask[0, 0], [[T, F, F], [T, F, F], [F, F, F]])


def test_causal_mask():
    mask = masking.causal_mask(np.arange(3), np.arange(3))
    assert mask.shape == (1, 1, 3, 3)
    np.testing.assert_array_equal(mask[0, 0], [[T, F, F], [T, T, F], [T, T, T]])


def test_causal_mask_for_a_decoding_step():
    # Query at step 2 against a 4-slot cache: sees slots 0..2.
    mask = masking.causal_mask(np.array([2]), np.arange(4))
    np.testing.assert_array_equal(mask[0, 0], [[T, T, T, F]])


def test_segment_mask():
    segments = np.array([[1, 1, 2, 0]])
    mask = masking.segment_mask(segments, segments)
    np.testing.assert_array_equal(
        mask[0, 0], [[T, T, F, F], [T, T, F, F], [F, F, T, F], [F, F, F, T]])


def test_sliding_window_mask():
    mask = masking.sliding_window_mask(np.arange(4), np.arange(4), window=2)
    np.testing.assert_array_equal(
        mask[0, 0], [[T, T, F, F], [T, T, T, F], [F, T, T, T], [F, F, T, T]])


def test_combined_masks():
    index = np.arange(4)
    segments = np.array([[1, 1, 1, 2]])
    valid = np.array([[T, T, T, T]])
    mask = masking.combine_masks(
        masking.padding_mask(valid, valid), masking.causal_mask(index, index),
        masking.segment_mask(segments, segments), masking.sliding_window_mask(index, index, 2), None)
    assert mask.shape == (1, 1, 4, 4)
    np.testing.assert_array_equal(
        mask[0, 0], [[T, F, F, F], [T, T, F, F], [F, T, T, F], [F, F, F, T]])


def test_combine_masks_of_nothing_is_none():
    assert masking.combine_masks(None, None) is None


def test_batched_causal_indices():
    mask = masking.causal_mask(np.array([[0, 1], [1, 2]]), np.array([[0, 1, 2], [0, 1, 2]]))
    assert mask.shape == (2, 1, 2, 3)
    np.testing.assert_array_equal(mask[1, 0], [[T, T, F], [T, T, T]])


def test_dilated_sliding_window_mask():
    # Window 2, dilation 2: each query sees itself and the keys 2 away on either side.
    mask = masking.sliding_window_mask(np.arange(5), np.arange(5), window=2, dilation=2)
    np.testing.assert_array_equal(
        mask[0, 0], [[T, F, T, F, F], [F, T, F, T, F], [T, F, T, F, T], [F, T, F, T, F], [F, F, T, F, T]])


def test_limit_global_tokens_keeps_the_first_of_each_row():
    glob = np.array([[F, T, T, F, T], [T, F, F, F, F]])
    np.testing.assert_array_equal(masking.limit_global_tokens(glob, 2), [[F, T, T, F, F], [T, F, F, F, F]])
    np.testing.assert_array_equal(masking.limit_global_tokens(glob, None), glob)


def test_segment_mask_with_dilation_and_global_tokens():
    """Causal, window 2, dilation 2, two segments (the last token padding), global token 1; a second
    global token (3) past max_global_tokens=1 stays local."""
    segments = np.array([[1, 1, 1, 1, 2, 2, 0]])
    mask = masking.SegmentMask(segments, segments, causal=True, window=2, dilation=2,
                               global_tokens=np.array([[F, T, F, T, F, F, F]]), max_global_tokens=1)
    np.testing.assert_array_equal(mask.dense(7, 7)[0, 0], [
        [T, F, F, F, F, F, F],
        [T, T, F, F, F, F, F],  # global: every earlier key of its segment
        [T, T, T, F, F, F, F],  # 0 is 2 away; 1 is global
        [F, T, F, T, F, F, F],  # 1 (3 - 1 = 2 apart) by dilation and as global
        [F, F, F, F, T, F, F],  # a new segment
        [F, F, F, F, F, T, F],
        [F, F, F, F, F, F, F],  # padding attends to nothing
    ])


def test_segment_mask_refuses_dilation_or_global_tokens_without_a_window():
    with pytest.raises(ValueError, match="give a window"):
        masking.SegmentMask(dilation=2).dense(3, 3)
    step = masking.SegmentMask(window=2, global_tokens=np.ones((1, 4), bool), query_index=np.array([3]),
                               key_index=np.arange(4))
    with pytest.raises(ValueError, match="self-attention"):
        step.dense(1, 4)
