"""DDP's bucketed all-reduce (overlapped with the backward; GradCache's micro-batches under no_sync) trains
exactly as the flat all-reduce after the backward, and as one process with the whole batch."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.test_train import losses, max_weight_diff
from xmodal.train.config import TrainConfig
from xmodal.train.trainer import Trainer

# run by torchrun: the same training with DDP, then with the flat all-reduce, in the same two processes
SCRIPT = """
import sys
from xmodal.train import trainer as T
from xmodal.train.config import TrainConfig

kw, out = eval(sys.argv[1]), sys.argv[2]
for flat in (False, True):
    T._FLAT_REDUCE = flat
    t = T.Trainer(TrainConfig(**kw, out=f"{out}/{'flat' if flat else 'ddp'}"))
    assert (t.ddp is None) == flat
    t.fit()
"""


@pytest.mark.slow  # ~50 s: a torchrun of two trainings and one in-process run
@pytest.mark.parametrize("accum, port", [(1, 29541), (2, 29542)])
def test_ddp_equals_the_flat_all_reduce_and_one_process(tiny_manifest, tmp_path, accum, port):
    """siglip (a temperature and a bias, which the flat all-reduce averages beside DDP), 2 gloo
    processes of 4 rows, accum 1 and GradCache's 2 micro-batches of 2. Tolerance: 1e-6 between DDP and
    the flat all-reduce (the same sums, halved before or after); 1e-5 against one process (another
    reduction order)."""
    kw = dict(data=str(tiny_manifest), model="xm-micro", steps=4, batch_size=8, accum_steps=accum,
              precision="fp32", progress=False, log_every=1, objective="siglip", lr=1e-3, warmup=1,
              aug_crop_scale=0.8, aug_word_drop=0.1)  # fmt: skip
    script = tmp_path / "two.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         str(script), repr(kw), str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = Trainer(TrainConfig(**kw, out=str(tmp_path / "one"))).fit()
    ddp, flat = losses(tmp_path / "ddp"), losses(tmp_path / "flat")
    assert sorted(ddp) == sorted(flat) == [1, 2, 3, 4]
    for step in ddp:
        assert abs(ddp[step] - flat[step]) < 1e-6, (step, ddp[step], flat[step])
        assert abs(ddp[step] - losses(one)[step]) < 1e-5, step
    assert max_weight_diff(tmp_path / "ddp", tmp_path / "flat") < 1e-6
    assert max_weight_diff(tmp_path / "ddp", one) < 1e-5
    assert ddp[4] < ddp[1]  # it trains
