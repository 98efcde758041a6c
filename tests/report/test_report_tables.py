"""Golden tables on synthetic runs: the study's layouts, seeds aggregated by hand, no run dropped."""

import json
import statistics

from report_reference import REFERENCE_T1, REFERENCE_T2, write_reference_t1

from blueberry.report.groups import group_runs, label_groups
from blueberry.report.records import Run, load_local
from blueberry.report.synthetic import write_run
from blueberry.report.tables import (
    ablation_table,
    extended_table,
    fmt_lr,
    generic_table,
    lr_groups,
    lr_table,
    not_aggregated,
    phase_table,
)


def reference_runs(root):
    write_reference_t1(root, active_share=3)
    return load_local(root)


def test_ablation_table_reproduces_the_study_layout(tmp_path):
    text, ranked = ablation_table(reference_runs(tmp_path))
    lines = text.splitlines()
    assert lines[0] == (
        "| Rank | Configuration | Val Loss | Val Acc | Val Perp | Time (min) | Params (M) | Active (M) | Category "
        "| Seeds |"
    )
    # The paper's Table 1 rows (its cells, rounded as it prints them), plus active params and seeds.
    assert lines[2:7] == [
        "| 1 | attention_moe | 0.0172 | 99.67% | 1.02 | 1.62 | 231.42 | 77.14 | DeepSeek Attn+MoE | 1 |",
        "| 2 | attention_mlp | 0.0174 | 99.71% | 1.02 | 1.13 | 36.28 | 12.09 | DeepSeek Attn+MLP | 1 |",
        "| 3 | moe | 0.1097 | 97.95% | 1.12 | 1.59 | 232.89 | 77.63 | GLM4 MoE | 1 |",
        "| 4 | baseline | 0.1203 | 97.75% | 1.13 | 2.21 | 53.49 | 17.83 | Baseline | 1 |",
        "| 5 | mlp | 0.1508 | 97.22% | 1.16 | 0.93 | 37.75 | 12.58 | DeepSeek MLP | 1 |",
    ]
    assert [g.label for g in ranked] == [row[0] for row in REFERENCE_T1]
    # Statistics block over the five configurations: sample sd, range, best/worst (the paper's "8.7x gap").
    losses = [row[1] for row in REFERENCE_T1]
    mean, sd = statistics.mean(losses), statistics.stdev(losses)
    assert f"- Loss: mean {mean:.4f} ± {sd:.4f}, range 0.0172 – 0.1508, best/worst 0.11x (8.8x gap)" in text
    assert "- Time: mean 1.50 min ± 0.50 min, range 0.93 min – 2.21 min, slowest/fastest 2.4x" in text
    assert "largest/smallest 6.4x" in text


def test_seeds_are_aggregated_as_mean_and_sample_sd(tmp_path):
    # Hand-computed: losses 1.0, 1.2, 1.4 → mean 1.2, sd sqrt((0.04 + 0 + 0.04) / 2) = 0.2.
    for seed, loss in zip((1, 2, 3), (1.0, 1.2, 1.4)):
        write_run(tmp_path, "exp1-ablation", variant="mlp", seed=seed, val_loss=loss, val_accuracy=0.5 + seed / 100)
    # Two seeds 0.5 and 0.7 → mean 0.6, sd 0.1414; gap to mlp 0.6, noise 2·sqrt(0.02/2 + 0.04/3) = 0.3055.
    for seed, loss in zip((1, 2), (0.5, 0.7)):
        write_run(tmp_path, "exp1-ablation", variant="attention_mlp", seed=seed, val_loss=loss)
    text, ranked = ablation_table(load_local(tmp_path))
    assert ranked[0].label == "attention_mlp" and ranked[1].label == "mlp"
    rows = text.splitlines()
    assert rows[0].endswith("| Seeds | Gap to next > noise? |")
    assert rows[2].startswith("| 1 | attention_mlp | 0.6000 ± 0.1414 |")
    assert rows[2].endswith("| 2 | yes: 0.6000 > 0.3055 |")
    assert rows[3].startswith("| 2 | mlp | 1.2000 ± 0.2000 | 52.00% ± 1.00% |")
    assert rows[3].endswith("| 3 | — |")


