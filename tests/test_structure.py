"""The package's structure: imports point down the layers, conveniences attach themselves, plots touch no global,
and CudaGraphCB records the very train step that eager batches run."""
import ast
from pathlib import Path

import pytest
import torch
from conftest import toy_data, toy_model
from torch.nn import functional as F

import ultraloop
from ultraloop import CudaGraphCB, DataLoaders, Learner, MetricsCB, TrainLearner

PKG = Path(ultraloop.__file__).parent
# each module's layer: a module may import only from layers below its own (or beside it, within the same layer)
LAYERS = {'utils': 0, 'plotting': 0, 'models': 0, 'datasets': 0, 'data': 1, 'sources': 1, 'state': 1, 'learner': 2,
          'callbacks': 3, 'summary': 4, 'cli': 5, '__main__': 6, '__init__': 6}


def _layer(mod: str) -> int:
    parts = mod.split('.')
    return LAYERS[parts[1]] if len(parts) > 1 else LAYERS['__init__']


def _imports(path: Path, mod: str) -> set[str]:
    """Every ultraloop module `path` imports, at the top or inside a function (lazily)."""
    pkg = mod.split('.')[:-1] if path.name != '__init__.py' else mod.split('.')
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg[:len(pkg) - node.level + 1] if node.level else []
            target = '.'.join([*base, *(node.module.split('.') if node.module else [])])
            if node.module is None: found.update(f'{target}.{a.name}' for a in node.names)
            else: found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {f for f in found if f.split('.')[0] == 'ultraloop' and f != 'ultraloop'}


def test_imports_point_down_the_layers():
    bad = []
    for path in PKG.rglob('*.py'):
        mod = '.'.join(['ultraloop', *path.relative_to(PKG).with_suffix('').parts])
        for imp in _imports(path, mod):
            if _layer(imp) > _layer(mod): bad.append(f'{mod} imports {imp}')
    assert bad == []


def test_the_layer_check_sees_a_lazy_upward_import(tmp_path):
    f = tmp_path / 'learner.py'
    f.write_text('def lr_find(self):\n    from .callbacks.lr_finder import lr_find\n')
    assert _imports(f, 'ultraloop.learner') == {'ultraloop.callbacks.lr_finder'}
    assert _layer('ultraloop.callbacks.lr_finder') > _layer('ultraloop.learner')


def test_learner_source_names_no_callback_module():
    src = (PKG / 'learner.py').read_text()
    assert not any(name in src for name in ('lr_finder', 'summary import', 'schedule import', 'from .callbacks'))


def test_conveniences_are_attached_by_their_own_modules():
    from ultraloop import summary
    from ultraloop.callbacks import lr_finder, metrics, schedule
    assert Learner.lr_find is lr_finder.lr_find and Learner.fit_one_cycle is schedule.fit_one_cycle
    assert Learner.plot_metrics is metrics.plot_metrics and Learner.summary is summary.model_summary


def test_plots_leave_matplotlib_global_state_alone(tmp_path, monkeypatch, capsys):
    matplotlib = pytest.importorskip('matplotlib')
    import matplotlib.pyplot as plt
    monkeypatch.delenv('MPLBACKEND', raising=False)
    learn = TrainLearner(toy_model(), DataLoaders.from_tensors(*toy_data(), bs=16), F.cross_entropy, cbs=[MetricsCB()])
    learn.fit(2)
    before, figs = matplotlib.rcParams['backend'], plt.get_fignums()
    matplotlib.rcParams['backend'] = 'svg'  # a backend the user chose
    try:
        path = learn.plot_metrics(tmp_path / 'm.png')
        assert matplotlib.rcParams['backend'] == 'svg'  # not switched to Agg by a library call
    finally: matplotlib.rcParams['backend'] = before
    assert path.stat().st_size > 1000 and plt.get_fignums() == figs  # and pyplot holds no figure of ours


def test_cuda_graph_records_the_function_eager_batches_run(monkeypatch):
    """Capture and eager run one function by construction: the Learner's own train_step."""
    from test_speed import with_fake_graphs
    ran = []

    class Recording(TrainLearner):
        def train_step(self):
            ran.append('capture' if fake.capturing else 'eager')
            super().train_step()

    learn = Recording(toy_model(), DataLoaders.from_tensors(*toy_data(96, 16), bs=16, shuffle=False), F.cross_entropy)
    fake, cb = with_fake_graphs(monkeypatch, learn), CudaGraphCB(warmup=2)
    learn.fit(1, cbs=[cb])
    # 6 train batches: 2 warm-up (eager), 1 captured (then replayed), 3 replayed: the replays run the captured function
    assert ran[:3] == ['eager', 'eager', 'capture'] and cb.replays == 4 and len(ran) == 3 + 4
    assert cb._eager is Recording.train_step


def test_a_callback_can_replace_the_train_step_and_show_training_loop_names_it(capsys):
    class HalfStep:
        def train_step(self, learn):
            learn.predict(); learn.get_loss(); learn.loss.backward(); learn.opt.step(); learn.opt.zero_grad()

    learn = TrainLearner(toy_model(), DataLoaders.from_tensors(*toy_data(), bs=16), F.cross_entropy, cbs=[HalfStep()])
    w = [p.detach().clone() for p in learn.model.parameters()]
    learn.fit(1)
    assert any(not torch.equal(a, p) for a, p in zip(w, learn.model.parameters()))
    learn.show_training_loop()
    assert 'train_step() -> ' in capsys.readouterr().out
