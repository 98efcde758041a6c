"""Evaluation in cache-sized chunks scores exactly what one pass over the whole batch's logits scores."""

import importlib
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from blueberry.train import evaluate

evaluate_module = importlib.import_module("blueberry.train.evaluate")  # the package's `evaluate` is the function

VOCAB = 16


class TableLM(nn.Module):
    """Logits looked up per input token: a model whose outputs the test can recompute."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, inputs):
        return SimpleNamespace(logits=self.table[inputs])


def reference(model, windows):
    logits = model(windows[:, :-1]).logits.flatten(0, 1)
    targets = windows[:, 1:].flatten()
    loss = F.cross_entropy(logits, targets).item()
    return loss, (logits.argmax(-1) == targets).sum().item() / targets.numel()


def test_chunks_that_split_rows_unevenly_give_the_whole_batch_loss_and_accuracy(monkeypatch):
    monkeypatch.setattr(evaluate_module, "CPU_CHUNK_BYTES", 5 * 4 * VOCAB)  # 5 rows: batches of 3 × 7 split 5+5+5+5+1
    generator = torch.Generator().manual_seed(0)
    model = TableLM(torch.randn(VOCAB, VOCAB, generator=generator))
    windows = torch.randint(VOCAB, (10, 8), generator=generator)
    model.train()
    got = evaluate(model, windows, batch_size=3, device=torch.device("cpu"))
    loss, accuracy = reference(model, windows)
    assert model.training  # the mode is restored
    assert got["val/tokens"] == 10 * 7
    assert abs(got["val/loss"] - loss) < 1e-6 and got["val/accuracy"] == accuracy
    assert 0 < accuracy < 1


def test_ties_count_as_argmax_counts_them_the_first_maximum_wins():
    model = TableLM(torch.zeros(VOCAB, VOCAB))  # every logit equal: the prediction is token 0
    windows = torch.tensor([[3, 0, 5, 0, 0], [0, 1, 0, 2, 0]])
    got = evaluate(model, windows, batch_size=2, device=torch.device("cpu"))
    assert got["val/accuracy"] == reference(model, windows)[1] == 5 / 8


def test_a_gpu_reads_the_logits_in_chunks_of_at_most_256_mib_in_fp32():
    rows = evaluate_module._rows_per_chunk
    assert rows(16 * 256, 49_152, torch.device("cuda")) == 1365  # the study's micro-batch: 3 chunks, not 1
    assert rows(16 * 256, 8_192, torch.device("cuda")) == 4096  # a small vocabulary: the batch whole
    assert rows(16 * 256, 8_192, torch.device("cpu")) == 32  # a core's cache


def test_a_model_compiled_for_training_is_evaluated_eagerly_without_compiling_again():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(0)
    model, windows = TableLM(torch.randn(VOCAB, VOCAB, generator=generator)), torch.randint(VOCAB, (5, 8))
    counter = CompileCounter()  # a backend that counts the frames dynamo hands it and runs them as they are
    model.compile(backend=counter)
    expected = evaluate(TableLM(model.table.detach().clone()), windows, batch_size=2, device=torch.device("cpu"))
    assert evaluate(model, windows, batch_size=2, device=torch.device("cpu")) == expected
    assert counter.frame_count == 0
    model(windows[:, :-1])  # the training path still goes through the compiled call
    assert counter.frame_count == 1
    torch._dynamo.reset()
