import pytest
from pydantic import ValidationError

from blueberry.spec import BOOKKEEPING, RunSpec


def test_defaults_make_a_valid_spec():
    spec = RunSpec()
    assert spec.model.variant == "baseline"
    assert spec.run_name == "default-baseline-lr0.01-s42"


def test_unknown_keys_are_rejected_at_every_level():
    for raw in ({"nope": 1}, {"model": {"nope": 1}}, {"train": {"nope": 1}}, {"tracking": {"nope": 1}}):
        with pytest.raises(ValidationError, match="Extra inputs"):
            RunSpec.model_validate(raw)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"model": {"d_model": 130, "n_heads": 4}}, "divisible by n_heads"),
        ({"model": {"n_experts": 2, "top_k": 3}}, "top_k"),
        ({"data": {"seq_len": 2048}}, "max_seq_len"),
        ({"train": {"lr": -1}}, "greater than 0"),
        ({"model": {"variant": "gpt5"}}, "baseline"),
        ({"data": {"dataset": ""}}, "not empty"),  # not the working directory
        ({"data": {"tokenizer": " "}}, "not empty"),
        ({"model": {"expert_d_ff": 36, "experts_implementation": "grouped"}}, "multiples of 8"),
        ({"model": {"variant": "moe", "expert_d_ff": 36, "experts_implementation": "grouped_mm"}}, "multiples of 8"),
    ],
)
def test_invalid_values_name_the_problem(raw, message):
    with pytest.raises(ValidationError, match=message):
        RunSpec.model_validate(raw)


def test_grouped_experts_check_only_routed_feed_forwards():
    RunSpec.model_validate({"model": {"variant": "mlp", "expert_d_ff": 36, "experts_implementation": "grouped"}})
    RunSpec.model_validate({"model": {"expert_d_ff": 36, "experts_implementation": "auto"}})  # auto falls back


def test_hash_is_stable_and_sensitive():
    a, b = RunSpec(), RunSpec.model_validate({"train": {"lr": 0.003}})
    assert a.spec_hash() == RunSpec().spec_hash()
    assert a.spec_hash() != b.spec_hash()


def test_the_hash_leaves_out_bookkeeping_so_a_run_started_again_with_it_is_the_same_run():
    plain = RunSpec()
    kept = RunSpec.model_validate(
        {
            "train": {
                "progress": False,
                "threads": 3,
                "checkpoint_every": 7,
                "keep_checkpoints": 9,
                "price_per_hour": 1,
            },
            "tracking": {"runs_root": "elsewhere"},
        }
    )
    assert kept.spec_hash() == plain.spec_hash() and kept.legacy_spec_hash() != plain.legacy_spec_hash()
    for changed in ({"seed": 1}, {"model": {"dropout": 0.0}}, {"train": {"grad_accum": 2}}):
        assert RunSpec.model_validate(changed).spec_hash() != plain.spec_hash()
    assert RunSpec.model_validate({"tracking": {"project": "p"}}).spec_hash() != plain.spec_hash()


def test_a_top1_routed_model_is_not_the_run_it_was_before_its_gate_changed():
    """Since the top-1 gate weights by the router's score, the same spec computes something else: its hash (the
    run directory and the checkpoints a resume accepts) differs from what the old code wrote, under both the
    current and the older hash formula; every other spec's hash stays as it was."""
    import hashlib
    import json

    def old(tree):  # spec_hash as it was computed before the change
        return hashlib.sha256(json.dumps(tree, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    top1 = RunSpec.model_validate({"model": {"variant": "attention_moe", "n_experts": 4, "top_k": 1}})
    assert top1.spec_hash() != old(top1.model_dump(mode="json", exclude=BOOKKEEPING))
    assert top1.legacy_spec_hash() != old(top1.to_json_dict())
    for spec in (RunSpec(), RunSpec.model_validate({"model": {"variant": "mlp", "top_k": 1}})):  # dense: no gate
        assert spec.spec_hash() == old(spec.model_dump(mode="json", exclude=BOOKKEEPING))
