# %% [markdown]
# # The Ultimate Training Loop, with ultraloop
#
# This walks through "The Ultimate Training Loop" (fastai course 22, part 2) with ultraloop in place of the
# loop the post writes by hand: subclassing the Learner, callbacks, their order, the device, gradient
# accumulation and clipping, mixed precision, the LR finder, and then the hooks and the model summary the post
# promises at its end. The data is scikit-learn's bundled 8x8 digits, so nothing is downloaded and every fit
# takes a second or two on a laptop CPU.
#
# Run it as a script (`python examples/ultimate_training_loop.py`: figures are saved as PNG in the working
# folder) or open `ultimate_training_loop.ipynb` beside it (figures show inline); both hold the same cells.

# %%
# ruff: noqa: F403, F405 (the walkthrough imports ultraloop with *, as the post does with its own definitions)
import importlib.util

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from ultraloop import *
from ultraloop.data import digits
from ultraloop.models import get_model

# %% [markdown]
# ## Data, model, loss and metrics
#
# `digits()` returns `(x_train, y_train, x_valid, y_valid)`: 1,438 and 359 images of shape 1x8x8 scaled to
# [-1, 1] like the post's `Normalize((0.5,), (0.5,))`. `DataLoaders.from_tensors` batches them by index slices,
# several times cheaper than a `DataLoader` over a `TensorDataset`. The model is the post's CNN unchanged: three
# unpadded 3x3 convolutions leave 2x2 of an 8x8 digit, which global average pooling takes in its stride.

# %%
torch.manual_seed(42)  # the same weights on every run; the loaders' shuffles are seeded below
dls = DataLoaders.from_tensors(*digits(), bs=64, seed=42)
x, y = next(iter(dls.train))
print(x.shape, y[:10])
loss_func = nn.CrossEntropyLoss()
print(get_model())

# %% [markdown]
# `MetricsCB` takes any metric with `update`/`compute`/`reset` (torchmetrics here; the post's torcheval works
# too) and prints the post's dict after each epoch phase. It accumulates on the batch's device and reads the
# values once per phase, where the post's version copies every batch to the CPU.

# %%
def metrics(): return MetricsCB(accuracy=MulticlassAccuracy(num_classes=10))

# %% [markdown]
# ## Inheriting Learner
#
# `TrainLearner` defines the five step methods, `predict`, `get_loss`, `backward`, `step` and `zero_grad`,
# exactly as the post does; `MomentumLearner` overrides `zero_grad` to decay the gradients instead of zeroing them.

# %%
learn = TrainLearner(get_model(), dls, loss_func=loss_func, cbs=metrics())
learn.fit(2)

# %%
learn = MomentumLearner(get_model(), dls, loss_func=loss_func, cbs=metrics())
learn.fit(2)

# %% [markdown]
# ## Callbacks
#
# A callback is a class whose methods are named after the loop's events; each takes the learner. Raising
# `CancelFitException` ends `fit` cleanly, so `SingleBatchCB` and `SingleEpochCB` are quick checks that a model,
# its data and its callbacks run at all.

# %%
learn = MomentumLearner(get_model(), dls, loss_func=loss_func, cbs=[metrics(), SingleBatchCB()])
learn.fit(2)

# %%
learn = MomentumLearner(get_model(), dls, loss_func=loss_func, cbs=[metrics(), SingleEpochCB()])
learn.fit(2)

# %% [markdown]
# `TraceCB(verbose=True)` prints every event as it fires: here the one batch that `SingleBatchCB` allows, and the
# cleanup events that still run after it cancels the fit.

# %%
learn = MomentumLearner(get_model(), dls, loss_func=loss_func, cbs=[TraceCB(verbose=True), SingleBatchCB()])
learn.fit(1)

# %% [markdown]
# A typo in an event name would make a callback silently never run; ultraloop refuses it when it is added.

# %%
class PrintLossCB(Callback):
    def after_epoch(self, learn):
        print(f'epoch {learn.epoch} {"train" if learn.training else "valid"} last batch loss {learn.loss.item():.3f}')

class TypoCB(Callback):
    def after_bach(self, learn): print('never runs')

try: MomentumLearner(get_model(), dls, loss_func=loss_func, cbs=TypoCB())
except ValueError as e: print(e)

# %% [markdown]
# ## Device and channels-last
#
# `DeviceCB` moves the model before fit and each batch before the step (`def_device`: mps, else cuda, else cpu).
# `ChannelsLastCB` (the post's `ChannelLastCB`, also under that name) switches the model and each batch to the
# channels-last memory format, which convolutions on recent GPUs prefer.

# %%
print('def_device:', def_device)
learn = MomentumLearner(get_model(), dls, loss_func=loss_func, cbs=[metrics(), ChannelsLastCB(), DeviceCB(), PrintLossCB()])
learn.fit(2)

# %% [markdown]
# ## TrainCB
#
# The same step methods can come from a callback instead of a subclass: `TrainCB` with a plain `Learner`.
# Each step method has exactly one provider, and `show_training_loop()` prints who runs where.

