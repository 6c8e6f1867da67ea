"""Every ```python block of README.md runs as printed, each in a fresh namespace, in an empty folder of its own.

Blocks are found automatically, so a new README section is tested as soon as it is written. A block that must not
run here (it needs a GPU, a network, a service) says so on its first line, `# not run: <reason>`, and is reported as
skipped with that reason. A block that needs a file made first gets it from `PREPARE` (keyed by a text the block
holds), standing in for what an earlier step of the README (a command) would have written. A block under torchrun
runs here as one process (DistributedCB does nothing alone); tests/test_distributed.py runs that set-up for real.
Some blocks also get checks of what their comments say (`CHECKS`).
"""
import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / 'README.md'
NOT_RUN = re.compile(r'#\s*not run:\s*(\S.*)')


def blocks(text: str | None = None) -> list:
    """(id, code) of every ```python block, the id naming the README section it is in and its place there."""
    found, section, n, code, other = [], 'top', {}, None, False
    for line in (README.read_text() if text is None else text).splitlines(keepends=True):
        fence = line.rstrip()
        if code is not None:  # inside a python block
            if fence == '```':
                n[section] = n.get(section, 0) + 1
                found.append((f'{section} #{n[section]}', ''.join(code)))
                code = None
            else: code.append(line)
        elif other: other = fence != '```'  # inside another fenced block: its '#' lines are not headings
        elif fence == '```python': code = []
        elif fence.startswith('```'): other = True
        elif re.match(r'#{1,4} ', line): section = line.lstrip('#').strip()
    return found


def skip_reason(code: str) -> str | None:
    """The reason of a block whose first line is `# not run: <reason>`, else None."""
    first = code.lstrip().splitlines()[0] if code.strip() else ''
    m = NOT_RUN.match(first)
    return m.group(1) if m else None


def _weights(tmp: Path) -> None:
    """What `ultraloop fit --model mlp --save runs/mlp.pt` writes: the state_dict of the MLP it trains on the digits."""
    from ultraloop.models import mlp
    (tmp / 'runs').mkdir()
    torch.save(mlp(64, 128, 10).state_dict(), tmp / 'runs' / 'mlp.pt')


PREPARE = {"'runs/mlp.pt'": _weights}


def _stops_at_target_loss(ns: dict, printed: str) -> None:
    hist = ns['learn'].metrics.history
    assert hist[-1]['train'] == 'eval' and hist[-1]['loss'] < 0.2 and len(hist) < 40  # StopAtLossCB ended fit early
    assert all(h['loss'] >= 0.2 for h in hist[:-1] if h['train'] == 'eval')
    assert printed.count("'train': 'eval'}") == len(hist) // 2 and '  after_epoch: MetricsCB()\n' in printed


def _trains_alone(ns: dict, printed: str) -> None:
    hist = ns['learn'].metrics.history
    assert len(hist) == 10 and hist[-1]['train'] == 'eval' and hist[-1]['accuracy'] > 0.8


CHECKS = {'StopAtLossCB(0.2)': _stops_at_target_loss, 'DistributedCB()]': _trains_alone}


def test_the_readme_has_its_blocks_and_the_marker_skips():
    ids = [i for i, _ in blocks()]
    assert len(ids) >= 3 and ids[0] == 'Example #1' and 'Several GPUs, several machines #1' in ids, ids
    text = ('## A\n```python\nx = 1\n```\n```bash\n# not a heading\n```\n```python\n# not run: needs a GPU\n'
            'import cupy\n```\n## B\n```\n```python\n```\n')
    got = blocks(text)
    assert [i for i, _ in got] == ['A #1', 'A #2'] and [skip_reason(c) for _, c in got] == [None, 'needs a GPU']


@pytest.mark.parametrize('code', [c for _, c in blocks()], ids=[i for i, _ in blocks()])
def test_readme_block_runs(code, tmp_path, monkeypatch):
    if (reason := skip_reason(code)) is not None: pytest.skip(reason)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv('MPLBACKEND', 'Agg')
    for key, prepare in PREPARE.items():
        if key in code: prepare(tmp_path)
    ns, out = {'__name__': '__main__'}, io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        exec(compile(code, 'README block', 'exec'), ns)
    for key, check in CHECKS.items():
        if key in code: check(ns, out.getvalue())
