"""Every code cell of the seed document ("The Ultimate Training Loop") runs as written against ultraloop.

The cells are copied from the document with their indentation restored. Only the definitions of names that
ultraloop provides (the exceptions, Callback, run_cbs, with_cbs, Learner, DataLoaders, to_cpu, MetricsCB,
def_device, to_device, DeviceCB, ChannelLastCB, MixedTrainingCB, AccelerateCB) are replaced by
`from ultraloop import *`; the classes the reader writes in the walkthrough (TrainLearner, MomentumLearner,
SingleBatchCB, SingleEpochCB, TrainCB, GradientClippingCB, GradientAccumulationCB, LRFinderCB and the patched
lr_find) run as the reader's own code on top of ultraloop. FashionMNIST is replaced by small random data of the
same shape, made here (no download).
"""
import ast
import contextlib
import io
import os

import pytest

os.environ.setdefault('MPLBACKEND', 'Agg')

CELLS = [
    ('imports', '''
import torch
import fastcore.all as fc
from torch import nn, optim
from functools import partial
from operator import attrgetter
from torch.nn import functional as F
from ultraloop import *
'''),
    ('data', '''
# stands in for FashionMNIST: same shapes, made here
from torch.utils.data import DataLoader, TensorDataset
BS = 64
torch.manual_seed(0)
_x = torch.randn(384, 1, 28, 28); _y = (_x.flatten(1) @ torch.randn(784, 10)).argmax(1)
train_ds, test_ds = TensorDataset(_x[:256], _y[:256]), TensorDataset(_x[256:], _y[256:])
train_dl = DataLoader(train_ds, batch_size=BS, shuffle=True)
test_dl = DataLoader(test_ds, batch_size=BS, shuffle=False)
'''),
    ('dls', '''
dls = DataLoaders(train_dl, test_dl)
dls.train, dls.valid
'''),
    ('model', '''
def get_model():
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(),
                         nn.Conv2d(8, 16, 3), nn.ReLU(),
                         nn.Conv2d(16, 32, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 10))
model = get_model()
model
loss_func = nn.CrossEntropyLoss()
'''),
    ('metrics', '''
from copy import copy
from collections.abc import Mapping
from torcheval.metrics import MulticlassAccuracy, Mean
metrics = MetricsCB(accuracy=MulticlassAccuracy())
'''),
    ('train_learner', '''
class TrainLearner(Learner):
    def predict(self): self.preds = self.model(self.batch[0]) # batch->(x,y)
    def get_loss(self): self.loss = self.loss_func(self.preds, self.batch[1])
    def backward(self): self.loss.backward()
    def step(self): self.opt.step()
    def zero_grad(self): self.opt.zero_grad()
learner = TrainLearner(get_model(),dls,cbs=metrics,loss_func=loss_func)
learner.fit(2)
'''),
    ('momentum_learner', '''
class MomentumLearner(TrainLearner):
    def __init__(self, model, dls=(0,), loss_func=F.mse_loss, lr=0.1,
                 cbs=None, opt_func=optim.SGD, mom=0.85):
        self.mom = mom
        super().__init__(model, dls, loss_func, lr, cbs, opt_func)
    def zero_grad(self):
        for p in self.model.parameters():
            p.grad *= self.mom
learner = MomentumLearner(get_model(),dls,cbs=metrics,loss_func=loss_func)
learner.fit(2)
'''),
    ('single_batch', '''
class SingleBatchCB(Callback):
    def after_batch(self, learner):
        print('[SingleBatchCB] Terminating . . . ')
        raise CancelFitException()
cbs = [metrics, SingleBatchCB()]
learner = MomentumLearner(get_model(),dls,cbs=cbs,loss_func=loss_func)
learner.fit(2)
'''),
    ('single_epoch', '''
class SingleEpochCB(Callback):
    def after_epoch(self, learner):
        if not learner.model.training:
            print('[SingleEpochCB] Terminating . . . ')
            raise CancelFitException()
cbs = [metrics, SingleEpochCB()]
learner = MomentumLearner(get_model(),dls,cbs=cbs,loss_func=loss_func)
learner.fit(2)
'''),
    ('device', '''
cbs = [metrics, DeviceCB()]
learner = MomentumLearner(get_model(), dls, cbs=cbs, loss_func=loss_func)
learner.fit(2)
'''),
    ('channel_last', '''
cbs = [metrics, ChannelLastCB(), DeviceCB()]
learner = MomentumLearner(get_model(), dls, cbs=cbs, loss_func=loss_func)
learner.fit(2)
'''),
    ('train_cb', '''
class TrainCB(Callback):
    def predict(self, learn): learn.preds = learn.model(learn.batch[0])
    def get_loss(self, learn):
        learn.loss = learn.loss_func(learn.preds, learn.batch[1])
    def backward(self, learn): learn.loss.backward()
    def step(self, learn): learn.opt.step()
    def zero_grad(self, learn): learn.opt.zero_grad()
cbs = [TrainCB(), metrics, DeviceCB()]
learner = Learner(get_model(), dls, loss_func=loss_func, cbs=cbs)
learner.fit(2)
'''),
    ('clip_accumulate', '''
class GradientClippingCB(Callback):
    def __init__(self, max_norm=1.0, norm_type=2):
        self.max_norm, self.norm_type = max_norm, norm_type
    def after_backward(self, learner):
        torch.nn.utils.clip_grad_norm_(learner.model.parameters(),
                                       self.max_norm, self.norm_type)
class GradientAccumulationCB(Callback):
    def __init__(self, n):
        self.counter = 0
        self.n = n
    def after_loss(self, learner):
        learner.loss = learner.loss / self.n
    def after_backward(self, learner):
        self.counter += 1
        if self.counter % self.n != 0:
            raise CancelBatchException()
class GradientAccumulationCB(Callback):
    def __init__(self, n):
        self.counter = 0
        self.n = n
    def after_loss(self, learner):
        learner.loss = learner.loss / self.n
    def after_backward(self, learner):
        self.counter += 1
        if self.counter % self.n != 0:
            raise CancelBatchException()
    def after_epoch(self, learner):
        if learner.model.training:
            learner.step()
            learner.zero_grad()
cbs = [metrics, ChannelLastCB(), DeviceCB(),
       GradientClippingCB(), GradientAccumulationCB(2)]
learner = MomentumLearner(get_model(), dls, cbs=cbs, loss_func=loss_func)
learner.fit(2)
'''),
    ('mixed_precision', '''
cbs = [metrics, DeviceCB(), MixedTrainingCB()]
learner = MomentumLearner(get_model(), dls, cbs=cbs, loss_func=loss_func)
learner.fit(2)
'''),
    ('accelerate', '''
cbs = [metrics, DeviceCB(), AccelerateCB(mixed_precision="no")]  # the document's "fp16" needs a GPU
learner = Learner(get_model(), dls, cbs=cbs, loss_func=loss_func)
learner.fit(2)
'''),
    ('lr_finder', '''
import math
import matplotlib.pyplot as plt
class LRFinderCB(Callback):
    def __init__(self, lr_mult=1.3):
        self.lr_mult = lr_mult
    def before_fit(self, learn):
        self.lrs, self.losses = [], []
        self.min = math.inf
    def after_batch(self, learn):
        if not learn.training: raise CancelEpochException()
        self.lrs.append(learn.opt.param_groups[0]['lr'])
        loss = to_cpu(learn.loss)
        self.losses.append(loss)
        if loss < self.min: self.min = loss
        if loss > self.min*3: raise CancelFitException()
        for g in learn.opt.param_groups:
            g['lr'] *= self.lr_mult
lrfind = LRFinderCB()
cbs = [DeviceCB(), lrfind]
learn = MomentumLearner(get_model(), dls, lr=1e-4,
                        cbs=cbs, loss_func=loss_func)
learn.fit(1)
plt.plot(lrfind.lrs, lrfind.losses)
plt.xscale('log')
'''),
    ('lr_find_patch', '''
@fc.patch
def lr_find(self:Learner, lr_mult=1.3, start_lr=1e-5, max_epochs=10):
    lrfind = LRFinderCB(lr_mult=lr_mult)
    self.fit(max_epochs, lr=start_lr, cbs=lrfind)
    plt.plot(lrfind.lrs, lrfind.losses)
    plt.xscale('log')
learner = MomentumLearner(get_model(), dls, F.cross_entropy, cbs=cbs)
learner.lr_find()
'''),
    ('order_wrong', '''
cbs = [SingleEpochCB(), metrics, DeviceCB()] # important
learner = MomentumLearner(get_model(), dls, loss_func=loss_func, cbs=cbs)
learner.fit(3)
'''),
    ('order_swapped', '''
cbs = [metrics, SingleEpochCB(), DeviceCB()] # update
learner = MomentumLearner(get_model(), dls, loss_func=loss_func, cbs=cbs)
learner.fit(3)
'''),
    ('order_attribute', '''
class SingleEpochCB(Callback):
    order = Callback.order + 1 # update
    def after_epoch(self, learner):
        if not learner.model.training:
            print('[SingleEpochCB] Terminating . . . ')
            raise CancelFitException()
cbs = [SingleEpochCB(), metrics, DeviceCB()] # important
learner = MomentumLearner(get_model(), dls, loss_func=loss_func, cbs=cbs)
learner.fit(3)
'''),
]


