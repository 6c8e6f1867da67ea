"""Set-up as a new user meets it: scripts/setup.sh asks for the CPU torch where no NVIDIA GPU answers and only checks
on a second run; an editable install prints no setuptools warning; bench/README.md names only files the repo has."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform == 'win32', reason='the set-up scripts are bash')
CPU = 'pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu'


def fake_bin(tmp_path, name: str, script: str) -> Path:
    d = tmp_path / 'bin'
    d.mkdir(exist_ok=True)
    (d / name).write_text(f'#!/bin/sh\n{script}\n')
    (d / name).chmod(0o755)
    return d


def plan(tmp_path, nvidia_smi: str, **env) -> subprocess.CompletedProcess:
    bin_dir = fake_bin(tmp_path, 'nvidia-smi', nvidia_smi)
    env = {**{k: v for k, v in os.environ.items() if k != 'ULTRALOOP_TORCH'},
           'PATH': f'{bin_dir}{os.pathsep}{os.environ["PATH"]}', **env}
    return subprocess.run(['bash', str(ROOT / 'scripts' / 'setup.sh'), '--plan'], capture_output=True, text=True, env=env,
                          timeout=60)


@pytest.mark.skipif(sys.platform == 'darwin', reason='on macOS the default build is the CPU one')
def test_setup_asks_for_the_cpu_build_unless_an_nvidia_gpu_answers(tmp_path):
    no_driver = 'echo "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver" >&2; exit 9'
    gpu = 'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"'
    r = plan(tmp_path, no_driver)
    assert r.returncode == 0 and r.stdout == f'torch: cpu (no NVIDIA GPU found by nvidia-smi -L): {CPU}\n', r.stderr
    r = plan(tmp_path, gpu)
    assert r.stdout == ('torch: default (NVIDIA GPU found: GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)): '
                        'pip install torch==2.13.0\n')
    assert plan(tmp_path, gpu, ULTRALOOP_TORCH='cpu').stdout == f'torch: cpu (ULTRALOOP_TORCH=cpu): {CPU}\n'
    assert plan(tmp_path, no_driver, ULTRALOOP_TORCH='cuda').stdout == ('torch: default (ULTRALOOP_TORCH=cuda): '
                                                                        'pip install torch==2.13.0\n')
    assert plan(tmp_path, gpu, ULTRALOOP_TORCH='skip').stdout == 'torch: skip (ULTRALOOP_TORCH=skip)\n'
    r = plan(tmp_path, gpu, ULTRALOOP_TORCH='rocm')
    assert r.returncode == 2 and r.stdout == ''
    assert r.stderr == 'setup.sh: ULTRALOOP_TORCH=rocm is not a choice; use auto, cpu, cuda or skip\n'


def standin_repo(tmp_path) -> tuple[Path, Path]:
    """A copy of setup.sh and pyproject.toml with an empty .venv/bin for stand-in executables: (repo, its .venv/bin)."""
    repo = tmp_path / 'repo'
    (repo / 'scripts').mkdir(parents=True)
    shutil.copy(ROOT / 'scripts' / 'setup.sh', repo / 'scripts')
    shutil.copy(ROOT / 'pyproject.toml', repo)
    venv_bin = repo / '.venv' / 'bin'
    venv_bin.mkdir(parents=True)
    return repo, venv_bin


def test_a_second_setup_only_checks(tmp_path):
    """A stand-in .venv whose python logs each call: with the set-up current, pip is never run."""
    repo, venv_bin = standin_repo(tmp_path)
    log = tmp_path / 'calls'
    for exe in ('python', 'ultraloop'):
        (venv_bin / exe).write_text(f'#!/bin/sh\necho "{exe} $*" >> {log}\n')
        (venv_bin / exe).chmod(0o755)

    def setup(extra):
        log.write_text('')
        r = subprocess.run(['bash', str(repo / 'scripts' / 'setup.sh'), extra], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return log.read_text().splitlines()

    first = setup('all')  # no stamp yet: installs (the stand-in python "has" torch, so only ultraloop)
    assert 'python -m pip install -q -e .[all]' in first
    assert setup('all') == ['python -c import torch, ultraloop']  # the second run: one check, no pip
    assert any('-m pip install -q -e .[test]' in c for c in setup('test'))  # another extra installs once
    (repo / 'pyproject.toml').write_text((repo / 'pyproject.toml').read_text() + '\n# changed\n')
    assert any('-m pip install -q -e .[all]' in c for c in setup('all'))  # a changed pyproject.toml reinstalls


def test_editable_install_prints_no_setuptools_warning(tmp_path):
    """What `pip install -e .` runs: setuptools' build_editable, on a copy of the project (it writes build files)."""
    pytest.importorskip('setuptools')
    proj = tmp_path / 'proj'
    shutil.copytree(ROOT / 'ultraloop', proj / 'ultraloop', ignore=shutil.ignore_patterns('__pycache__'))
    for f in ('pyproject.toml', 'README.md'): shutil.copy(ROOT / f, proj)
    (tmp_path / 'wheel').mkdir()
    code = 'from setuptools import build_meta as b; print(b.build_editable(%r))' % str(tmp_path / 'wheel')
    r = subprocess.run([sys.executable, '-W', 'default', '-c', code], capture_output=True, text=True, cwd=proj, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1].startswith('ultraloop-0.1.0-')
    assert 'Warning' not in r.stderr and 'Please be careful' not in r.stderr, r.stderr[-3000:]


