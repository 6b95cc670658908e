"""The Multi30k recipe's entry point chooses the length penalty on val alone (the run end to end:
tests/test_plots.py::test_reproduce_multi30k_writes_results_and_its_plot, slow; a bad --alphas:
tests/test_cli.py)."""

from transformer.evaluation import choose_on_val


def test_the_alpha_with_the_best_val_bleu_is_chosen_and_test_is_never_decoded():
    val_bleu = {0.6: 39.7, 0.8: 40.0, 1.0: 40.0, 1.2: 39.9}
    asked = []

    def evaluate_val(alpha):
        asked.append(alpha)
        return {"alpha": alpha, "bleu_lc": val_bleu[alpha], "bleu": val_bleu[alpha] - 0.1}

    best, search = choose_on_val(evaluate_val, [0.6, 0.8, 1.0, 1.2])
    assert best == 0.8  # the highest val BLEU; of equals, the first tried
    assert asked == [0.6, 0.8, 1.0, 1.2] and list(search) == asked
    assert search[1.2]["bleu_lc"] == 39.9


def test_no_alpha_means_the_configs_which_evaluate_reports():
    best, search = choose_on_val(lambda alpha: {"alpha": 0.6 if alpha is None else alpha, "bleu_lc": 1.0}, [None])
    assert best == 0.6 and list(search) == [0.6]
