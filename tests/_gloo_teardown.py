"""Helper for tests/test_end_to_end.py (run under torchrun, gloo): run train_gpt.main() exactly as
`torchrun ... train_gpt.py` does, tear the process group down as the script's __main__ block does, and
write the names of the threads still alive to $TEARDOWN_OUT.<rank>.json.

After destroy_process_group() no gloo thread may remain: a leftover gloo worker that drops its last
work item during interpreter shutdown needs the GIL, gets pthread_exit'ed by CPython, and the process
dies with "terminate called without an active exception" (SIGABRT) after having written its results.
This helper leaves with os._exit so that it reports instead of aborting.
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402

import train_gpt as tg  # noqa: E402

tg.main()
if dist.is_available() and dist.is_initialized():
    dist.destroy_process_group()
names = sorted(Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task"))
Path(f"{os.environ['TEARDOWN_OUT']}.{os.environ.get('RANK', '0')}.json").write_text(json.dumps(names))
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