# %%
learn = Learner(get_model(), dls, loss_func=loss_func, cbs=[TrainCB(), metrics(), DeviceCB()])
learn.fit(2)
learn.show_training_loop()

# %% [markdown]
# ## Gradient accumulation and clipping
#
# `GradientAccumulationCB(n)` steps once every `n` batches with the gradient of one batch `n` times as large,
# including a last partial window at the end of each epoch, and metrics still see every batch's true loss.
# `GradientClippingCB` clips once per real step, on the accumulated gradient. Their `order` puts them where they
# must run, whatever order the list gives them in.

# %%
cbs = [metrics(), DeviceCB(), GradientClippingCB(), GradientAccumulationCB(2)]
learn = MomentumLearner(get_model(), dls, loss_func=loss_func, cbs=cbs)
learn.fit(2)

# %% [markdown]
# ## Mixed precision
#
# `MixedPrecisionCB` runs predict and the loss under autocast; with float16 it scales the loss and skips a step
# whose gradients overflowed. It works through events, so it composes with `TrainLearner`, `MomentumLearner` or
# `TrainCB` without defining step methods. bfloat16 runs on a CPU too, which is what this cell uses.

# %%
learn = MomentumLearner(get_model(), dls, loss_func=loss_func, cbs=[metrics(), DeviceCB(), MixedPrecisionCB(torch.bfloat16)])
learn.fit(2)

# %% [markdown]
# The post's other route to mixed precision is Hugging Face Accelerate. `AccelerateCB` (an optional dependency,
# `pip install accelerate`) provides the step methods like `TrainCB`, so it goes with a plain `Learner`.

# %%
if importlib.util.find_spec('accelerate'):
    learn = Learner(get_model(), dls, loss_func=loss_func, cbs=[metrics(), AccelerateCB(mixed_precision='bf16')])
    learn.fit(2)
else: print('AccelerateCB needs accelerate: pip install accelerate')

# %% [markdown]
# ## LR finder
#
# `learn.lr_find()` raises the learning rate 1.3x per batch from 1e-5 until the smoothed loss exceeds 3x its minimum,
# plots loss against lr, and returns a suggested learning rate (None, with a warning, when the loss shows no
# clear descent). Afterwards the weights, the optimiser and the random state are as they were, so the fit that
# follows is the one it would have been. Here with AdamW, then one cycle of the learning rate up to the suggestion.

# %%
learn = TrainLearner(get_model(), dls, loss_func=loss_func, cbs=[DeviceCB()], opt_func=torch.optim.AdamW)
lr = learn.lr_find()
print(f'suggested lr: {lr:.3g}' if lr else 'no suggested lr: see the plot')

# %%
sched = learn.fit_one_cycle(5, lr or 3e-3, cbs=metrics())  # sched.lrs: the lr of every step

# %% [markdown]
# ## Order of callbacks
#
# Callbacks run sorted by `order`, ties in the order they were added. `SingleEpochCB` has order 100, after
# `MetricsCB` (0), so the valid metrics are printed before it stops the fit, whatever order the list gives.

# %%
learn = MomentumLearner(get_model(), dls, loss_func=loss_func, cbs=[SingleEpochCB(), metrics(), DeviceCB()])
learn.fit(3)

# %% [markdown]
# Your own callback chooses its place the same way: here one that stops the fit once the valid accuracy passes a
# target runs after `MetricsCB` has computed the epoch's values (`learn.metrics` is the `MetricsCB`).

# %%
class StopAtCB(Callback):
    order = MetricsCB.order + 1
    def __init__(self, target): self.target = target
    def after_epoch(self, learn):
        acc = learn.metrics.history[-1]['accuracy']
        if not learn.training and acc >= self.target:
            print(f'valid accuracy {acc:.3f} >= {self.target}: stopping')
            raise CancelFitException()

learn = MomentumLearner(get_model(), dls, loss_func=loss_func, cbs=[StopAtCB(0.8), metrics(), DeviceCB()])
learn.fit(20, lr=0.2)

# %% [markdown]
# ## Hooks: looking inside the model
#
# The post ends by promising PyTorch hooks combined with callbacks. `ActivationStatsCB` records each layer's
# activation mean, standard deviation and histogram during training; `plot_stats()` and `color_dim()` draw
# them, showing how the activations of a model evolve (inline here, a PNG when run as a script).

# %%
stats = ActivationStatsCB(nn.ReLU)
learn = MomentumLearner(get_model(), dls, loss_func=loss_func, cbs=[DeviceCB(), stats])
learn.fit(2)
stats.plot_stats()
stats.color_dim()

# %% [markdown]
# `Hook` works on its own too, as a context manager that removes itself:

# %%
def record_shape(hook, module, inp, outp): hook.shape = tuple(outp.shape)

model = get_model()
with Hooks([m for m in model if isinstance(m, nn.Conv2d)], record_shape) as hooks:
    model(x)
print([h.shape for h in hooks])

# %% [markdown]
# ## Summary
#
# `learn.summary()` runs one batch forward, with no side effects, and tabulates each layer's input and output
# shapes, parameters and MFLOPs (as torch's FlopCounterMode counts them: matrix products and convolutions).

# %%
print(learn.summary())
