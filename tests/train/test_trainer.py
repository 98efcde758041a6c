import functools
import signal
from collections import Counter

import pytest
import torch
from click.testing import CliRunner
from torch.utils._python_dispatch import TorchDispatchMode

import blueberry.runner
from blueberry import distributed
from blueberry.bench.measure import ListTracker, SyntheticData
from blueberry.bench.suite import QUICKSTART, TINY
from blueberry.cli import main
from blueberry.models import build_model
from blueberry.overrides import load_spec
from blueberry.train.evaluate import evaluate
from blueberry.train.trainer import StoppedAtOnce, StopRequest, Trainer


def tiny_model(*overrides: str):
    """The bench's tiny spec, synthetic data and a freshly seeded model (seeding also fixes dropout's draws)."""
    spec = load_spec(QUICKSTART, [*TINY, "--train.progress=False", *overrides])
    data = SyntheticData(spec.data.vocab_size, spec.data.seq_len)
    torch.manual_seed(spec.seed)
    return spec, data, build_model(spec.model, data.vocab_size)


def tiny_trainer(precision: str, *overrides: str) -> Trainer:
    spec, data, model = tiny_model(*overrides)
    return Trainer(spec, model, data, ListTracker(), torch.device("cpu"), precision)


class CastsOf(TorchDispatchMode):
    """Counts the dtype casts (`aten._to_copy`) whose input is one of the given tensors."""

    def __init__(self, tensors):
        super().__init__()
        self.names = {self.key(t): name for name, t in tensors}
        self.counts = Counter()

    @staticmethod
    def key(t):
        return t.data_ptr(), t.shape

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and (name := self.names.get(self.key(args[0]))):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def test_trainer_calls_the_after_optimizer_step_hooks_once_per_step():
    spec, data, model = tiny_model("--model.variant=baseline", "--train.steps=3")
    hooked, seen = [], []
    model.after_optimizer_step = lambda: hooked.append(1)
    trainer = Trainer(
        spec, model, data, ListTracker(), torch.device("cpu"), "fp32", callbacks=[lambda t, step: seen.append(step)]
    )
    summary = trainer.train()
    assert hooked == [1, 1, 1] and seen == [1, 2, 3] and summary["trainer/step"] == 3


def test_the_lr_schedule_moves_once_per_optimizer_step_not_per_micro_step():
    """Warmup and decay count optimizer steps (the reference counted micro-steps: with grad_accum 4 its schedule
    ran 4x too fast). Muon's LR and AdamW's (its ratio of it) both follow lr_factor of the updates done so far."""
    from blueberry.train.schedule import lr_factor

    trainer = tiny_trainer("fp32", "--train.grad_accum=4", "--train.steps=20", "--train.warmup_fraction=0.2")
    cfg = trainer.cfg
    for step in (1, 2, 3):
        _, step_lrs = trainer.train_step(step)
        factor = lr_factor(step - 1, cfg)
        assert step_lrs == pytest.approx([cfg.lr * factor, cfg.lr * cfg.adamw_lr_ratio * factor])
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(cfg.lr * lr_factor(3, cfg))


def test_a_compiled_moe_model_traces_one_graph_over_micro_steps_and_routing_bias_updates():
    """The forward keeps no state (the trainer notes each micro-step's routing loads), so torch.compile traces the
    model once: not once for the first micro-step after a bias update and again for the others. Experts grouped
    (as on a GPU: the sorted dispatch splits at its per-expert counts), compiled without Inductor (seconds)."""
    from torch._dynamo.utils import counters

    flags = ["--model.variant=deepseek_v3", "--model.experts_implementation=grouped", "--train.grad_accum=2"]
    spec, data, model = tiny_model(*flags, "--train.steps=3", "--train.eval_every=3")
    torch._dynamo.reset()
    counters.clear()
    model.compile(backend="aot_eager")
    noted, note = [], model.note_routing
    model.note_routing = lambda stats: (noted.append([s.layer for s in stats]), note(stats))
    Trainer(spec, model, data, ListTracker(), torch.device("cpu"), "bf16").train()
    assert counters["stats"]["unique_graphs"] == 1
    assert noted == [[0]] * 6  # every micro-step's loads (3 steps × 2), of the one routed layer
    assert all(ffn._load_since_update is None for ffn in model.routed_ffns())  # each step's update took them
    torch._dynamo.reset()


def test_under_autocast_each_weight_is_cast_once_per_optimizer_step_not_per_micro_step():
    trainer = tiny_trainer("bf16", "--model.variant=mlp", "--train.grad_accum=4")
    # The tied embedding is left out: the chunked loss (linear_cross_entropy.py) casts the LM head itself.
    weights = [(name, p) for name, p in trainer.model.named_parameters() if p.ndim == 2 and "tok_emb" not in name]
    with CastsOf(weights) as casts:
        trainer.train_step(1)
    assert len(casts.counts) == len(weights) == 5, casts.counts  # attention's 2 and the FFN's 3
    assert set(casts.counts.values()) == {1}, casts.counts  # 4 micro-steps, one cast each


def test_an_evaluation_casts_each_weight_once_not_once_per_batch():
    trainer = tiny_trainer("bf16", "--model.variant=mlp")
    windows = torch.randint(trainer.model.vocab_size, (3 * trainer.cfg.batch_size, trainer.spec.data.seq_len + 1))
    weights = [(name, p) for name, p in trainer.model.named_parameters() if p.ndim == 2]  # lm_head is tok_emb
    with CastsOf(weights) as casts:
        evaluate(trainer.model, windows, trainer.cfg.batch_size, trainer.device, trainer.autocast)  # 3 batches
    assert len(casts.counts) == len(weights) == 6 and set(casts.counts.values()) == {1}, casts.counts