def test_a_seed_run_again_counts_once_its_newest_run(tmp_path):
    # A finished spec run again is <id>-2 with the same seed (on CPU the same numbers): counted twice it would
    # pass for two seeds with no spread, and the gap to the next configuration for one beyond the noise.
    write_run(tmp_path, "exp1-ablation", variant="mlp", seed=1, val_loss=1.0, run_id="a")
    write_run(tmp_path, "exp1-ablation", variant="mlp", seed=1, val_loss=1.1, run_id="a-2",
              created_at="2025-09-26T12:00:00+0000")  # fmt: skip
    write_run(tmp_path, "exp1-ablation", variant="mlp", seed=2, val_loss=1.3, run_id="b")
    write_run(tmp_path, "exp1-ablation", variant="baseline", seed=1, val_loss=2.0, run_id="c")
    write_run(tmp_path, "exp1-ablation", variant="baseline", seed=1, val_loss=2.0, run_id="c-2")
    (mlp,) = [g for g in group_runs(load_local(tmp_path)) if g.get("model.variant") == "mlp"]
    assert [r.id for r in mlp.ok] == ["a-2", "b"] and mlp.loss.values == [1.1, 1.3]
    assert mlp.states == "2 (+1 older run of a seed)"
    text, _ = ablation_table(load_local(tmp_path))
    assert "| 1 (+1 older run of a seed) | — |" in text  # baseline: one seed, so no noise estimate


def test_bookkeeping_settings_do_not_split_a_configuration(tmp_path):
    for seed, train in enumerate(({}, {"checkpoint_every": 3000}, {"keep_checkpoints": 7}, {"price_per_hour": 1.0})):
        write_run(tmp_path, "exp3-extended", variant="attention_moe", seed=seed + 1, spec={"train": train})
    (group,) = group_runs(load_local(tmp_path))
    assert len(group.ok) == 4


def test_a_run_of_no_time_or_a_multi_line_reason_keeps_the_tables_whole(tmp_path):
    write_run(tmp_path, "exp1-ablation", variant="mlp", seed=1, val_loss=1.0, minutes=0.0)
    write_run(tmp_path, "exp1-ablation", variant="moe", seed=1, val_loss=2.0)
    reason = "RuntimeError: CUDA error: device-side assert\nCUDA kernel errors | <b>later</b>"
    write_run(tmp_path, "exp1-ablation", variant="baseline", seed=1, state="failed", reason=reason)
    runs = load_local(tmp_path)
    text, _ = ablation_table(runs)
    assert "slowest/fastest n/a" in text  # not a ZeroDivisionError
    (row,) = [line for line in not_aggregated(runs).splitlines() if "device-side assert" in line]
    assert "CUDA kernel errors \\| &lt;b>later&lt;/b>" in row and row.endswith("|")


def test_a_nan_val_loss_is_a_readable_run_without_a_final_loss(tmp_path):
    write_run(tmp_path, "exp1-ablation", variant="mlp", seed=1, val_loss=float("nan"))
    (run,) = load_local(tmp_path)
    assert run.state == "finished" and not run.ok


def test_failed_running_and_unreadable_runs_are_listed_not_dropped(tmp_path, alive):
    write_run(tmp_path, "exp1-ablation", variant="mlp", seed=1, val_loss=1.0)
    write_run(tmp_path, "exp1-ablation", variant="mlp", seed=2, state="failed", reason="TrainingDiverged: nan")
    alive(write_run(tmp_path, "exp1-ablation", variant="moe", seed=1, state="running"))
    broken = write_run(tmp_path, "exp1-ablation", variant="baseline", seed=1)
    (broken / "status.json").unlink()
    runs = load_local(tmp_path)
    assert sorted(r.state for r in runs) == ["failed", "finished", "running", "unreadable"]
    text, ranked = ablation_table(runs)
    assert "| 1 | mlp | 1.0000 |" in text and "| 1 (+1 failed) |" in text
    assert "| — | moe | — |" in text and "(+1 running)" in text  # a config with no finished run keeps its row
    listed = not_aggregated(runs)
    assert "Runs not aggregated above (3)" in listed
    assert "TrainingDiverged: nan" in listed and "status.json missing" in listed and "| running |" in listed


def test_lr_table_assesses_from_the_numbers_and_warns_on_the_grid_edge(tmp_path):
    for lr, loss, acc in REFERENCE_T2:
        write_run(tmp_path, "exp2-lr-attention-mlp", variant="attention_mlp", lr=lr, val_loss=loss, val_accuracy=acc)
    (groups,) = lr_groups(load_local(tmp_path))
    text, best = lr_table(groups)
    assert best.get("train.lr") == 3e-3
    lines = text.splitlines()
    assert lines[0] == "| Learning Rate | Val Loss | Val Accuracy | Val Perplexity | Seeds | Assessment |"
    # Assessment: share of the best LR's gain over the unigram loss (synthetic runs: 7.5) reached.
    # 1e-4: (7.5 − 6.386) / (7.5 − 0.0153) = 14.9 %; 3e-4: 51.5 %; 1e-3: 99.9 %.
    assert lines[2] == "| 1e-4 (0.0001) | 6.3860 | 15.70% | 593.48 | 1 | Poor convergence (15%) |"
    assert lines[3].endswith("| Moderate (51%) |")
    assert lines[4].endswith("| Near best (100%) |")
    assert lines[5] == "| **3e-3 (0.003)** | 0.0153 | 99.73% | 1.02 | 1 | **Best** |"
    assert "Best LR: **3e-3 (0.003)**" in text
    assert "**Warning:** the best LR is the largest one tried" in text