@pytest.fixture(scope='module')
def outputs():
    """Run the cells in order in one namespace, as a notebook would; keep each cell's printed output."""
    import torch

    import ultraloop
    saved = ultraloop.Learner.__dict__.get('lr_find')  # the lr_find cell patches Learner: undo it afterwards
    ns, out = {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the function-scoped one-thread fixture: small models, one thread
    try:
        for name, code in CELLS:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                exec(compile(code, f'<seed cell {name}>', 'exec'), ns)
            out[name] = buf.getvalue().splitlines()
            if name == 'lr_finder': out['lr_finder_lrs'] = list(ns['lrfind'].lrs)  # the next cell runs lrfind again
    finally:
        torch.set_num_threads(threads)
        if saved is None: ultraloop.Learner.__dict__.get('lr_find') and delattr(ultraloop.Learner, 'lr_find')
        else: ultraloop.Learner.lr_find = saved
        import matplotlib.pyplot as plt
        plt.close('all')
    out['_ns'] = ns
    return out


def logs(lines):
    """The metric dicts a cell printed, parsed; other lines (the Terminating messages) are skipped."""
    return [ast.literal_eval(ln) for ln in lines if ln.startswith('{')]


def phases(lines):
    return [(d['epoch'], d['train']) for d in logs(lines)]


TWO_EPOCHS = [(0, 'train'), (0, 'eval'), (1, 'train'), (1, 'eval')]


@pytest.mark.parametrize('cell', ['train_learner', 'momentum_learner', 'device', 'channel_last', 'train_cb',
                                  'clip_accumulate', 'mixed_precision', 'accelerate'])
def test_fit_cells_print_the_seed_metrics_table(outputs, cell):
    assert phases(outputs[cell]) == TWO_EPOCHS
    rows = logs(outputs[cell])
    for d in rows:
        assert list(d) == ['accuracy', 'loss', 'epoch', 'train']
        assert len(d['loss'].split('.')[1]) == 3 and len(d['accuracy'].split('.')[1]) == 3
    # it learned: the second epoch's train loss is below the first's (the seed's accumulation cell cancels all but one
    # batch in n, so its metrics see too few batches to show it)
    if cell != 'clip_accumulate': assert float(rows[2]['loss']) < float(rows[0]['loss']), rows


def test_dls_cell(outputs):
    ns = outputs['_ns']
    assert ns['dls'].train is ns['train_dl'] and ns['dls'].valid is ns['test_dl']


def test_single_batch_cell_stops_before_any_epoch_ends(outputs):
    assert outputs['single_batch'] == ['[SingleBatchCB] Terminating . . . ']


def test_single_epoch_cell_stops_after_first_valid(outputs):
    assert phases(outputs['single_epoch']) == [(0, 'train'), (0, 'eval')]
    assert outputs['single_epoch'][-1] == '[SingleEpochCB] Terminating . . . '


def test_order_cells_show_why_order_matters(outputs):
    assert phases(outputs['order_wrong']) == [(0, 'train')]           # SingleEpochCB ran before MetricsCB
    assert phases(outputs['order_swapped']) == [(0, 'train'), (0, 'eval')]
    assert phases(outputs['order_attribute']) == [(0, 'train'), (0, 'eval')]  # order = 1 fixes it


def test_lr_finder_cells_record_growing_lrs(outputs):
    lrs = outputs['lr_finder_lrs']
    assert len(lrs) >= 2 and lrs[0] == pytest.approx(1e-4) and lrs[1] == pytest.approx(1.3e-4)

