"""train.py under accelerate's FSDP plugin on CPU processes (gloo), for the tests.

    OMP_NUM_THREADS=1 ACCELERATE_USE_CPU=true ACCELERATE_USE_FSDP=true FSDP_VERSION=2 \\
        python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_on_cpu.py [train.py flags]

Without a GPU accelerate turns an FSDP launch into plain MULTI_CPU (data parallel): its
state only takes the FSDP plugin on accelerator devices. This sets the distributed type to
FSDP once accelerate has built the plugin from the FSDP_* variables, so prepare() shards the
student with FSDP2's fully_shard, and save_state, load_state, get_state_dict, gradient
clipping and every forward run the same collectives as on GPUs (over gloo). Everything else
is train.py as launched.
"""

import sys
from pathlib import Path

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

_accelerate_init = AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _accelerate_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # Both shared states: AcceleratorState re-reads PartialState's on every construction.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin


AcceleratorState.__init__ = _fsdp_on_cpu

if __name__ == "__main__":
    import train

    sys.exit(train.main(sys.argv[1:]))
