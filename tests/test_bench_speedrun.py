"""bench/speedrun.py's parts: the accuracy it times to, the cadence of its checks, the authors' MNIST-1D model, and both
sides of each task running a few steps (the figures themselves come from running the script, never from tests)."""
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location('speedrun', ROOT / 'bench' / 'speedrun.py')
speedrun = importlib.util.module_from_spec(spec)
spec.loader.exec_module(speedrun)
CPU = torch.device('cpu')


def test_accuracy_counts_argmax_hits_over_chunks_and_restores_the_mode():
    logits = torch.tensor([[2., 1, 0], [0, 3, 1], [1, 0, 5], [4, 0, 0], [0, 0, 1]])  # argmax 0, 1, 2, 0, 2
    y = torch.tensor([0, 1, 1, 2, 2])  # hits: samples 0, 1, 4
    model = nn.Identity().train()
    assert speedrun.accuracy(model, logits, y, bs=2) == 3 / 5  # chunks of 2, 2 and 1
    assert model.training
    assert speedrun.accuracy(model.eval(), logits, y) == 3 / 5 and not model.training


def test_mnist1d_cnn_is_the_authors_conv_base():
    model = speedrun.mnist1d_cnn()
    # conv 1->25 (5 wide): 125 + 25; two convs 25->25 (3 wide): 2 * (1875 + 25); linear 25 channels x 5 steps -> 10: 1250 + 10
    assert sum(p.numel() for p in model.parameters()) == 150 + 2 * 1900 + 1260 == 5210
    assert model(torch.zeros(7, 40)).shape == (7, 10)  # 40 steps -> 19 -> 10 -> 5


def test_stopwatch_checks_at_each_multiple_of_every_and_at_the_limit():
    model = nn.Identity()
    x, y = torch.eye(3), torch.arange(3)  # accuracy 1.0
    w = speedrun.Stopwatch(x, y, target=2.0, every=100, limit=300, dev=CPU)
    w.start()
    stops = [w.tick(model, 30) for _ in range(10)]
    assert stops.index(True) == 9 and [c[0] for c in w.checks] == [120, 210, 300] and not w.reached
    assert [c[2] for c in w.checks] == [1.0, 1.0, 1.0]
    assert w.checks[0][1] <= w.checks[1][1] <= w.checks[2][1] == round(w.seconds, 4)  # training seconds, cumulative
    w = speedrun.Stopwatch(x, y, target=1.0, every=100, limit=300, dev=CPU)
    w.start()
    assert [w.tick(model, 60) for _ in range(2)] == [False, True] and w.reached and w.seen == 120


def test_stopwatch_stops_a_run_that_failed():
    x, y = torch.eye(10), torch.arange(10)
    model = nn.Linear(10, 10)
    with torch.no_grad(): model.weight.copy_(torch.eye(10))  # accuracy 1.0, but the target is unreachable
    w = speedrun.Stopwatch(x, y, target=2.0, every=10, limit=100, dev=CPU)
    w.start()
    assert not w.tick(model, 10) and not w.failed
    with torch.no_grad(): model.bias[1] = float('nan')  # no longer finite: stops at the next check
    assert not w.tick(model, 5) and w.tick(model, 5) and w.failed and not w.reached and w.seen == 20
    with torch.no_grad(): model.weight.zero_(); model.bias.zero_()  # one class for every sample: accuracy 0.1, chance
    w = speedrun.Stopwatch(x, y, target=2.0, every=10, limit=100, dev=CPU)
    w.start()
    assert [w.tick(model, 10) for _ in range(2)] == [False, True] and w.failed and [c[2] for c in w.checks] == [0.1, 0.1]


@pytest.mark.parametrize('task', ['mnist1d', 'fashion'])
def test_both_sides_train_to_the_first_check(task):
    g = torch.Generator().manual_seed(0)
    shape = (40,) if task == 'mnist1d' else (1, 28, 28)
    x, y = torch.randn(400, *shape, generator=g), torch.randint(0, 10, (400,), generator=g)
    data = (x, y, x[:50], y[:50])
    # the GPU recipe's CudaGraphCB, here on the CPU: WatchCB and the schedule must not be what keeps it from capturing
    recipe = speedrun.parse_recipe('bs=250,epochs=3,extras=cl' if task == 'fashion' else 'bs=250,epochs=3,extras=cudagraph',
                                   speedrun.recipes(CPU)[task])
    hand = speedrun.hand_mnist1d if task == 'mnist1d' else speedrun.hand_fashion
    w = speedrun.Stopwatch(data[2], data[3], 0.0, every=200, limit=10**6, dev=CPU)
    hand(data, w, CPU, 0)
    assert w.reached and len(w.checks) == 1 and w.seen == (200 if task == 'mnist1d' else 256) and w.seconds > 0  # bs 100, 64
    w = speedrun.Stopwatch(data[2], data[3], 0.0, every=200, limit=10**6, dev=CPU)
    speedrun.ultraloop_run(task, data, w, CPU, 0, recipe)
    assert w.reached and w.seen == 250  # one full batch of 250 per epoch (the last 150 dropped)
    assert w.graph == (None if task == 'fashion' else
                       {'replays': 0, 'eager_because': 'the model is on cpu, not a CUDA device'})


def test_a_bad_recipe_is_one_line_naming_the_fix():
    base = speedrun.recipes(CPU)['fashion']
    got = speedrun.parse_recipe('bs=512,lr=0.02,extras=cl+bf16', base)
    assert got == {**base, 'bs': 512, 'lr': 0.02, 'extras': ['cl', 'bf16']}
    with pytest.raises(ValueError, match=r"^recipe key 'batch' is not one of bs, lr, epochs, pct, extras; e\.g\. bs=512"):
        speedrun.parse_recipe('batch=512', base)
    with pytest.raises(ValueError, match=r"^extras \['fp8'\] unknown; use any of cl\+bf16\+cudagraph\+compile$"):
        speedrun.parse_recipe('extras=fp8', base)
