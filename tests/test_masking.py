"""Masks: exact expected arrays on small cases, for each kind and their combination."""

import numpy as np

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