def test_lr_format():
    assert [fmt_lr(x) for x in (1e-4, 3e-3, 0.065)] == ["1e-4 (0.0001)", "3e-3 (0.003)", "6.5e-2 (0.065)"]


def test_extended_table_has_checkpoint_rows(tmp_path):
    # The spec's checkpoint interval when it has one (exp3: every 3,000 of 10,000 steps, eval every 100).
    spec = {"train": {"checkpoint_every": 3000}}
    for seed in (1, 2):
        write_run(tmp_path, "exp3-extended", seed=seed, steps=10_000, eval_every=100, log_every=500, spec=spec)
    (group,) = group_runs(load_local(tmp_path))
    text = extended_table(group)
    assert [line.split(" | ")[0] for line in text.splitlines()[2:6]] == ["| 3,000", "| 6,000", "| 9,000", "| final"]
    assert "| 3,000 | 3,000 |" in text and "every 3,000 steps (train.checkpoint_every)" in text
    # Wall time at the checkpoint's eval (synthetic: 0.3 of a 1-minute run, + 0.5 s of eval) = 0.31 min.
    assert text.splitlines()[2].endswith("| 0.31 ± 0.00 |")
    assert "| final | 10,000 | 4.0000 ± 0.0000 |" in text


def test_extended_table_without_interval_uses_quarters_and_says_so(tmp_path):
    write_run(tmp_path, "exp3-extended", steps=1000, eval_every=30)
    (group,) = group_runs(load_local(tmp_path))
    text = extended_table(group)
    # Quarters 250/500/750; evals every 30 → nearest eval steps 240, 510 (500 is 10 from 510 and 20 from 480), 750.
    assert "| 250 | 240 |" in text and "| 500 | 510 |" in text and "| 750 | 750 |" in text
    assert "every 1/4 of the run (250 steps; the spec has no checkpoint interval)" in text


def test_phase_table_joins_lr_search_and_extended(tmp_path):
    for lr, loss, acc in REFERENCE_T2:
        write_run(tmp_path, "exp3-lr-attention-moe", lr=lr, val_loss=loss, val_accuracy=acc)
    write_run(tmp_path, "exp3-extended", lr=3e-3, val_loss=0.06145, val_accuracy=0.98735, val_perplexity=1.0634)
    runs = load_local(tmp_path)
    search = sorted(
        group_runs([r for r in runs if r.experiment == "exp3-lr-attention-moe"]), key=lambda g: g.get("train.lr")
    )
    text = phase_table(search, group_runs([r for r in runs if r.experiment == "exp3-extended"]))
    lines = text.splitlines()
    assert lines[0] == "| Phase | Learning Rate | Val Loss | Val Accuracy | Val Perplexity |"
    assert lines[2].startswith("| LR search | 1e-4 (0.0001) |") and lines[3].startswith("|  | 3e-4")
    assert lines[5].startswith("|  | **3e-3 (0.003)** | 0.0153 |")
    assert lines[6] == "| Extended | 3e-3 (0.003) | 0.0614 | 98.73% | 1.06 |"


def test_any_other_experiment_gets_a_generic_table(tmp_path):
    for experts, loss in ((8, 4.2), (16, 4.1)):
        write_run(tmp_path, "my-idea", val_loss=loss, spec={"model": {"n_experts": experts}})
    text, ranked = generic_table(load_local(tmp_path))
    assert text.splitlines()[0].startswith("| Configuration | Seeds | Val Loss |")
    assert [g.label for g in ranked] == ["n_experts=16", "n_experts=8"]


def test_runs_from_an_older_spec_group_with_newer_ones(tmp_path):
    # A spec written before a field existed lacks it; today's default fills it, so both seeds are one config.
    old = write_run(tmp_path, "exp1-ablation", variant="mlp", seed=1, val_loss=1.0)
    write_run(tmp_path, "exp1-ablation", variant="mlp", seed=2, val_loss=1.2)
    header = json.loads((old / "spec.json").read_text())
    del header["spec"]["train"]["log_every"], header["spec"]["model"]["dropout"]
    (old / "spec.json").write_text(json.dumps(header))
    (group,) = group_runs(load_local(tmp_path))
    assert group.loss.n == 2


def test_a_finished_run_without_a_spec_is_listed_with_the_reason():
    foreign = Run(id="w1", name="w1", experiment="e", state="finished", summary={"val/loss": 1.0}, source="me/p/w1")
    assert not foreign.ok
    assert "| w1 | finished | no spec in the run's config |" in not_aggregated([foreign])


