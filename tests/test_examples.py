"""The walkthrough runs as a script and as a notebook, the notebook holds the script's cells, and the README's
callback table names only callbacks that exist.

The notebook is built from the script's `# %%` cells: after editing the script, run
`python tests/test_examples.py` to rewrite `examples/ultimate_training_loop.ipynb`.
"""
import os
import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'examples' / 'ultimate_training_loop.py'
NOTEBOOK = SCRIPT.with_suffix('.ipynb')
# the walkthrough's models are tiny: one thread runs them fastest, and several spin against each other on a busy machine
ONE_THREAD = {'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}


def script_cells(text: str) -> list[tuple[str, str]]:
    """(cell_type, source) for each `# %%` (code) or `# %% [markdown]` (comment lines, '# ' stripped) cell."""
    cells = []
    for chunk in re.split(r'^# %%', text, flags=re.M)[1:]:
        head, _, body = chunk.partition('\n')
        body = body.strip('\n')
        if head.strip() == '[markdown]':
            lines = [line[2:] if line.startswith('# ') else line.lstrip('#') for line in body.splitlines()]
            cells.append(('markdown', '\n'.join(lines)))
        else:
            cells.append(('code', body))
    return cells


def build_notebook():
    import nbformat
    nb = nbformat.v4.new_notebook()
    nb.metadata.kernelspec = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
    nb.metadata.language_info = {'name': 'python'}
    for kind, src in script_cells(SCRIPT.read_text()):
        nb.cells.append(nbformat.v4.new_markdown_cell(src) if kind == 'markdown' else nbformat.v4.new_code_cell(src))
    for i, c in enumerate(nb.cells): c.id = f'cell-{i}'  # stable ids, so a rebuild changes only what changed
    return nb


def test_notebook_holds_the_script_cells():
    import nbformat
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert [(c.cell_type, c.source) for c in nb.cells] == script_cells(SCRIPT.read_text()), \
        'the notebook is out of date: run python tests/test_examples.py'
    assert len(nb.cells) > 20


def test_script_runs(tmp_path, monkeypatch, capsys):
    # in this process (a fresh interpreter would spend seconds importing torch again); the notebook test below runs the
    # same cells in a process of their own
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(SCRIPT), run_name='__main__')
    out = capsys.readouterr().out
    assert "'train': 'train'" in out and "'train': 'eval'" in out  # the seed's metrics dicts
    assert '[SingleBatchCB] Terminating . . .' in out and '[SingleEpochCB] Terminating . . .' in out
    assert 'TypoCB.after_bach is not an event' in out
    assert re.search(r'^suggested lr: \d', out, re.M)
    assert {p.name for p in tmp_path.glob('*.png')} >= {'activation_stats.png', 'color_dim.png', 'lr_find.png'}
    assert '[(64, 8, 6, 6), (64, 16, 4, 4), (64, 32, 2, 2)]' in out


def test_notebook_executes(tmp_path):
    import nbformat
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for c in nb.cells:
        if c.cell_type == 'code': c.outputs = []  # the stored outputs must not count
    execute(nb, tmp_path)
    outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
    assert not [o for o in outputs if o.output_type == 'error']
    text = ''.join(o.get('text', '') for o in outputs)
    assert "'train': 'eval'" in text and '[SingleEpochCB] Terminating . . .' in text
    assert sum('image/png' in o.get('data', {}) for o in outputs) >= 3  # LR finder, activation stats, color_dim
    assert re.search(r'^total: [\d,]+ parameters', text, re.M)  # the summary table


def readme_callback_rows() -> list[tuple[list[str], str]]:
    """(names, order) for each row of the README's callback table; names are the callback and its aliases."""
    text = (ROOT / 'README.md').read_text()
    section = text.split('\n## Callbacks\n', 1)[1].split('\n## ', 1)[0]
    rows = [line.split(' | ') for line in section.splitlines() if line.startswith('| `')]
    return [(re.findall(r'`(\w+)`', cells[0]), cells[1].strip()) for cells in rows]


def test_readme_callback_table_names_only_what_exists_with_its_order():
    import ultraloop
    rows = readme_callback_rows()
    assert len(rows) >= 15
    for names, order in rows:
        for name in names:
            assert hasattr(ultraloop, name), f'README lists {name}, which ultraloop does not have'
            assert getattr(ultraloop, name).order == float(order), f'README gives {name} order {order}'


def merge_streams(outputs: list) -> list:
    """Join neighbouring stdout chunks: how the kernel splits a cell's printing depends on timing."""
    merged = []
    for o in outputs:
        if merged and o.output_type == 'stream' and merged[-1].output_type == 'stream' and merged[-1].name == o.name:
            merged[-1].text += o.text
        else: merged.append(o)
    return merged


def execute(nb, folder) -> None:
    """Run every cell of `nb` in a fresh kernel with `folder` as the working folder, keeping the outputs."""
    from nbclient import NotebookClient
    saved = dict(os.environ)
    os.environ.update(ONE_THREAD)  # the kernel process inherits the environment
    os.environ.pop('MPLBACKEND', None)  # other test modules set Agg; the kernel must keep its inline backend
    try:
        # kernel 'python3' is ipykernel's own spec, started with this interpreter (so with this venv's packages)
        NotebookClient(nb, timeout=300, kernel_name='python3', resources={'metadata': {'path': str(folder)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)


if __name__ == '__main__':  # rebuild the notebook from the script, with its outputs
    import tempfile

    import nbformat
    nb = build_notebook()
    with tempfile.TemporaryDirectory() as d: execute(nb, d)
    for c in nb.cells:  # warnings name this machine's paths and packages, timings change every run: not stored
        if c.cell_type == 'code':
            c.outputs = merge_streams([o for o in c.outputs if o.get('name') != 'stderr'])
            c.metadata.pop('execution', None)
    nbformat.write(nb, NOTEBOOK)
    print(f'wrote {NOTEBOOK}')
