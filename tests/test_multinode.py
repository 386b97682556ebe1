"""Two training "nodes" on this machine, started the way a Kubeflow Trainer TrainJob starts them.

The Trainer's torch-distributed runtime runs the TrainJob's command on every node with
``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and
``PET_MASTER_PORT`` set. Here two processes run the command of a real manifest
(:func:`cyclegan_kfp.components.trainjob.build_trainjob`) with that environment, rendezvous on
127.0.0.1 and
train with gloo on the CPU, sharing one folder as the PVC would be shared. Both ranks must end
with identical weights: torchrun starts each rank as tests/fault_entry.py, which writes its
final weights' digest.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cyclegan.config import load_config, write_params
from cyclegan.paths import Paths
from cyclegan.train.launch import rank_argv
from cyclegan_kfp.components.trainjob import TrainJobSpec, build_trainjob

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.synthetic.image_size=16",
    "data.synthetic.n_train_a=8",
    "data.synthetic.n_train_b=8",
    "data.synthetic.n_test=4",
    "data.load_size=16",
    "data.num_workers=1",
    "train.crop_size=16",
    "train.ngf=4",
    "train.ndf=4",
    "train.n_layers_D=2",
    "train.max_steps=3",
    "train.device=cpu",
    "train.log_every=1",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_trainjob_nodes_end_with_identical_weights(tmp_path, cli_env) -> None:
    from cyclegan.data.prepare import prepare

    shared = tmp_path / "pvc"  # what every node mounts
    params = tmp_path / "params.yaml"
    params.write_text("")
    cfg = load_config(params, TINY, required=True)
    paths = Paths(
        raw=tmp_path / "raw",
        prepared=shared / "prepared",
        checkpoints=shared / "checkpoints",
        model=shared / "model",
        metrics=shared / "metrics",
        plots=shared / "plots",
    )
    prepare(cfg, paths)
    manifest = build_trainjob(
        TrainJobSpec(
            name="cyclegan-test",
            image="unused",
            command=["cyclegan", *rank_argv(write_params(cfg, shared / "params.yaml"), paths)],
            num_nodes=2,
            gpus_per_node=0,
        )
    )
    trainer = manifest["spec"]["trainer"]
    digests = tmp_path / "digests"
    digests.mkdir()
    port = free_port()
    procs, logs = [], []
    for rank in range(trainer["numNodes"]):
        env = {
            **cli_env,
            **{e["name"]: e["value"] for e in trainer["env"] if "value" in e},
            "PET_NNODES": str(trainer["numNodes"]),
            "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
            "PET_NODE_RANK": str(rank),
            "PET_MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_PORT": str(port),
            "FAULT_DIGEST_DIR": str(digests),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
        }
        logs.append(tmp_path / f"node{rank}.log")
        with logs[-1].open("w") as out:
            # The node runs the TrainJob's command as the runtime would: `cyclegan train ...`
            # under torchrun, which reads nodes and rendezvous from PET_*; the ranks run
            # tests/fault_entry.py (that command line, plus the digest) to report their weights.
            assert trainer["command"][0] == "cyclegan"
            cmd = [sys.executable, "-m", "torch.distributed.run", "-m", "tests.fault_entry",
                   *trainer["command"][1:]]  # fmt: skip
            procs.append(
                subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
            )
    try:
        codes = [proc.wait(timeout=240) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs)
    assert codes == [0, 0], output
    found = sorted(p.name for p in digests.iterdir())
    assert found == ["rank0.sha256", "rank1.sha256"], output
    assert (digests / "rank0.sha256").read_text() == (digests / "rank1.sha256").read_text()
    assert (paths.model / "G_A.safetensors").is_file() and (paths.metrics / "train.json").is_file()
