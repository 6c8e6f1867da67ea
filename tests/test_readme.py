"""The README's example runs as printed and does what its comments say."""
import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / 'README.md'


def test_readme_example_runs_and_stops_at_target_loss():
    code = re.search(r'```python\n(.*?)```', README.read_text(), re.S).group(1)
    ns, out = {}, io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, 'README example', 'exec'), ns)
    hist = ns['learn'].metrics.history
    assert hist[-1]['train'] == 'eval' and hist[-1]['loss'] < 0.2 and len(hist) < 40  # StopAtLossCB ended fit early
    assert all(h['loss'] >= 0.2 for h in hist[:-1] if h['train'] == 'eval')
    printed = out.getvalue()
    assert printed.count("'train': 'eval'}") == len(hist) // 2 and '  after_epoch: MetricsCB()\n' in printed