def test_casting_once_per_step_trains_exactly_as_casting_every_micro_step():
    """The cast is a pure function of the weight, which changes only at the optimizer step: bit-identical."""
    args = ("bf16", "--model.variant=moe", "--train.grad_accum=2", "--train.steps=3", "--train.eval_every=3")
    runs = []
    for cache in (True, False):
        trainer = tiny_trainer(*args)  # reseeds: both runs draw the same dropout masks
        trainer.autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16, cache_enabled=cache)
        runs.append((trainer.train(), trainer.model.state_dict()))
    (once, once_state), (every, every_state) = runs
    for (name, a), b in zip(once_state.items(), every_state.values(), strict=True):
        assert torch.equal(a, b), name
    assert once["val/loss"] == every["val/loss"] and once["train/loss"] == every["train/loss"]


def test_an_fp16_overflow_in_one_optimizers_gradients_skips_every_optimizers_step():
    """GradScaler skips only the optimizer whose gradients overflowed; the trainer skips Muon's and AdamW's."""
    trainer = tiny_trainer("fp16", "--model.variant=mlp")
    muon, adamw = trainer.optimizers
    overflowing = muon.param_groups[0]["params"][0]
    overflowing.register_hook(lambda grad: torch.full_like(grad, float("inf")))  # what fp16 overflow looks like
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    scale = trainer.scaler.get_scale()
    lrs = [sched.get_last_lr() for sched in trainer.schedulers]
    trainer.train_step(1)
    assert all(torch.equal(p, before[name]) for name, p in trainer.model.named_parameters())
    assert not adamw.state and not muon.state  # neither took a step (AdamW's step count would have advanced)
    assert trainer.scaler.get_scale() == scale / 2  # and the scale backs off, as after any overflow
    # nor did the LR schedule: it counts updates, so the skipped one does not use up a warmup step
    assert [sched.get_last_lr() for sched in trainer.schedulers] == lrs
    assert all(sched.last_epoch == 0 for sched in trainer.schedulers)


def test_a_run_begun_without_fp16_resumes_where_auto_picks_fp16():
    """`precision: auto` is in the spec, not what it resolved to: a run started on a bf16 GPU (or a CPU) and resumed
    on a T4 resolves to fp16 there, whose GradScaler had refused the disabled scaler's empty state."""
    begun = tiny_trainer("fp32", "--model.variant=mlp", "--train.steps=1")
    begun.train()
    state = {**begun.state_dict(), "step": 1}
    resumed = tiny_trainer("fp16", "--model.variant=mlp", "--train.steps=1")
    resumed.load_state_dict(state)
    assert resumed.scaler.is_enabled() and resumed.start_step == 1
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), begun.model.parameters(), strict=True))
    resumed.train()  # nothing left to train: writes its final state
    back = tiny_trainer("fp32", "--model.variant=mlp")  # and the other way: the fp16 run's scale is not needed
    back.load_state_dict({**resumed.state_dict(), "step": 1})
    assert not back.scaler.is_enabled()


def test_sighup_is_a_stop_request_unless_nohup_ignores_it(monkeypatch):
    """A dropped ssh session hangs the terminal up: checkpoint and stop, as on SIGTERM; under `nohup` run on."""
    detached = []
    monkeypatch.setattr("blueberry.train.trainer.detach_from_terminal", lambda: detached.append(True))
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as a terminal starts it (this suite may run under nohup)
    request = StopRequest().install()
    try:
        signal.raise_signal(signal.SIGHUP)
        assert request.signum == signal.SIGHUP and detached == [True]  # writes to the lost terminal would fail
    finally:
        request.restore()
        signal.signal(signal.SIGHUP, previous)
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as `nohup blueberry run ...` starts it
    try:
        request = StopRequest().install()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        request.restore()
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_second_signal_stops_at_once_and_says_which(monkeypatch):
    request = StopRequest().install()
    try:
        signal.raise_signal(signal.SIGTERM)
        with pytest.raises(StoppedAtOnce, match="SIGTERM again: stopped at once, no checkpoint") as stopped:
            signal.raise_signal(signal.SIGTERM)
        assert stopped.value.signum == signal.SIGTERM
    finally:
        request.restore()

    def execute(spec, **kwargs):
        raise StoppedAtOnce(signal.SIGTERM)

    monkeypatch.setattr(blueberry.runner, "execute", execute)
    result = CliRunner().invoke(main, ["run", str(QUICKSTART), "--tracking.wandb=disabled"])
    assert result.exit_code == 128 + signal.SIGTERM  # as the first SIGTERM's exit, not Ctrl-C's 130
    assert result.output.strip().endswith("error: interrupted: SIGTERM again: stopped at once, no checkpoint")


def test_a_signal_is_noted_and_in_one_process_stops_the_run_after_the_step_it_arrived_in():
    single = StopRequest().install()
    try:
        vote = distributed.StopVote(lambda: single.signum)
        vote.send()  # the step starts with no signal
        signal.raise_signal(signal.SIGTERM)
        assert single.signum == signal.SIGTERM  # noted, the step goes on
        assert vote.result() == signal.SIGTERM  # at its end: checkpoint, then stop
    finally:
        single.restore()
