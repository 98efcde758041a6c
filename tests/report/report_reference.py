"""The study's published numbers, used as input data for the report's golden tests."""

from blueberry.report.synthetic import write_run

# The study's published Table 1 (artefacts of its bugs, README "The study"; used here only as format fixtures):
# variant, val loss, val acc, val perplexity, minutes, params printed.
REFERENCE_T1 = [
    ("attention_moe", 0.01718, 0.99674, 1.0173, 1.62, 231_423_680),
    ("attention_mlp", 0.01736, 0.99707, 1.0175, 1.13, 36_281_024),
    ("moe", 0.10973, 0.97949, 1.1160, 1.59, 232_894_976),
    ("baseline", 0.12034, 0.97746, 1.1279, 2.21, 53_493_248),
    ("mlp", 0.15076, 0.97225, 1.1627, 0.93, 37_752_320),
]
# Experiment 2's LR sweep: lr, val loss, val acc.
REFERENCE_T2 = [(1e-4, 6.386, 0.157), (3e-4, 3.650, 0.418), (1e-3, 0.0234, 0.9975), (3e-3, 0.0153, 0.9973)]


def write_reference_t1(root, active_share: int = 1) -> None:
    """Table 1 as five finished `exp1-ablation` runs; active params = total // active_share."""
    for variant, loss, acc, ppl, minutes, total in REFERENCE_T1:
        write_run(
            root,
            "exp1-ablation",
            variant=variant,
            val_loss=loss,
            val_accuracy=acc,
            val_perplexity=ppl,
            minutes=minutes,
            params=(total, total // active_share),
        )