def test_ablation_table_states_the_optimizer_split_when_runs_record_it(tmp_path):
    for variant, loss in (("deepseek_v3", 4.0), ("mlp", 4.1)):
        run_dir = write_run(tmp_path, "exp1-ablation", variant=variant, val_loss=loss)
        header = json.loads((run_dir / "spec.json").read_text())
        header["params"].update(muon=1_500_000, adamw=500_000)  # as the runner records it
        (run_dir / "spec.json").write_text(json.dumps(header))
    text, _ = ablation_table(load_local(tmp_path))
    lines = text.splitlines()
    assert "| Active (M) | Muon / AdamW (M) | Category |" in lines[0]
    assert lines[2].startswith("| 1 | deepseek_v3 |") and "| 1.50 / 0.50 | DeepSeek-V3 block |" in lines[2]


def test_configurations_that_differ_in_more_than_the_variant_say_so_in_their_labels(tmp_path):
    for seed in (1, 2):
        write_run(tmp_path, "exp1-ablation", variant="baseline", seed=seed, steps=100)
        write_run(tmp_path, "exp1-ablation", variant="mlp", seed=seed, steps=400, spec={"train": {"precision": "bf16"}})
    write_run(tmp_path, "exp1-ablation", variant="moe", seed=1, steps=100)
    text, ranked = ablation_table(load_local(tmp_path))
    assert sorted(g.label for g in ranked) == [
        "baseline, precision=fp32, steps=100",  # 'auto', and the run's record says what it resolved to
        "mlp, precision=bf16, steps=400",
        "moe, precision=fp32, steps=100",
    ]
    assert "| mlp, precision=bf16, steps=400 |" in text
    alike = [g for g in group_runs(load_local(tmp_path)) if g.get("train.steps") == 100]
    label_groups(alike, first="model.variant")  # where only the variant differs, its bare name
    assert sorted(g.label for g in alike) == ["baseline", "moe"]


def test_one_spec_run_in_two_precisions_is_two_configurations_and_says_which(tmp_path):
    # precision 'auto' resolves per machine (bf16 on a GPU or an AMX CPU, fp32 elsewhere): not seeds of one
    for seed, device, precision in ((1, "cpu", "fp32"), (2, "cpu", "fp32"), (3, "cuda:0", "bf16")):
        write_run(tmp_path, "misc", variant="moe", seed=seed, hardware={"device": device, "precision": precision})
    write_run(tmp_path, "misc", variant="moe", seed=4, spec={"train": {"precision": "bf16"}})  # asked for bf16
    text, ranked = generic_table(load_local(tmp_path))
    assert sorted((g.label, len(g.ok)) for g in ranked) == [("precision=bf16", 2), ("precision=fp32", 2)]


def test_a_factorial_labels_presets_by_name_and_the_others_by_attention_and_ffn(tmp_path):
    # sweeps/cpu/factorial.yaml: every attention x ffn, `variant: null`; most pairs are presets, mla + topk_moe is not
    for attention, ffn in (("mha", "mlp"), ("mla", "mlp"), ("mla", "topk_moe")):
        model = {"variant": None, "attention": attention, "ffn": ffn}
        write_run(tmp_path, "factorial-cpu", seed=1, spec={"model": model})
    groups = group_runs(load_local(tmp_path))
    label_groups(groups, first="model.variant")
    assert sorted(g.label for g in groups) == ["attention=mla, ffn=topk_moe", "attention_mlp", "mlp"]
    for balance in (None, "aux_loss"):  # the ffn's default balance is left out of the config, not unknown
        write_run(tmp_path / "balance", "misc", variant="moe", seed=1, spec={"model": {"balance": balance}})
    groups = group_runs(load_local(tmp_path / "balance"))
    label_groups(groups, first="model.variant")
    assert sorted(g.label for g in groups) == ["balance=aux_loss", "balance=default"]


def test_the_leakage_line_says_what_was_measured():
    from types import SimpleNamespace

    from blueberry.report.integrity import _leakage

    def run(leakage):
        return SimpleNamespace(header={"data": {"leakage": leakage}})

    measured = _leakage(run({"ngram": 13, "val_windows_with_train_ngram": 0.0018}))
    assert measured == "0.18% of val windows share a 13-gram"
    assert _leakage(run({})) == "not recorded"
    # windows too short for the n-gram: nothing measured there, but copied documents still are
    short = _leakage(run({"ngram": 13, "val_windows_with_train_ngram": None, "val_docs_in_train": 5}))
    assert short == "n-grams not measured (windows shorter than the n-gram); **5 val documents also in train**"