def test_bench_readme_names_only_files_this_repository_has():
    text = (ROOT / 'bench' / 'README.md').read_text()
    assert not re.findall(r'\.\./\S*', text)  # no path out of the repository (a user's clone has nothing beside it)
    named = set(re.findall(r'\b(?:bench|ultraloop|tests|scripts|examples)/[\w./-]*\w', text))
    assert 'bench/overhead.py' in named and 'bench/gpu.py' in named
    for p in named: assert (ROOT / p).exists(), f'bench/README.md names {p}, which the repository does not have'


def test_setup_plans_torchvision_from_torchs_source(tmp_path):
    no_gpu, gpu = 'exit 9', 'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"'
    r = plan(tmp_path, no_gpu, ULTRALOOP_EXTRAS='vision')
    assert r.returncode == 0 and r.stdout.splitlines()[1] == (
        'torchvision: pip install torchvision==0.28.0 --index-url https://download.pytorch.org/whl/cpu (the CPU build, as '
        "torch's: PyPI's is CUDA-built), then pip install timm"), r.stderr
    assert plan(tmp_path, gpu, ULTRALOOP_EXTRAS='vision').stdout.splitlines()[1] == (
        "torchvision: pip install torchvision==0.28.0 (PyPI's, as torch's), then pip install timm")
    assert len(plan(tmp_path, no_gpu).stdout.splitlines()) == 1  # asked for by name only
    r = plan(tmp_path, no_gpu, ULTRALOOP_EXTRAS='vision,audio')
    assert r.returncode == 2 and r.stderr == ('setup.sh: ULTRALOOP_EXTRAS=vision,audio: audio is not a choice; the one '
                                              'there is: vision\n')


@pytest.mark.parametrize('cpu_wheel', [True, False])
def test_setup_vision_on_a_cpu_torch_never_takes_pypis_cuda_torchvision(tmp_path, cpu_wheel):
    """A stand-in .venv whose torch is the CPU build and whose CPU index cannot be reached: set-up asks pip's sources
    for torchvision==0.28.0+cpu; where they have none, it stops with a message instead of taking PyPI's CUDA build."""
    repo, venv_bin = standin_repo(tmp_path)
    log = tmp_path / 'calls'
    (venv_bin / 'python').write_text(f'''#!/bin/sh
echo "python $*" >> {log}
case "$*" in
  *torch.version.cuda*) echo "2.13.0+cpu cpu" ;;
  *urlopen*) exit 1 ;;
  *torchvision==0.28.0+cpu*) [ {int(cpu_wheel)} = 1 ] || exit 1 ;;
  *"import torchvision"*) echo 0.28.0+cpu ;;
  *"import timm"*) echo 1.0.0 ;;
esac
''')
    (venv_bin / 'python').chmod(0o755)
    r = subprocess.run(['bash', str(repo / 'scripts' / 'setup.sh'), 'test', 'vision'], capture_output=True, text=True,
                       timeout=60)
    pips = [c for c in log.read_text().splitlines() if ' -m pip install' in c and 'pip install -q --upgrade pip' not in c]
    if cpu_wheel:
        assert r.returncode == 0 and r.stdout == 'torchvision: 0.28.0+cpu, timm: 1.0.0\n', r.stderr
        assert pips == ['python -m pip install -q -e .[test]', 'python -m pip install -q torchvision==0.28.0+cpu',
                        'python -m pip install -q timm']
        assert (repo / '.venv' / '.ultraloop-setup-test').read_text().endswith(' vision\n')
    else:
        assert r.returncode == 1 and pips[-1] == 'python -m pip install -q torchvision==0.28.0+cpu'  # no timm, no PyPI's
        assert r.stderr.startswith('torchvision: neither https://download.pytorch.org/whl/cpu nor pip\'s configured sources '
                                   'have torchvision==0.28.0+cpu for this CPU torch; PyPI\'s torchvision is CUDA-built')


def test_gpu_check_runs_its_stages_in_order_within_one_time_budget(tmp_path):
    """bench/gpu_check.sh, the one call a GPU machine gets, with a stand-in python that notes what it is asked to run:
    each stage's commands with their time limits, a stage left under 30 s of T_TOTAL skipped with a line saying so,
    and an unknown stage refused naming the choices."""
    calls = tmp_path / 'calls'
    py = fake_bin(tmp_path, 'python', f'echo "$*" >> {calls}\ncase "$*" in *host_sync*) sleep 3 ;; esac')
    env = {**os.environ, 'PYTHON': str(py / 'python'), 'T_TOTAL': '32'}
    r = subprocess.run(['bash', str(ROOT / 'bench' / 'gpu_check.sh'), str(tmp_path / 'out'), 'speedrun tests onecycle'],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = calls.read_text().splitlines()
    assert lines[1:] == ['bench/speedrun.py --device cuda',
                         "-m pytest -q -p no:cacheprovider -rs -k cuda or gpu or host_sync tests"]  # [0]: env.txt's
    assert re.search(r'== \d\d:\d\d:\d\d skipped onecycle: (2[0-9]) s left of T_TOTAL=32\n== \d\d:\d\d:\d\d done\n$',
                     r.stdout), r.stdout
    assert (tmp_path / 'out' / 'speedrun.log').is_file() and (tmp_path / 'out' / 'gpu_tests.log').is_file()
    r = subprocess.run(['bash', str(ROOT / 'bench' / 'gpu_check.sh'), str(tmp_path / 'out'), 'nosuch tests'],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and r.stdout.endswith("gpu_check.sh: unknown stage 'nosuch'; use tests, onecycle, bound, "
                                                   "speedrun, bench, suite or dist\n")
