"""ultraloop inside Ray Train: `TorchTrainer` starts 2 CPU workers, each runs one `Learner` with DistributedCB (on the
process group Ray made), CheckpointCB and RayTrainReportCB, which reports each epoch's metrics and checkpoint to Ray.
A second trainer given the first one's checkpoint goes on with `fit(resume=ray_resume_path(...))`, and ends
equal to a run that was never stopped.

    pip install "ray[train]"    # with torch and ultraloop
    python examples/ray_train.py

Needs only torch and Ray: the data are made here (a random linear problem, like the tests' toy data)."""
import tempfile
from pathlib import Path

import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer
from torch import nn
from torch.nn import functional as F

from ultraloop import CheckpointCB, DataLoaders, DistributedCB, MetricsCB, RayTrainReportCB, TrainLearner, ray_resume_path


def train_func(config: dict) -> None:
    """What each Ray worker runs: the same script as for one process, plus RayTrainReportCB."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g)).argmax(1)
    dls = DataLoaders.from_tensors(x[:384], y[:384], x[384:], y[384:], bs=16, seed=0)  # bs per worker
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    learn = TrainLearner(model, dls, F.cross_entropy, lr=0.1,
                         cbs=[MetricsCB(), DistributedCB(), CheckpointCB(config['checkpoints']), RayTrainReportCB()])
    # Ray's latest checkpoint (after a worker restart), else the one passed in the config, else None: a fresh start
    learn.fit(config['epochs'], resume=ray_resume_path(config['checkpoints'], config.get('resume_from')))


def run(epochs: int, storage: Path, name: str, resume_from=None) -> ray.train.Result:
    config = {'epochs': epochs, 'checkpoints': str(storage / f'{name}-local'), 'resume_from': resume_from}
    trainer = TorchTrainer(train_func, train_loop_config=config,
                           scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False),
                           run_config=ray.train.RunConfig(name=name, storage_path=str(storage)))
    return trainer.fit()


def main() -> None:
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as d:
        storage = Path(d)
        first = run(2, storage, 'first')                                  # 2 epochs, then stopped
        resumed = run(4, storage, 'resumed', resume_from=first.checkpoint)  # goes on for epochs 2 and 3
        whole = run(4, storage, 'whole')                                  # never stopped
        print(f'ray {ray.__version__}, torch {torch.__version__}')
        print('first run, last report:   ', first.metrics)
        print('resumed run, last report: ', resumed.metrics)
        print('uninterrupted, last report:', whole.metrics)
        keys = [k for k in whole.metrics if k.startswith(('train_', 'valid_'))]
        same = all(resumed.metrics[k] == whole.metrics[k] for k in keys)  # exactly
        print(f'resumed run equals the uninterrupted one in {", ".join(keys)}: {same}')
        files = sorted(p.name for p in Path(resumed.checkpoint.path).iterdir())
        print('the resumed run\'s last checkpoint holds', files)
        assert same and resumed.metrics['epoch'] == 3
    ray.shutdown()


if __name__ == '__main__':
    main()
